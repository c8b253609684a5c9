"""The training process keeps a step's freed memory in its heap (glibc's thresholds):
the same activations every step are not faulted in again."""

import subprocess
import sys

import pytest

from bitnet_training.errors import ConfigError
from bitnet_training.train import Trainer, TrainingConfig, allocator
from bitnet_training.train import trainer as trainer_module

needs_glibc = pytest.mark.skipif(not allocator.available(), reason="the C library is not glibc")

# A "step": 12 blocks of 4 MiB (each under glibc's raised mmap threshold) allocated and all
# freed, 8 times; prints the minor page faults of the last 7.
STEPS = """
import resource, sys, torch
from bitnet_training.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    blocks = [torch.ones(1 << 20) for _ in range(12)]
    del blocks
step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(7):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@needs_glibc
def test_freed_blocks_are_reused_without_page_faults():
    # 48 MiB freed at once is above glibc's default trim threshold: given back to the OS and
    # faulted in again (1024 pages of 4 KiB per block; measured 1.9-12 thousand a step,
    # depending on what the process holds already) every step, unless kept.
    default, kept = faults("default"), faults("keep")
    assert default > 7 * 1024, default
    assert kept < default // 20, (kept, default)


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
