"""Each user mistake found in review: one line, exit status 2, nothing half-written."""

import json
import shutil

import pytest

from bitnet_training.cli import main
from test_cli import MICRO, write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    data = write_corpus(d)
    args = [
        "train",
        "--no-progress",
        *MICRO,
        *data,
        "training.max_steps=4",
        f"training.output_dir={d / 'run'}",
        "sample.max_new_tokens=0",
    ]
    assert main(args) == 0
    return d, data


def _fails(capsys, argv, message):
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("bitnet-train: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err


def _copy_run(d, name):
    dst = d / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(d / "run", dst)
    return dst


def test_output_dir_problems(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _fails(capsys, ["train", f"training.output_dir={f}"], "is a file, not a directory")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text("{}\n")
    _fails(
        capsys,
        ["train", f"training.output_dir={tmp_path / 'logs'}"],
        "already holds a previous run's logs",
    )
    _fails(
        capsys,
        ["train", "--resume", "--overwrite", f"training.output_dir={tmp_path / 'x'}"],
        "exclude each other",
    )
    _fails(
        capsys, ["train", "--resume", f"training.output_dir={tmp_path / 'empty'}"], "does not exist"
    )
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.optimizer=true", "training.optimizer=True is invalid"),
        ("training.scheduler=true", "training.scheduler=True is invalid"),
        ("model.head_dim=0", "model.head_dim=0 is invalid"),
        ("data.seq_len=2000", "at most model.max_position_embeddings (1024)"),
        ("qat.group_size=7", "qat.group_size=7 is invalid"),
        ("data.source=files", "data.train_files=[] is invalid"),
        ("data.source=stream", "data.train_files=[] is invalid"),
        ("data.shuffle_buffer=-5", "data.shuffle_buffer=-5 is invalid"),
        ("qat.weight_bit_stages=[[0,8,1]]", "qat.weight_bit_stages=[0, 8, 1] is invalid"),
        ("qat.activation_per_channel=true", "qat.activation_per_channel=True is invalid"),
        ("data.augment.mask_prob=0.1 data.augment.mask_token_id=99999", "mask_token_id=99999"),
    ],
)
def test_more_bad_values(capsys, tmp_path, override, message):
    _fails(capsys, ["train", *override.split(), f"training.output_dir={tmp_path / 'r'}"], message)
    assert not (tmp_path / "r").exists()


def test_argparse_errors_are_one_line(capsys):
    _fails(capsys, ["train", "--bogus"], "unrecognized arguments: --bogus")
    _fails(capsys, ["frobnicate"], "invalid choice")


def test_broken_checkpoints(trained, capsys):
    d, data = trained
    base = ["train", "--no-progress", *MICRO, *data, "sample.max_new_tokens=0"]
    run = _copy_run(d, "rng")
    ckpt = run / "checkpoint-00000004"
    (ckpt / "rng.safetensors").write_bytes(b"\x00" * 10)
    _fails(capsys, [*base, f"training.output_dir={run}", "--resume"], "unreadable rng.safetensors")
    run = _copy_run(d, "state")
    state_file = run / "checkpoint-00000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["step"]
    state_file.write_text(json.dumps(state))
    _fails(capsys, [*base, f"training.output_dir={run}", "--resume"], "no 'step'")
    state["step"] = 4
    state["rng"] = {"python": [1, 2]}
    state_file.write_text(json.dumps(state))
    _fails(capsys, [*base, f"training.output_dir={run}", "--resume"], "invalid trainer_state.json")
    run = _copy_run(d, "meta")
    (run / "checkpoint-00000004" / "metadata.json").write_text("[]")
    _fails(capsys, ["eval", run], "invalid metadata.json")


def test_resume_checks(trained, capsys):
    d, data = trained
    base = ["train", "--no-progress", *MICRO, "sample.max_new_tokens=0"]
    run = _copy_run(d, "other-data")
    other = [*data[:1], f"data.train_files={d / 'other.txt'}", *data[2:]]
    _fails(
        capsys,
        [*base, *other, f"training.output_dir={run}", "--resume"],
        "was trained on other data",
    )
    _fails(
        capsys,
        [*base, *data, "quantize=false", f"training.output_dir={run}", "--resume"],
        "was trained with quantize=true; this run has quantize=false",
    )
    # `--resume key=value`: the override is an override, not a checkpoint path.
    code = main([*base, *data, f"training.output_dir={run}", "--resume", "training.max_steps=6"])
    assert code == 0 and (run / "checkpoint-00000006").is_dir()
    capsys.readouterr()


def test_unknown_best_metric_stops_with_error(capsys, tmp_path, trained):
    _, data = trained
    _fails(
        capsys,
        [
            "train",
            "--no-progress",
            *MICRO,
            *data,
            "training.max_steps=2",
            "training.best_metric=val_acc",
            "training.save_best_only=true",
            f"training.output_dir={tmp_path / 'r'}",
        ],
        "training.best_metric='val_acc' is not an evaluation metric",
    )


def test_generate_and_eval_arguments(trained, capsys):
    d, _ = trained
    run = d / "run"
    _fails(capsys, ["generate", run, "--temperature", "nan"], "--temperature=nan is invalid")
    _fails(capsys, ["generate", run, "--seed", "-1"], "--seed=-1 is invalid")
    _fails(capsys, ["eval", run, "--max-batches", "0"], "--max-batches=0 is invalid")


def test_preprocess_never_deletes_other_files(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text " * 20)
    _fails(
        capsys,
        ["preprocess", src, "-o", src, "--overwrite", "--no-progress"],
        "lies inside the output",
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "important.txt").write_text("keep me")
    _fails(
        capsys,
        ["preprocess", src / "a.txt", "-o", other, "--overwrite", "--no-progress"],
        "holds no shards",
    )
    assert (other / "important.txt").read_text() == "keep me" and (src / "a.txt").exists()
    _fails(
        capsys,
        [
            "preprocess",
            src,
            "-o",
            tmp_path / "o",
            "--tokenizer",
            "bpe",
            "--special-tokens",
            "<sep>,<pad>",
        ],
        "end-of-text token",
    )


def test_resume_and_eval_refuse_other_optimizer_tokenizer_stream(trained, capsys, tmp_path):
    d, data = trained
    base = ["train", "--no-progress", *MICRO, "sample.max_new_tokens=0"]
    run = _copy_run(d, "optim")
    _fails(
        capsys,
        [*base, *data, "training.optimizer.name=sgd", f"training.output_dir={run}", "--resume"],
        "was trained with AdamW, this run uses SGD",
    )
    # eval under another tokenizer: BPE shards against a byte-level model.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("ternary weights learn to predict text " * 200)
    assert (
        main(
            [
                "preprocess",
                str(src),
                "-o",
                str(tmp_path / "bpe"),
                "--tokenizer",
                "bpe",
                "--vocab-size",
                "300",
                "--val-fraction",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    _fails(
        capsys,
        ["eval", d / "run", "data.source=shards", f"data.shards_dir={tmp_path / 'bpe'}"],
        "was trained with tokenizer byte",
    )
    # eval on other validation text, whatever the run was trained on.
    assert main(["eval", str(d / "run"), f"data.val_files={d / 'other.txt'}"]) == 0
    capsys.readouterr()
    # A stream resumes only on the same files and worker count.
    stream = [
        *base,
        "data.source=stream",
        f"data.train_files={d / 'train.txt'}",
        "training.max_steps=4",
        "training.save_every=2",
    ]
    out = tmp_path / "stream"
    assert main([*stream, f"training.output_dir={out}"]) == 0
    capsys.readouterr()
    _fails(
        capsys,
        [
            *stream,
            f"training.output_dir={out}",
            "training.max_steps=6",
            "training.dataloader_workers=2",
            "--resume",
        ],
        "dataloader_workers=0",
    )
    _fails(
        capsys,
        [
            *stream[:-2],
            f"data.train_files={d / 'other.txt'}",
            "training.max_steps=6",
            f"training.output_dir={out}",
            "--resume",
        ],
        "other data",
    )


def test_stream_errors_in_workers_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 50 + '{"other": 1}\n')
    _fails(
        capsys,
        [
            "train",
            "--no-progress",
            *MICRO,
            "data.source=stream",
            f"data.train_files={bad}",
            "training.max_steps=50",
            "training.dataloader_workers=2",
            f"training.output_dir={tmp_path / 'r'}",
        ],
        "bad.jsonl:51: no 'text' field",
    )


def test_augment_with_stream_is_refused(capsys, tmp_path):
    _fails(
        capsys,
        [
            "train",
            "data.source=stream",
            f"data.train_files={tmp_path}",
            "data.augment.mask_prob=0.2",
        ],
        "data.augment='on' is invalid",
    )


def test_options_without_effect_are_refused(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("text " * 50)
    _fails(
        capsys,
        ["preprocess", tmp_path / "a.txt", "-o", tmp_path / "o", "--vocab-size", "500"],
        "apply to --tokenizer bpe only",
    )
    _fails(
        capsys,
        [
            "train",
            "training.optimizer.latent_clip=2",
        ],
        "'training.optimizer.latent_clip'",
    )


def test_peft_settings_that_cannot_apply(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "q"
    _fails(capsys, ["train", "peft.method=qlora", f"training.output_dir={out}"],
           "peft.method=qlora needs quantize=false")  # fmt: skip
    _fails(capsys, ["train", "peft.method=lora", "peft.base_dtype=bfloat16",
                    f"training.output_dir={out}"], "this base is ternary")  # fmt: skip
    _fails(capsys, ["train", "training.optimizer.paged=true", "training.device=cpu",
                    f"training.output_dir={out}"], "paged=true needs a CUDA GPU")  # fmt: skip
    assert not out.exists()  # nothing written half-way


def test_distillation_from_a_run_of_ours_and_its_refusals(tmp_path, capsys):
    data = write_corpus(tmp_path)
    common = ["--no-progress", *MICRO, *data, "training.max_steps=3", "sample.max_new_tokens=0"]
    teacher = tmp_path / "teacher"
    assert main(["train", *common, "quantize=false", f"training.output_dir={teacher}"]) == 0
    student = tmp_path / "student"
    code = main(["train", *common, f"teacher.pretrained={teacher}",
                 "loss.distill.relation_weight=10", f"training.output_dir={student}"])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == 3
    missing = tmp_path / "nowhere"
    _fails(capsys, ["train", *common, f"teacher.pretrained={missing}",
                    f"training.output_dir={tmp_path / 'x'}"], "teacher.pretrained=")  # fmt: skip
    _fails(capsys, ["train", *common, "model.vocab_size=300", f"teacher.pretrained={teacher}",
                    f"training.output_dir={tmp_path / 'y'}"], "vocabulary")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_review_findings_are_refused_up_front(tmp_path, capsys):
    pytest.importorskip("peft")
    data = write_corpus(tmp_path)
    common = ["--no-progress", *MICRO, *data, "training.max_steps=2", "sample.max_new_tokens=0"]
    base = tmp_path / "base"
    assert main(["train", *common, "quantize=false", f"training.output_dir={base}"]) == 0
    lora = tmp_path / "lora"
    shared = ["--no-progress", *data, "data.seq_len=32", "training.batch_size=4",
              "training.mixed_precision=fp32", "sample.max_new_tokens=0",
              "training.max_steps=2"]  # fmt: skip
    peft_args = [*shared, "quantize=false", f"model.pretrained={base}", "peft.method=lora"]
    assert main(["train", *peft_args, f"training.output_dir={lora}"]) == 0
    # resuming with other adapter settings: refused (the adapters were trained with these)
    _fails(capsys, ["train", "--resume", *peft_args, "peft.alpha=32", "training.max_steps=3",
                    f"training.output_dir={lora}"], "was trained with peft.alpha=16.0")  # fmt: skip
    # refit has nothing to re-fit on a full-precision base
    _fails(capsys, ["merge", lora, "-o", tmp_path / "m", "--method", "refit"],
           "re-fits a ternary layer's scale")  # fmt: skip
    assert not (tmp_path / "m").exists()
    # the run-of-ours base changed under the PEFT run: refused, not silently used
    capsys.readouterr()
    assert main(["train", *common, "quantize=false", "training.seed=7", "--overwrite",
                 f"training.output_dir={base}"]) == 0  # fmt: skip
    _fails(capsys, ["eval", lora], "the base model changed since this run started")


def test_a_validation_split_that_finds_nothing_to_split_says_so(tmp_path, capsys, caplog):
    caplog.set_level("WARNING")
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph of text, one document, " * 40)
    args = ["train", "--no-progress", *MICRO, f"data.train_files={one}",
            "data.val_fraction=0.5", "training.max_steps=1", "sample.max_new_tokens=0",
            f"training.output_dir={tmp_path / 'r'}"]  # fmt: skip
    assert main(args) == 0
    assert "data.val_fraction=0.5 left no validation text" in caplog.text
