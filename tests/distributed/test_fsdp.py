"""FSDP2 under torchrun (gloo, 2 CPU processes), in float64 where exactness is asserted:
FSDP=2 and DDP=2 with batch b train as one process with 2b (gradient accumulation over
unequal target counts, norm clipping and AGC on sharded gradients), the ternary codes are
identical, and checkpoints cross layouts: a sharded one resumes in one process, a single-file
one resumes sharded, both as the uninterrupted run continues."""

import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "_layout_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(layout: str, out, batch: int, resume=None, ranks: int = 2) -> dict:
    args = [WORKER, layout, str(out), str(batch), *([str(resume)] if resume else [])]
    if layout == "none":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               "--standalone", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(os.path.join(out, "result.pt"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, run("none", out, 4)


def same(a: dict, b: dict, steps=slice(None)) -> None:
    for (la, na), (lb, nb) in zip(a["steps"], b["steps"][steps], strict=True):
        assert la == pytest.approx(lb, rel=1e-12) and na == pytest.approx(nb, rel=1e-12)
    assert a["codes"].keys() == b["codes"].keys()
    for name, codes in a["codes"].items():
        assert torch.equal(codes, b["codes"][name]), name  # ternary codes identical


@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_two_ranks_train_as_one_process_in_float64(tmp_path, single, layout):
    one = single[1]
    two = run(layout, tmp_path, 2)
    same(two, one)
    assert two["evals"] == pytest.approx(one["evals"], rel=1e-12)  # sharded evaluation
    ckpt = tmp_path / "checkpoint-00000002"
    if layout == "fsdp":  # every rank wrote its shards; rank 0 the index
        assert sorted(os.listdir(ckpt / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not (ckpt / "model.safetensors").exists()
    else:
        assert (ckpt / "model.safetensors").is_file()


def test_checkpoints_resume_across_layouts(tmp_path, single):
    out, one = single
    fsdp = run("fsdp", tmp_path / "fsdp", 2)
    # the sharded checkpoint of step 2 resumes in a single process (batch 4) ...
    resumed = run("none", tmp_path / "one", 4, resume=tmp_path / "fsdp" / "checkpoint-00000002")
    same(resumed, one, slice(2, None))
    # ... and the single process's checkpoint resumes sharded over 2 ranks (batch 2)
    resumed = run("fsdp", tmp_path / "two", 2, resume=out / "checkpoint-00000002")
    same(resumed, fsdp, slice(2, None))


COMMON = [
    "--no-progress", "data.seq_len=32", "model.hidden_size=64", "model.intermediate_size=128",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
    "training.mixed_precision=fp32", "training.max_steps=4", "training.log_every=1",
    "training.eval_every=2", "sample.max_new_tokens=3", "training.save_every=2",
]  # fmt: skip


def torchrun(*args, ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           "-m", "bitnet_training", "train", *COMMON, *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def records(run):
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_from_the_command_line(tmp_path, capsys):
    from safetensors.torch import load_file

    from bitnet_training.cli import main

    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    text = "\n\n".join(" ".join(words[(i * 7 + j) % 9] for j in range(60)) for i in range(70))
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "v.txt").write_text(text[:2000])
    data = [f"data.train_files={tmp_path / 't.txt'}", f"data.val_files={tmp_path / 'v.txt'}"]
    run = tmp_path / "fsdp"
    done = torchrun(*data, "training.batch_size=2", "distributed.strategy=fsdp",
                    f"training.output_dir={run}")  # fmt: skip
    assert done.stdout.count("== summary ==") == 1 and "sample" in done.stdout
    assert "data parallel: FSDP2 over 2 ranks (gloo)" in done.stderr
    assert (run / "checkpoint-00000002" / "sharded" / ".metadata").is_file()
    # one process reads the shards: evaluation, and consolidation into single files, which
    # resumes in one process with the same global batch as the sharded run continued
    assert main(["eval", str(run)]) == 0
    one = tmp_path / "one"
    assert main(["consolidate", str(run / "checkpoint-00000002"), "-o", str(one)]) == 0
    assert (one / "checkpoint-00000002" / "model.safetensors").is_file()
    assert main(["train", "--resume", *COMMON, *data, "training.batch_size=4",
                 f"training.output_dir={one}"]) == 0  # fmt: skip
    sharded = [r for r in records(run) if r["kind"] == "train" and r["step"] > 2]
    resumed = [r for r in records(one) if r["kind"] == "train"]
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, sharded, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # float32 reduction order
    capsys.readouterr()
    assert main(["consolidate", str(one), "-o", str(tmp_path / "again")]) == 2
    assert "already a single-file checkpoint" in capsys.readouterr().err
    # adapters train sharded and are saved whole; NF4 QLoRA is refused with the reason
    lora = tmp_path / "lora"
    torchrun(*data, "training.batch_size=2", "distributed.strategy=fsdp", "peft.method=lora",
             "peft.rank=4", f"training.output_dir={lora}")  # fmt: skip
    adapter = load_file(lora / "adapter" / "adapter_model.safetensors")
    a = next(v for k, v in adapter.items() if "q_proj.lora_A" in k)
    assert tuple(a.shape) == (4, 64)  # the whole matrix, not a rank's shard
    done = torchrun(*data, "distributed.strategy=fsdp", "peft.method=qlora", "quantize=false",
                    f"training.output_dir={tmp_path / 'q'}", ok=False)  # fmt: skip
    assert "peft.method=qlora is not built for distributed.strategy=fsdp" in done.stderr
