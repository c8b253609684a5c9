"""The CLI end to end at a tiny size: train, eval, generate, resume, and every user error."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from bitnet_training.cli import main

MICRO = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "data.seq_len=32",
    "training.batch_size=4",
    "training.log_every=5",
    "training.mixed_precision=fp32",
    "sample.max_new_tokens=16",
]


def write_corpus(d) -> list[str]:
    """Small train / validation text files under `d` (plus `other.txt`: the same size as the
    training text, different content) and the overrides that select them."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "ternary",
        "weights",
        "learn",
    ]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    (d / "train.txt").write_text("\n".join(lines[:260]))
    (d / "val.txt").write_text("\n".join(lines[260:]))
    (d / "other.txt").write_text("\n".join(reversed(lines[:260])))
    return [
        "data.source=files",
        f"data.train_files={d / 'train.txt'}",
        f"data.val_files={d / 'val.txt'}",
    ]


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_generate_resume(tmp_path, capsys, corpus):
    out_dir = tmp_path / "run"
    base = ["train", "--no-progress", *MICRO, *corpus, f"training.output_dir={out_dir}"]
    code, out, err = run(
        capsys, *base, "training.max_steps=20", "training.save_every=10", "training.eval_every=10"
    )
    assert code == 0, err
    assert "val loss" in out and "bits/byte" in out and "sample" in out
    assert "kernels      quantizers " in out and "integer GEMM " in out
    assert (out_dir / "checkpoint-00000020").is_dir()
    assert (out_dir / "latest").read_text().strip() == "checkpoint-00000020"
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10, 15, 20]
    val_loss = [r["val_loss"] for r in records if r["kind"] == "eval"][-1]

    code, out, err = run(capsys, "eval", out_dir)
    assert code == 0, err
    assert f"val loss     {val_loss:.4f}" in out and "perplexity" in out and "bits/byte" in out

    code, out, err = run(
        capsys,
        "generate",
        out_dir,
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    )
    assert code == 0, err
    assert out.startswith("the quick") and len(out.encode()) <= len("the quick") + 8 * 4 + 1

    code, out, err = run(capsys, *base, "training.max_steps=30", "--resume")
    assert code == 0, err
    assert "steps        30" in out and (out_dir / "checkpoint-00000030").is_dir()

    # Starting again into a run directory without --resume is refused, nothing touched.
    code, out, err = run(capsys, *base, "training.max_steps=30")
    assert code == 2 and "already holds checkpoints" in err


def test_print_config(capsys):
    code, out, _ = run(
        capsys, "train", "--print-config", "training.max_steps=3", "qat.weight_bits=1"
    )
    assert code == 0
    printed = yaml.safe_load(out)  # values, not substrings: "weight_bits: 1" is in "1.58"
    assert printed["training"]["max_steps"] == 3 and printed["qat"]["weight_bits"] == 1
    assert printed["model_preset"] == "tiny"


@pytest.mark.parametrize(
    "args, message",
    [
        (["training.learning_rat=1"], "did you mean 'training.learning_rate'?"),
        (["training.batch_size=two"], "training.batch_size='two' is invalid: expected an integer"),
        (["training.learning_rate=-1"], "training.learning_rate=-1 is invalid"),
        (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["data.source=files", "data.train_files=missing.txt"], "missing.txt' does not exist"),
        (
            ["model.vocab_size=100"],
            "the tokenizer has 259 tokens but the model's vocabulary has 100",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, args, message):
    code, _, err = run(capsys, "train", f"training.output_dir={tmp_path / 'r'}", *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bitnet-train: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("checkpoint-*"))


def test_bad_data_files_exit_2(capsys, tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "b.bin"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)))
    for path, message in ((empty, "is empty"), (binary, "is a binary file")):
        code, _, err = run(capsys, "train", "data.source=files", f"data.train_files={path}")
        assert code == 2 and message in err and str(path) in err


def test_incompatible_and_unknown_checkpoints_exit_2(tmp_path, capsys, corpus):
    out_dir = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        "--no-progress",
        *MICRO,
        *corpus,
        "training.max_steps=2",
        f"training.output_dir={out_dir}",
        "sample.max_new_tokens=0",
    )
    assert code == 0, err
    ckpt = out_dir / "checkpoint-00000002"
    code, _, err = run(capsys, "eval", ckpt, "model.hidden_size=128")
    assert code == 2 and "not 'model.hidden_size' (it would have no effect)" in err
    meta = json.loads((ckpt / "metadata.json").read_text())
    meta["run_config"]["model"]["hidden_size"] = 128  # a checkpoint of another shape
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    (other / "metadata.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, "eval", other)
    assert code == 2 and "does not fit this model" in err
    code, _, err = run(capsys, "eval", tmp_path / "nothing")
    assert code == 2 and "does not exist" in err
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["format_version"] = 99
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    code, _, err = run(capsys, "generate", ckpt)
    assert code == 2 and "format version 99" in err


def test_python_m_entry_point_and_sigint(tmp_path, corpus):
    """A real process: Ctrl-C (SIGINT) saves a checkpoint, then exits with 130."""
    out_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "bitnet_training",
        "train",
        "--no-progress",
        *MICRO,
        *corpus,
        "training.max_steps=100000",
        "training.log_every=1",
        f"training.output_dir={out_dir}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        # Wait until training is under way (a metrics record is written).
        metrics = out_dir / "metrics.jsonl"
        for _ in range(600):
            if metrics.exists() and metrics.read_text().count("\n") >= 2:
                break
            if proc.poll() is not None:
                break
            import time

            time.sleep(0.1)
        proc.send_signal(2)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in out
    latest = (out_dir / "latest").read_text().strip()
    assert (out_dir / latest / "model.safetensors").is_file()


def test_qat_in_depth_from_yaml(tmp_path, capsys, corpus):
    cfg = tmp_path / "qat.yaml"
    cfg.write_text(
        "qat:\n"
        "  weight_schedule: {shape: cosine, end_step: 6}\n"
        "  weight_bit_stages: [[0, 8], [4, 1.58]]\n"
        "  quant_noise: 0.5\n"
        "  activation_observer: ema\n"
        "  calibration_samples: 8\n"
        "  latent_clip: 3.0\n"
        "  weight_decay_on: linear\n"
        "stages:\n"
        "  - {name: warm, steps: 4}\n"
        "  - {name: main, steps: 4, lr_factor: 0.5}\n"
        "qat_tuner: 0.05\n"
        "training: {optimizer: {name: adamw}, agc_clip_factor: 0.1,\n"
        "           scheduler: wsd, eval_every: 4}\n"
    )
    out_dir = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        "--config",
        cfg,
        "--no-progress",
        *MICRO,
        *corpus,
        "training.max_steps=8",
        "training.log_every=4",
        f"training.output_dir={out_dir}",
    )
    assert code == 0, err
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["stage"] for r in train] == [0, 1]
    assert [r["qat_weight_bits"] for r in train] == [8, 1.58]
    last = train[-1]
    assert {"w_neg", "w_zero", "w_pos", "flip_rate", "quant_error", "act_clip_rate"} <= set(last)
    assert any(k.startswith("flip_rate/model.layers.0.") for k in last)
    assert all("qat_tuner_hold" in r for r in records if r["kind"] == "eval")


def test_preprocess_then_train_on_shards_and_stream(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "docs.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"body": f"record {i}: " + "ternary weights learn " * 3}) + "\n")
    shards = tmp_path / "shards"
    code, out, err = run(
        capsys,
        "preprocess",
        src,
        "-o",
        shards,
        "--jsonl-field",
        "body",
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "300",
        "--val-fraction",
        "0.1",
        "--no-progress",
    )
    assert code == 0, err
    assert "documents    200" in out and "tokens/s" in out
    code, out, err = run(capsys, "preprocess", src, "-o", shards, "--no-progress")
    assert code == 2 and "already holds" in err
    common = ["--no-progress", *MICRO, "training.max_steps=6", "sample.max_new_tokens=8"]
    code, out, err = run(
        capsys,
        "train",
        *common,
        "data.source=shards",
        f"data.shards_dir={shards}",
        "data.sampling=random",
        f"training.output_dir={tmp_path / 'r1'}",
    )
    assert code == 0, err
    assert "val loss" in out and "bits/byte" in out
    code, out, err = run(capsys, "generate", tmp_path / "r1", "--max-new-tokens", "4")
    assert code == 0, err
    code, _, err = run(
        capsys,
        "train",
        *common,
        "data.source=stream",
        f"data.train_files={src}",
        "data.jsonl_field=body",
        "training.dataloader_workers=2",
        f"training.output_dir={tmp_path / 'r2'}",
    )
    assert code == 0, err
    code, _, err = run(
        capsys, "train", *common, "data.source=shards", f"data.shards_dir={tmp_path / 'nope'}"
    )
    assert code == 2 and "does not exist" in err
    code, _, err = run(
        capsys,
        "train",
        *common,
        "data.source=shards",
        f"data.shards_dir={shards}",
        "model.vocab_size=256",
    )
    assert code == 2 and "model.vocab_size" in err  # the BPE vocabulary does not fit
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    code, _, err = run(capsys, "preprocess", bad, "-o", tmp_path / "o", "--no-progress")
    assert code == 2 and "bad.jsonl:2: no 'text' field" in err


def test_init_from_converts_a_full_precision_run(tmp_path, capsys, corpus):
    from safetensors.torch import load_file

    fp = tmp_path / "fp"
    code, _, err = run(
        capsys,
        "train",
        "--no-progress",
        *MICRO,
        *corpus,
        "quantize=false",
        "training.max_steps=3",
        f"training.output_dir={fp}",
    )
    assert code == 0, err
    # One step of SGD at a learning rate far below float32 resolution leaves the weights
    # as loaded: the converted run starts exactly from the full-precision weights.
    frozen = [
        "training.optimizer.name=sgd",
        "training.optimizer.momentum=0",
        "training.optimizer.weight_decay=0",
        "training.learning_rate=1e-30",
        "training.gradient_clip_norm=null",
        "training.max_steps=1",
    ]
    out = tmp_path / "q"
    code, _, err = run(
        capsys,
        "train",
        "--no-progress",
        *MICRO,
        *corpus,
        *frozen,
        f"init_from={fp}",
        "qat.weight_schedule.end_step=100",
        "qat.activation_observer=ema",
        f"training.output_dir={out}",
    )
    assert code == 0, err
    a = load_file(str(fp / "checkpoint-00000003" / "model.safetensors"))
    b = load_file(str(out / "checkpoint-00000001" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(
        capsys,
        "train",
        "--no-progress",
        *MICRO,
        *corpus,
        "training.max_steps=1",
        "model.num_hidden_layers=3",
        f"init_from={fp}",
        f"training.output_dir={tmp_path / 'bad'}",
    )
    assert code == 2 and "does not fit this model" in err
