"""Monitoring: the profiler records chosen steps into a trace file; every log record carries
throughput and peak memory."""

import json
import logging

import pytest
import torch

from bitnet_training import BitNetError, BitNetLM, ModelConfig
from bitnet_training.train import Trainer, TrainingConfig

CFG = ModelConfig(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
)  # fmt: skip


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def test_profiler_records_two_steps_into_a_trace(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=4, batch_size=2,
                         mixed_precision="fp32", profile_steps=[2, 3], log_every=1)  # fmt: skip
    trainer = Trainer(BitNetLM.bitnet(CFG), cfg, Data())
    trainer.train()
    traces = list((tmp_path / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)
    assert "profile of steps 2-3" in caplog.text and "Self CPU" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in train)


def test_profile_steps_beyond_the_run_are_refused(tmp_path):
    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, profile_steps=[5])
    with pytest.raises(
        BitNetError, match=r"profile_steps starts at step 5, after the run's last \(2\)"
    ):
        Trainer(BitNetLM(CFG), cfg, Data()).train()
    assert not any(tmp_path.iterdir())  # nothing written


def test_wandb_offline_writes_its_run_directory_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("wandb", reason="wandb is in the dev extra; not installed here")
    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=4, batch_size=2, save_every=2,
                         mixed_precision="fp32", log_every=1, wandb="offline")  # fmt: skip
    Trainer(BitNetLM(CFG), cfg, Data()).train()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    state = json.loads((tmp_path / "checkpoint-00000004" / "trainer_state.json").read_text())
    run_id = state["callbacks"]["WandbLogging"]["run_id"]
    assert runs[0].name.endswith(run_id)
    longer = cfg.model_copy(update={"max_steps": 6})
    Trainer(BitNetLM(CFG), longer, Data()).train(resume_from="latest")
    state = json.loads((tmp_path / "checkpoint-00000006" / "trainer_state.json").read_text())
    assert state["callbacks"]["WandbLogging"]["run_id"] == run_id  # the same W&B run
