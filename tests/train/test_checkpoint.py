import json
import os
from pathlib import Path

import pytest
import torch

from bitnet_training import BitNetError
from bitnet_training.train import Trainer, TrainingConfig
from bitnet_training.train import checkpoint as ck


def _trainer(tmp_path, model, data, **kw):
    cfg = TrainingConfig(
        output_dir=str(tmp_path / "run"), batch_size=2, mixed_precision="fp32", max_steps=2, **kw
    )
    return Trainer(model, cfg, data)


def test_error_mid_save_keeps_previous_checkpoint(tmp_path, micro_model, token_windows):
    t = _trainer(tmp_path, micro_model(), token_windows())
    t.train()
    out = tmp_path / "run"
    assert (out / "latest").read_text().strip() == "checkpoint-00000002"
    t.state.step = 3

    def boom(tmp_dir):
        assert sorted(os.listdir(tmp_dir)) == sorted(
            [ck.MODEL_FILE, ck.OPTIMIZER_FILE, ck.RNG_FILE, ck.STATE_FILE, ck.METADATA_FILE]
        )
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint(_before_commit=boom)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".tmp"))) == [
        "checkpoint-00000002"
    ]
    assert (out / "latest").read_text().strip() == "checkpoint-00000002"
    resumed = _trainer(
        tmp_path,
        micro_model(seed=5),
        token_windows(),
    )
    resumed.config.max_steps = 3
    r = resumed.train(resume_from="latest")  # the previous checkpoint still loads
    assert r.steps == 3


def test_checkpoint_files_load_without_code(tmp_path, micro_model, token_windows):
    t = _trainer(tmp_path, micro_model(), token_windows())
    r = t.train()
    path = r.last_checkpoint
    state = ck.read_state(path)
    assert state["format_version"] == ck.FORMAT_VERSION and state["step"] == 2
    torch.load(os.path.join(path, ck.OPTIMIZER_FILE), weights_only=True)
    # A pickle that would run code is refused, with a one-line error.

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"state": Evil()}, os.path.join(path, ck.OPTIMIZER_FILE))
    with pytest.raises(BitNetError, match="cannot load optimizer.pt"):
        ck.load_optimizer_state(path)


def test_unknown_format_version_is_refused(tmp_path, micro_model, token_windows):
    r = _trainer(tmp_path, micro_model(), token_windows()).train()
    p = Path(r.last_checkpoint, ck.STATE_FILE)
    state = json.loads(p.read_text())
    state["format_version"] = 2
    p.write_text(json.dumps(state))
    with pytest.raises(BitNetError, match="format version 2; this bitnet-training reads version 1"):
        _trainer(tmp_path, micro_model(), token_windows()).train(resume_from=r.last_checkpoint)


def test_wrong_model_or_data_is_refused(tmp_path, micro_model, token_windows):
    r = _trainer(tmp_path, micro_model(), token_windows()).train()
    with pytest.raises(BitNetError, match="does not fit this model"):
        ck.load_model_weights(torch.nn.Linear(3, 3), r.last_checkpoint)
    with pytest.raises(BitNetError, match="trained on 24 sequences, this run has 30"):
        _trainer(tmp_path, micro_model(), token_windows(30)).train(resume_from="latest")


def test_retention_keeps_newest_and_best(tmp_path, micro_model, token_windows):
    t = Trainer(
        micro_model(),
        TrainingConfig(
            output_dir=str(tmp_path / "run"),
            batch_size=2,
            mixed_precision="fp32",
            max_steps=8,
            save_every=1,
            eval_every=1,
            save_total_limit=2,
            learning_rate=0.5,
        ),
        token_windows(),
        token_windows(2, seed=3),
    )
    r = t.train()
    names = sorted(os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path / "run")))
    best = os.path.basename(r.best_checkpoint)
    assert names[-1] == "checkpoint-00000008"
    assert best in names and len(names) == (2 if best == names[-1] or best == names[-2] else 3)
    assert (tmp_path / "run" / "best").read_text().strip() == best


def test_resolve_checkpoint(tmp_path, micro_model, token_windows):
    r = _trainer(tmp_path, micro_model(), token_windows()).train()
    run = str(tmp_path / "run")
    assert ck.resolve_checkpoint(run) == r.last_checkpoint
    assert ck.resolve_checkpoint(r.last_checkpoint) == r.last_checkpoint
    os.remove(os.path.join(run, "latest"))
    assert ck.resolve_checkpoint(run) == r.last_checkpoint  # falls back to the newest
    with pytest.raises(BitNetError, match="holds no checkpoints"):
        ck.resolve_checkpoint(str(tmp_path))
