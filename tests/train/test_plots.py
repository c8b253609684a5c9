"""`bitnet-train plot`: PNG figures of one run and of several compared; bad inputs are
one-line errors that write nothing."""

import json

import pytest

from bitnet_training.cli import main

pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra; not installed here")

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(d, scale=1.0):
    d.mkdir()
    rows = [
        {"kind": "train", "step": s, "loss": scale * 4 / s, "lr": 1e-3, "w_neg": 0.34,
         "w_zero": 0.31, "w_pos": 0.35, **({"flip_rate": 0.1 / s} if s > 1 else {})}
        for s in range(1, 11)
    ] + [{"kind": "eval", "step": 10, "val_loss": scale * 0.5}]  # fmt: skip
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_one_run_and_a_comparison(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", 2.0)
    assert main(["plot", str(a)]) == 0
    png = a / "plots" / "training.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    assert main(["plot", str(a), str(b)]) == 0
    compare = tmp_path / "compare.png"
    assert compare.read_bytes()[:8] == PNG
    assert "wrote" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metrics.jsonl").write_text("not json\n")
    for argv, message in [
        (["plot", str(empty)], "has no metrics.jsonl"),
        (["plot", str(tmp_path / "junk")], "line 1 is not JSON"),
        (
            ["plot", str(fake_run(tmp_path / "ok")), "-o", str(tmp_path / "x.jpg")],
            "must name a .png",
        ),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("*.png"))
