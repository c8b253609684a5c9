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
    ],
)
def test_more_bad_values(capsys, tmp_path, override, message):
    _fails(capsys, ["train", override, f"training.output_dir={tmp_path / 'r'}"], message)
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
