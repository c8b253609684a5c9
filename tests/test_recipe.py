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


@pytest.mark.parametrize(
    "method", ["lora", "qlora", "qlora_ternary", "adalora", "bitfit", "prefix"]
)
def test_peft_run_saves_adapters_resumes_exactly_and_evaluates(
    tmp_path, capsys, text_file, val_file, method
):
    peft = pytest.importorskip("peft")
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    common = [
        f"peft.method={method}", f"quantize={str(method != 'qlora').lower()}",
        f"data.train_files={text_file}", f"data.val_files={val_file}",
        "data.seq_len=32", "training.batch_size=2", "model.num_hidden_layers=2",
        "training.scheduler=cosine", "training.learning_rate=1e-2", *QUIET, "training.log_every=1",
    ]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    code, out, err = run(capsys, "train", *common, "training.max_steps=6",
                         f"training.output_dir={full}")  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "train", *common, "training.max_steps=6",
                       "training.save_every=3", f"training.output_dir={part}")  # fmt: skip
    assert code == 0, err
    # The checkpoint holds the adapters (and buffers), not the frozen base.
    stored = load_file(str(part / "checkpoint-00000003" / "model.safetensors"))
    assert stored and all(
        ("lora_" in k or k.endswith(".bias") or "embedding" in k or "prefix" in k)
        for k in stored
        if not k.endswith(("inv_freq", "remaining"))
    )
    # Resume from step 3 of the same run: bit-identical losses from step 4 on.
    import shutil

    shutil.rmtree(part / "checkpoint-00000006")
    (part / "latest").write_text("checkpoint-00000003\n")
    (part / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (part / "metrics.jsonl").read_text().splitlines()[:3])
    )
    code, _, err = run(capsys, "train", "--resume", *common, "training.max_steps=6",
                       "training.save_every=3", f"training.output_dir={part}")  # fmt: skip
    assert code == 0, err

    def losses(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert losses(part) == losses(full)  # steps 4-6 come from the resumed run
    adapter = full / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    if method in ("lora", "qlora", "qlora_ternary"):
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    code, out, err = run(capsys, "eval", full)
    assert code == 0 and "val loss" in out, err
    code, out, err = run(capsys, "generate", full, "--prompt", "the ", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("the "), err
    assert peft  # imported for the skip


TINY = ["model.num_hidden_layers=1", "data.seq_len=32", "training.batch_size=2", *QUIET]


def test_a_refused_overwrite_deletes_nothing(tmp_path, capsys, text_file):
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", *TINY, "training.max_steps=2", f"training.output_dir={out}")
    assert code == 0, err
    code, _, err = run(
        capsys, "train", *TINY, "training.max_steps=2", f"training.output_dir={out}",
        "--overwrite", "training.batch_size=100000",
    )  # fmt: skip
    assert code == 2 and "fewer than one batch" in err
    assert (out / "checkpoint-00000002").is_dir() and (out / "metrics.jsonl").stat().st_size


def test_eval_sees_the_model_as_trained_mid_schedule(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run(
        capsys, "train", *TINY, "training.max_steps=3", "qat.weight_schedule.end_step=10",
        f"training.output_dir={out}",
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["kind"] == "eval"][-1]["val_loss"]
    code, printed, err = run(capsys, "eval", out)
    assert code == 0, err
    assert f"val loss     {trained:.4f}" in printed  # lambda < 1, as at the last step


def test_val_files_take_effect_with_the_embedded_corpus(tmp_path, val_file):
    from bitnet_training import recipe
    from bitnet_training.config import load_config

    cfg = load_config(None, [*TINY[:3], f"data.val_files={val_file}", "training.max_steps=1",
                             f"training.output_dir={tmp_path}"])  # fmt: skip
    run_ = recipe.prepare(cfg, progress=False)
    assert run_.data.info["val_tokens"] == len(val_file.read_bytes()) + 1  # + EOS


def test_resume_checks_and_applies_changed_settings(tmp_path, capsys, text_file, llama):
    out = tmp_path / "r"
    common = [*TINY, f"training.output_dir={out}", "training.save_every=1"]
    code, _, err = run(capsys, "train", *common, "training.max_steps=2")
    assert code == 0, err
    code, _, err = run(capsys, "train", "--resume", *common, "training.max_steps=3",
                       "training.batch_size=4")  # fmt: skip
    assert code == 2 and "training.batch_size=2" in err
    code, _, err = run(capsys, "train", "--resume", *common[1:], "training.max_steps=3",
                       f"model.pretrained={llama}")  # fmt: skip
    assert code == 2 and "resume with the same base" in err
    from bitnet_training import recipe
    from bitnet_training.config import load_config

    cfg = load_config(None, [*TINY[:3], f"training.output_dir={out}", "training.save_every=1",
                             "training.max_steps=3", "training.optimizer.weight_decay=0.5",
                             "sample.max_new_tokens=0"])  # fmt: skip
    r = recipe.prepare(cfg, resume="latest", progress=False)
    r.trainer.train(resume_from="latest")
    assert max(g["initial_weight_decay"] for g in r.trainer.optimizer.param_groups) == 0.5


def test_a_run_of_ours_as_base_is_self_contained(tmp_path, capsys, text_file):
    import shutil

    src = tmp_path / "src"
    code, _, err = run(capsys, "train", *TINY, "training.max_steps=2", f"training.output_dir={src}")
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = run(capsys, "train", f"model.pretrained={src}", "data.seq_len=32",
                       "training.batch_size=2", "training.max_steps=2", *QUIET,
                       f"training.output_dir={out}")  # fmt: skip
    assert code == 0, err
    shutil.rmtree(src)
    code, printed, err = run(capsys, "eval", out)
    assert code == 0 and "val loss" in printed, err


def test_merge_writes_a_run_that_evaluates(tmp_path, capsys, text_file, val_file):
    pytest.importorskip("peft")
    common = [*TINY, f"data.train_files={text_file}", f"data.val_files={val_file}",
              "training.max_steps=3", "training.learning_rate=1e-2"]  # fmt: skip
    for method in ("qlora_ternary", "prefix", "qlora"):
        code, _, err = run(capsys, "train", *common, f"peft.method={method}",
                           f"quantize={str(method != 'qlora').lower()}",
                           f"training.output_dir={tmp_path / method}")  # fmt: skip
        assert code == 0, err
    code, out, err = run(capsys, "merge", tmp_path / "qlora_ternary", "-o", tmp_path / "m")
    assert code == 0, err
    assert "requantize" in out and "refit" in out and "method" in out
    code, out, err = run(capsys, "eval", tmp_path / "m")
    assert code == 0 and "val loss" in out, err
    # QLoRA merges into the weights its NF4 base dequantizes to: the same model, full precision.
    code, out, err = run(capsys, "merge", tmp_path / "qlora", "-o", tmp_path / "m3")
    assert code == 0, err
    _, qlora_eval, _ = run(capsys, "eval", tmp_path / "qlora")
    _, merged_eval, _ = run(capsys, "eval", tmp_path / "m3")
    loss = [float(o.split("val loss")[1].split()[0]) for o in (qlora_eval, merged_eval)]
    assert abs(loss[0] - loss[1]) < 2e-3, (qlora_eval, merged_eval)  # bf16 autocast rounding
    code, _, err = run(capsys, "merge", tmp_path / "prefix", "-o", tmp_path / "m2")
    assert code == 2 and "only LoRA adapters merge" in err and err.count("\n") == 1


def test_a_peft_run_evaluates_on_its_real_base(tmp_path, capsys, llama, text_file, val_file):
    # Its checkpoints hold adapters only: eval must load the base's weights, not just its
    # architecture from the run's base/ copy.
    out = tmp_path / "lora"
    code, _, err = run(
        capsys, "train", f"model.pretrained={llama}", "peft.method=lora",
        f"data.train_files={text_file}", f"data.val_files={val_file}", "data.seq_len=32",
        "training.batch_size=2", "training.max_steps=2", f"training.output_dir={out}", *QUIET,
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["kind"] == "eval"][-1]["val_loss"]
    code, printed, err = run(capsys, "eval", out)
    assert code == 0, err
    assert f"val loss     {trained:.4f}" in printed


def test_activation_checkpointing_from_the_cli(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    code, _, err = run(
        capsys, "train", *TINY, "training.max_steps=2", "training.activation_checkpointing=true",
        f"training.output_dir={tmp_path}",
    )  # fmt: skip
    assert code == 0, err
    assert "activation checkpointing: 1 blocks" in caplog.text


def test_a_transformers_teacher_distils_into_its_ternary_self(tmp_path, capsys, llama, text_file):
    out = tmp_path / "student"
    code, _, err = run(
        capsys, "train", f"model.pretrained={llama}", f"teacher.pretrained={llama}",
        f"data.train_files={text_file}", "data.seq_len=32", "training.batch_size=2",
        "training.max_steps=2", "loss.distill.relation_layer=0", f"training.output_dir={out}",
        *QUIET,
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["kind"] == "train")["loss"]
    # step 1: the student is the teacher ternarized, so the distillation terms are small but
    # not zero (quantization changed its outputs); the loss is finite
    assert 0 < first < 1e6
