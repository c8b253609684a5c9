"""The training process keeps a step's freed memory in its heap (glibc's thresholds):
the same activations every step are not faulted in again."""

import subprocess
import sys

import pytest

from bitnet_training.errors import ConfigError
from bitnet_training.train import Trainer, TrainingConfig, allocator
from bitnet_training.train import trainer as trainer_module

needs_glibc = pytest.mark.skipif(not allocator.available(), reason="the C library is not glibc")

# Training steps of a 2-layer `tiny` BitNetLM (4 x 128 tokens, fp32); prints the minor page
# faults a step after two warm-up steps.
STEPS = """
import resource, sys, torch
from bitnet_training import BitNetLM, ModelConfig
from bitnet_training.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
cfg = ModelConfig.preset("tiny", num_hidden_layers=2)
model = BitNetLM.bitnet(cfg)
opt = torch.optim.AdamW(model.parameters())
ids = torch.randint(0, cfg.vocab_size, (4, 128))
def step():
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(2):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 4)
"""


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@needs_glibc
def test_freed_blocks_are_reused_without_page_faults():
    # Measured 4.2-6.7 thousand faults a step with glibc's defaults (the step's freed
    # activations given back to the OS and faulted in again), 230-950 kept.
    default, kept = faults("default"), faults("keep")
    assert default > 1000, default
    assert kept * 2 < default, (kept, default)


def test_the_trainer_sets_it_unless_told_not_to(tmp_path, micro_model, token_windows, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or True)
    for keep, want in ((True, 1), (False, 1)):
        cfg = TrainingConfig(
            output_dir=str(tmp_path / str(keep)), batch_size=2, max_steps=1,
            keep_freed_memory=keep, mixed_precision="fp32",
        )  # fmt: skip
        Trainer(micro_model(), cfg, token_windows()).train()
        assert len(calls) == want


def test_asking_for_it_without_glibc_is_refused(monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: None)
    assert not allocator.available() and not allocator.keep_freed_memory()
    with pytest.raises(ConfigError, match="training.keep_freed_memory=True is invalid.*glibc"):
        TrainingConfig(keep_freed_memory=True)
    assert TrainingConfig().keep_freed_memory  # the default: does what it can, quietly
    TrainingConfig(keep_freed_memory=False)
