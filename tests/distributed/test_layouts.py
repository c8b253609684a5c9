"""Parallel layouts under torchrun (gloo, 2 CPU processes), in float64 where exactness is
asserted: FSDP=2 and DDP=2 with batch b train as one process with 2b, TP=2 with batch b as one
process with b (gradient accumulation over unequal target counts, norm clipping and AGC on
sharded gradients); the ternary codes are identical; and checkpoints cross layouts: a sharded
one resumes in one process and at TP=2, a single-file one resumes sharded, each as the
uninterrupted run continues."""

import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "_layout_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(layout: str, out, batch: int, resume=None, ranks: int = 2, fused: bool = True) -> dict:
    args = [WORKER, layout, str(out), str(batch), *([str(resume)] if resume else [])]
    env = {**ENV, "BITNET_FUSED": "1" if fused else "0"}
    if layout == "none":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               "--standalone", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(os.path.join(out, "result.pt"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, run("none", out, 4)


@pytest.fixture(scope="module")
def unfused(tmp_path_factory):
    """One process on BitLinear's unfused path, which tensor parallel layers take."""
    out = tmp_path_factory.mktemp("unfused")
    return out, run("none", out, 2, fused=False)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, run("fsdp", out, 2)


def same(a: dict, b: dict, steps=slice(None), rel=1e-12) -> None:
    for (la, na), (lb, nb) in zip(a["steps"], b["steps"][steps], strict=True):
        assert la == pytest.approx(lb, rel=rel) and na == pytest.approx(nb, rel=rel)
    assert a["codes"].keys() == b["codes"].keys()
    for name, codes in a["codes"].items():
        assert torch.equal(codes, b["codes"][name]), name  # ternary codes identical


@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_two_ranks_train_as_one_process_in_float64(tmp_path, single, fsdp, layout):
    one = single[1]
    out, two = fsdp if layout == "fsdp" else (tmp_path, run(layout, tmp_path, 2))
    same(two, one)
    assert two["evals"] == pytest.approx(one["evals"], rel=1e-12)  # sharded evaluation
    ckpt = out / "checkpoint-00000002"
    if layout == "fsdp":  # every rank wrote its shards; rank 0 the index
        assert sorted(os.listdir(ckpt / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not (ckpt / "model.safetensors").exists()
    else:
        assert (ckpt / "model.safetensors").is_file()


def test_tensor_parallel_trains_as_one_process_in_float64(tmp_path, unfused, fsdp):
    out, one = unfused
    tp = run("tp", tmp_path / "tp", 2)  # both ranks read the same batches of 2
    # Whole-weight scales, all-reduced absmax and sub-norms: TP=1's numbers, identical codes;
    # the norms sum squares in float32 (as transformers' RMSNorm), per shard then reduced,
    # which rounds apart from the whole row's by ~1e-8 after a few steps.
    same(tp, one, rel=1e-6)
    assert tp["evals"] == pytest.approx(one["evals"], rel=1e-6)
    assert (tmp_path / "tp" / "checkpoint-00000002" / "sharded" / ".metadata").is_file()
    # the single process's checkpoint resumes split over 2 ranks, exactly ...
    resumed = run("tp", tmp_path / "from-one", 2, resume=out / "checkpoint-00000002")
    same(resumed, one, slice(2, None), rel=1e-6)
    # ... and the tensor-parallel checkpoint in one process
    resumed = run("none", tmp_path / "to-one", 2, resume=tmp_path / "tp" / "checkpoint-00000002",
                  fused=False)  # fmt: skip
    same(resumed, one, slice(2, None), rel=1e-6)
    # FSDP=2's checkpoint resumes at TP=2 (one data stream of the same global batch, 4) as it
    # resumes in one process on the same (unfused) path; from these weights the sub-norms'
    # float32 sums flip an activation code or two (~1e-6), while a misread shard would show
    # at 1e-2
    ckpt = fsdp[0] / "checkpoint-00000002"
    resumed = run("tp", tmp_path / "fsdp-tp", 4, resume=ckpt)
    alone = run("none", tmp_path / "fsdp-one", 4, resume=ckpt, fused=False)
    same(resumed, alone, rel=1e-4)


def test_fsdp_across_tensor_parallel_groups_on_a_2d_mesh(tmp_path, unfused):
    """4 processes (gloo runs them on 2 cores): FSDP=2 x TP=2 with batch 1 per group trains
    as one process with batch 2."""
    _out, one = unfused
    hybrid = run("fsdp+tp", tmp_path, 1, ranks=4)
    same(hybrid, one, rel=1e-6)  # the sub-norms' float32 sums, as at TP=2
    assert hybrid["evals"] == pytest.approx(one["evals"], rel=1e-6)
    shards = os.listdir(tmp_path / "checkpoint-00000002" / "sharded")
    assert sorted(shards) == [".metadata", *(f"__{r}_0.distcp" for r in range(4))]


def test_checkpoints_resume_across_layouts(tmp_path, single, fsdp):
    out, one = single
    # the sharded checkpoint of step 2 resumes in a single process (batch 4) ...
    resumed = run("none", tmp_path / "one", 4, resume=fsdp[0] / "checkpoint-00000002")
    same(resumed, one, slice(2, None))
    # ... and the single process's checkpoint resumes sharded over 2 ranks (batch 2)
    resumed = run("fsdp", tmp_path / "two", 2, resume=out / "checkpoint-00000002")
    same(resumed, fsdp[1], slice(2, None))


def test_pipeline_stages_train_as_one_process_in_float64(tmp_path, single):
    """Two stages, two micro-batches per batch, under 1F1B and GPipe: the same losses,
    gradient norms, evaluation and ternary codes as one process with the same batch; the
    stages' sharded checkpoints resume in one process, and as a pipeline."""
    one = single[1]
    pp = run("pp", tmp_path / "1f1b", 4)
    same(pp, one)
    assert pp["evals"] == pytest.approx(one["evals"], rel=1e-12)
    same(run("pp-gpipe", tmp_path / "gpipe", 4), one)
    ckpt = tmp_path / "1f1b" / "checkpoint-00000002"
    same(run("none", tmp_path / "one", 4, resume=ckpt), one, slice(2, None))
    same(run("pp", tmp_path / "again", 4, resume=ckpt), one, slice(2, None))


def test_fsdp_gathers_packed_ternary_codes_with_the_unpacked_gathers_results(tmp_path, fsdp):
    packed = run("fsdp-packed", tmp_path, 2)
    # Codes identical; the whole weight's scale sums |w| in another order than mean(|W|)
    # in float32 (about 1e-9 apart here), which can flip an activation code downstream.
    same(packed, fsdp[1], rel=1e-4)
    assert packed["steps"][0] == pytest.approx(fsdp[1]["steps"][0], rel=1e-8)
    # its checkpoints hold plain weights: they resume in one process (batch 4) ...
    resumed = run("none", tmp_path / "one", 4, resume=tmp_path / "checkpoint-00000002")
    same(resumed, packed, slice(2, None), rel=1e-4)
    # ... and an unpacked checkpoint resumes with packed gathers
    resumed = run("fsdp-packed", tmp_path / "two", 2, resume=fsdp[0] / "checkpoint-00000002")
    same(resumed, fsdp[1], slice(2, None), rel=1e-4)


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


def text_files(tmp_path, docs: int) -> list[str]:
    """Training and validation text of `docs` documents; the overrides that read them."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    text = "\n\n".join(" ".join(words[(i * 7 + j) % 9] for j in range(60)) for i in range(docs))
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "v.txt").write_text(text[:2000])
    return [f"data.train_files={tmp_path / 't.txt'}", f"data.val_files={tmp_path / 'v.txt'}"]


def records(run):
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_from_the_command_line(tmp_path, capsys):
    from safetensors.torch import load_file

    from bitnet_training.cli import main

    data = text_files(tmp_path, 70)
    run = tmp_path / "fsdp"
    done = torchrun(*data, "training.batch_size=2", "distributed.strategy=fsdp",
                    f"training.output_dir={run}")  # fmt: skip
    assert done.stdout.count("== summary ==") == 1 and "sample" in done.stdout
    assert "parallel: FSDP2 over 2 ranks (gloo)" in done.stderr
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
    done = torchrun(*data, "distributed.strategy=fsdp", "peft.method=adalora",
                    f"training.output_dir={tmp_path / 'a'}", ok=False)  # fmt: skip
    assert "peft.method=adalora is not built for distributed.strategy=fsdp" in done.stderr


def test_fsdp_packed_ternary_all_gather_from_the_command_line(tmp_path, capsys):
    from bitnet_training.cli import main

    data = text_files(tmp_path, 40)
    run = tmp_path / "packed"
    packed = ["distributed.strategy=fsdp", "distributed.fsdp_ternary_all_gather=true"]
    done = torchrun(*data, *packed, f"training.output_dir={run}")
    assert "BitLinear weights gathered as packed 2-bit ternary codes" in done.stderr
    assert main(["eval", str(run)]) == 0  # its checkpoints are plain sharded weights
    done = torchrun(*data, *packed, "quantize=false", ok=False)
    assert "fsdp_ternary_all_gather needs plainly ternary weights: quantize=false" in done.stderr
    done = torchrun(*data, *packed, "qat.weight_bits=2", ok=False)
    assert "qat.weight_bits breaks that" in done.stderr
    assert main(["train", *COMMON, "distributed.fsdp_ternary_all_gather=true"]) == 2
    assert "set only with strategy fsdp" in capsys.readouterr().err


def test_pipeline_parallel_from_the_command_line(tmp_path):
    from bitnet_training.cli import main

    data = text_files(tmp_path, 40)
    run = tmp_path / "pp"
    pp = ["distributed.strategy=pp", "training.batch_size=2"]
    done = torchrun(*data, *pp, "distributed.pp_schedule=gpipe", f"training.output_dir={run}")
    assert "pipeline parallel over 2 stages (1, 1 layers), gpipe schedule, 2 micro-batches" in (
        done.stderr
    )
    assert done.stdout.count("== summary ==") == 1 and "sample       '" in done.stdout
    assert (run / "checkpoint-00000004" / "sharded" / ".metadata").is_file()
    assert main(["eval", str(run)]) == 0  # the stages' shards read back whole in one process
    done = torchrun(*data, *pp, "loss.chunk_size=16", ok=False)
    assert "strategy=pp cannot train this run: loss.chunk_size" in done.stderr
    done = torchrun(*data, "distributed.strategy=pp", "training.batch_size=3", ok=False)
    assert "training.batch_size=3 does not split into the pipeline's 2 micro-batches" in (
        done.stderr
    )


def test_tensor_parallel_from_the_command_line(tmp_path):
    from bitnet_training.cli import main

    data = text_files(tmp_path, 40)
    run = tmp_path / "tp"
    heads = ["model.num_attention_heads=4", "model.num_key_value_heads=2"]
    done = torchrun(*data, *heads, "distributed.strategy=tp", f"training.output_dir={run}")
    assert done.stdout.count("== summary ==") == 1
    assert "tensor parallel over 2 ranks (one data stream)" in done.stderr
    assert main(["eval", str(run)]) == 0  # one process reads the split checkpoint
    done = torchrun(*data, "distributed.strategy=tp", f"training.output_dir={tmp_path / 'x'}",
                    ok=False)  # fmt: skip
    assert "the model's key-value heads, 1, does not divide by 2" in done.stderr
