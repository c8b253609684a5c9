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
