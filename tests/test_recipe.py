"""The recipe end to end: a pretrained `transformers` model to ternary through the CLI, a
run of ours as a base, and settings that were silently ignored before the recipe issue."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import pytest
import torch
from safetensors.torch import load_file

from bitnet_training.cli import main

transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog. ternary weights learn too. " * 40
QUIET = ["--no-progress", "sample.max_new_tokens=8", "training.log_every=2"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LlamaForCausalLM with a byte-level BPE tokenizer, saved as transformers files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text(TEXT)
    return f


@pytest.fixture
def val_file(tmp_path):
    f = tmp_path / "val.txt"
    f.write_text(TEXT[::-1][:1200])
    return f


def test_pretrained_llama_trains_to_ternary_then_evaluates_and_generates(
    tmp_path, capsys, caplog, llama, text_file, val_file
):
    out_dir = tmp_path / "run"
    caplog.set_level("INFO")
    code, out, err = run(
        capsys,
        "train",
        f"model.pretrained={llama}",
        f"data.train_files={text_file}",
        f"data.val_files={val_file}",
        "data.seq_len=32",
        "qat.norm_placement=subln",
        "training.max_steps=4",
        "training.batch_size=4",
        f"training.output_dir={out_dir}",
        *QUIET,
    )
    assert code == 0, err
    assert "1.58-bit weights / 8-bit activations in 14 layers" in out  # 2 layers x 7 projections
    assert "subln: 4 sub-norms inserted" in caplog.text
    base = out_dir / "base"
    assert json.loads((base / "source.json").read_text())["kind"] == "transformers"
    meta = json.loads((out_dir / "checkpoint-00000004" / "metadata.json").read_text())
    assert meta["base"]["fingerprint"] and meta["tokenizer_id"].startswith("hf:")
    weights = load_file(str(out_dir / "checkpoint-00000004" / "model.safetensors"))
    assert "model.layers.0.self_attn.attn_sub_norm.weight" in weights

    # eval and generate from the run alone: the original base may be gone.
    moved = tmp_path / "moved-away"
    os.rename(llama, moved)
    try:
        code, out, err = run(capsys, "eval", out_dir)
        assert code == 0, err
        assert "val loss" in out and "bits/byte" in out
        code, out, err = run(capsys, "generate", out_dir, "--prompt", "the quick", "--seed", "1")
        assert code == 0, err
        assert out.startswith("the quick")
        code, out, err = run(
            capsys, "train", "--resume", f"model.pretrained={llama}",
            f"data.train_files={text_file}", f"data.val_files={val_file}", "data.seq_len=32",
            "qat.norm_placement=subln",
            "training.max_steps=6", "training.batch_size=4", f"training.output_dir={out_dir}",
            *QUIET,
        )  # fmt: skip
        assert code == 0, err
        assert "steps        6" in out
    finally:
        os.rename(moved, llama)


def test_a_run_of_ours_is_a_base(tmp_path, capsys, caplog, text_file):
    caplog.set_level("INFO")
    fp = tmp_path / "fp"
    small = ["model.num_hidden_layers=1", "training.max_steps=2", "training.batch_size=2"]
    code, _, err = run(
        capsys, "train", "quantize=false", f"data.train_files={text_file}", "data.seq_len=32",
        f"training.output_dir={fp}", *small, *QUIET,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run(
        capsys, "train", f"model.pretrained={fp}", f"data.train_files={text_file}",
        "data.seq_len=32", f"training.output_dir={tmp_path / 'q'}", "training.max_steps=2",
        "training.batch_size=2", *QUIET,
    )  # fmt: skip
    assert code == 0, err
    assert "model: the weights of" in caplog.text and "1.58-bit weights" in out


def test_train_files_are_never_ignored(tmp_path, capsys):
    # Before the recipe issue, data.train_files with the default source trained on the
    # embedded corpus and exited 0, even for a file that does not exist.
    code, _, err = run(
        capsys, "train", "data.train_files=notes.txt", f"training.output_dir={tmp_path}", *QUIET
    )
    assert code == 2 and err.count("\n") == 1
    assert "notes.txt" in err


def test_shards_must_use_the_models_tokenizer(tmp_path, capsys, llama):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"{i}.txt").write_text(f"document {i}: " + TEXT[: 400 + 40 * i])
    train = [
        f"model.pretrained={llama}", "data.source=shards", "data.seq_len=32",
        "training.max_steps=2", "training.batch_size=2", *QUIET,
    ]  # fmt: skip
    code, _, err = run(capsys, "preprocess", docs, "-o", tmp_path / "s", "--tokenizer", llama)
    assert code == 0, err
    code, _, err = run(
        capsys, "train", *train, f"data.shards_dir={tmp_path / 's'}",
        f"training.output_dir={tmp_path / 'r1'}",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "preprocess", docs, "-o", tmp_path / "b", "--no-progress")
    assert code == 0, err
    code, _, err = run(
        capsys, "train", *train, f"data.shards_dir={tmp_path / 'b'}",
        f"training.output_dir={tmp_path / 'r2'}",
    )  # fmt: skip
    assert code == 2 and "preprocess with --tokenizer" in err
