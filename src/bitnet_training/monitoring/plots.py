"""`plot_runs`: the figures a person looks at instead of reading metrics.jsonl (matplotlib).

One PNG with four panels, one line per run (several runs compare on the same axes):
training loss (and validation loss, dashed), learning rate, the ternary share of -1 / 0 / +1
(quantized runs), and the flip rate (share of ternary codes that changed between log steps).
A panel with nothing logged says so instead of staying blank.
"""

from __future__ import annotations

import json
import os

from ..atomic import atomic_file
from ..errors import BitNetError


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of `run_dir`'s metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise BitNetError(f"{run_dir!r} has no metrics.jsonl (not a training run's directory)")
    train, evals = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise BitNetError(f"{path}: line {i} is not JSON") from None
            if not isinstance(row, dict) or "step" not in row:
                raise BitNetError(f"{path}: line {i} is not a metrics record")
            (evals if row.get("kind") == "eval" else train).append(row)
    if not train and not evals:
        raise BitNetError(f"{path} is empty: the run logged nothing yet")
    return train, evals


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: list[str], out_path: str) -> str:
    """Write the figure of `run_dirs` (one or more run directories) to `out_path` (PNG,
    atomically) and return `out_path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise BitNetError("plot needs matplotlib (pip install 'bitnet-training[plots]')") from None
    if not run_dirs:
        raise BitNetError("plot needs at least one run directory")
    runs = [(os.path.basename(os.path.abspath(d)), *read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    (loss_ax, lr_ax), (tern_ax, flip_ax) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = {"loss": False, "lr": False, "tern": False, "flip": False}
    for i, (name, train, evals) in enumerate(runs):
        c = colors[i % len(colors)]
        label = name if len(runs) > 1 else "train"
        x, y = _series(train, "loss")
        if x:
            loss_ax.plot(x, y, color=c, label=label)
            drawn["loss"] = True
        x, y = _series(evals, "val_loss")
        if x:
            vlabel = f"{name} (val)" if len(runs) > 1 else "validation"
            loss_ax.plot(x, y, color=c, ls="--", marker="o", ms=3, label=vlabel)
            drawn["loss"] = True
        x, y = _series(train, "lr")
        if x:
            lr_ax.plot(x, y, color=c, label=name)
            drawn["lr"] = True
        for key, ls, text in (("w_neg", ":", "-1"), ("w_zero", "-", "0"), ("w_pos", "--", "+1")):
            x, y = _series(train, key)
            if x:
                prefix = f"{name} " if len(runs) > 1 else ""
                tern_ax.plot(x, y, color=c, ls=ls, label=f"{prefix}{text}")
                drawn["tern"] = True
        x, y = _series(train, "flip_rate")
        if x:
            flip_ax.plot(x, y, color=c, label=name)
            drawn["flip"] = True
    titles = {
        "loss": (loss_ax, "loss (nats per token)"),
        "lr": (lr_ax, "learning rate"),
        "tern": (tern_ax, "ternary share of weights"),
        "flip": (flip_ax, "flip rate between log steps"),
    }
    for key, (ax, title) in titles.items():
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if drawn[key]:
            if key in ("loss", "tern") or len(runs) > 1:
                ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    if drawn["flip"]:
        flip_ax.set_yscale("log")
    names = ", ".join(n for n, _, _ in runs)
    fig.suptitle(names if len(names) < 90 else f"{len(runs)} runs")
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out_path
