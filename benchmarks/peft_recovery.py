"""PEFT recovery: how much of ternarization's loss LoRA on a frozen ternary base wins back.

A full-precision BitNetLM (`quantize=false`, preset `tiny` by default) is trained on the
embedded corpus, then ternarized (`model.pretrained=<that run>`, `quantize=true`: ternary
absmean weights, 8-bit activations, switched on at once). From those same weights, the same
step budget and schedule (cosine, 10% warm-up) is spent on:

  fp             no quantization, all weights train (LR --lr-qat): the reference, since the
                 full-precision start is not converged and every run below keeps learning
  (a) full QAT   every weight trains through the quantizer (LR --lr-qat)
  (b) LoRA       rank 16 on every linear but the head, the ternary base frozen (LR --lr-lora)
  (c) merged     (b)'s adapters merged into the ternary base by `recipe.merge_run`, which
                 measures `requantize` and `refit` on held-out batches and keeps the better

Printed for each: validation bits per byte (the whole validation split, bf16 autocast as
training runs), its difference to the fp reference, the share of the ternarization gap
(ternarized before any step vs the fp reference) it closes, the trainable share of the
parameters and the training wall time; also the merge's own measurements. Every run goes
through the library's public API (`config.load_config`, `recipe.train`, `recipe.merge_run`,
`recipe.load_run`), offline, under a temporary directory (or --out). Prints tables; never
asserts anything.

    python benchmarks/peft_recovery.py                  # tiny: ~11 min on 2 idle cores, 21 busy
    python benchmarks/peft_recovery.py --steps-fp 40 --steps 20 --out runs/peft_recovery
    python benchmarks/peft_recovery.py --model small    # the issue's preset (much slower)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time

from torch import nn

from bitnet_training import Trainer, recipe
from bitnet_training.config import load_config
from bitnet_training.data import build_eval_dataset

COMMON = [
    "training.scheduler=cosine",
    "training.log_every=50",
    "training.save_total_limit=1",
    "training.seed=0",
    "sample.max_new_tokens=0",  # no end-of-run sample
]
MERGE_BATCHES = 8  # held-out batches merge_run measures requantize and refit on


def schedule(steps: int, lr: float) -> list[str]:
    """Cosine from `lr` to lr / 10 after a 10% linear warm-up, over `steps` steps."""
    return [
        f"training.max_steps={steps}",
        f"training.learning_rate={lr}",
        f"training.scheduler.warmup_steps={max(1, steps // 10)}",
        f"training.scheduler.eta_min={lr / 10}",
    ]


def trainable_share(model: nn.Module) -> float:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


def train(out: str, name: str, overrides: list[str]) -> dict:
    """Train one run in `<out>/<name>`; its final validation metrics, share and time."""
    cfg = load_config(None, [*COMMON, *overrides, f"training.output_dir={out}/{name}"])
    run, result = recipe.train(cfg, overwrite=True, progress=False)
    m = result.metrics
    print(
        f"{name:8s} {result.steps} steps in {result.wall_time_s:.0f} s: val loss "
        f"{m['val_loss']:.4f}, bits/byte {m['val_bits_per_byte']:.4f}",
        flush=True,
    )
    return {
        "bpb": m["val_bits_per_byte"],
        "share": trainable_share(run.model),
        "time": result.wall_time_s,
    }


def evaluate_unchanged(out: str, overrides: list[str]) -> float:
    """Validation bits/byte of the model a run would start from, before any step."""
    cfg = load_config(None, [*COMMON, *overrides, f"training.output_dir={out}/ternary0"])
    run = recipe.prepare(cfg, overwrite=True, progress=False)
    return run.trainer.evaluate()["val_bits_per_byte"]


def evaluate_run(path: str) -> float:
    """Validation bits/byte of a run directory, as `bitnet-train eval` computes it."""
    cfg, model, tokenizer, _ = recipe.load_run(path)
    cfg.training.eval_steps = None
    val = build_eval_dataset(cfg.data, tokenizer)
    return Trainer(model, cfg.training, None, val).evaluate()["val_bits_per_byte"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model preset of the full-precision run")
    ap.add_argument("--steps-fp", type=int, default=300, help="full-precision training steps")
    ap.add_argument("--steps", type=int, default=150, help="recovery steps of (a) and (b)")
    ap.add_argument("--lr-fp", type=float, default=1.5e-3)
    ap.add_argument("--lr-qat", type=float, default=1e-3)
    ap.add_argument("--lr-lora", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp directory)")
    args = ap.parse_args()
    logging.getLogger("bitnet_training").setLevel(logging.WARNING)

    out = args.out or tempfile.mkdtemp(prefix="peft_recovery_")
    t_all = time.perf_counter()
    try:
        rows = {}
        fp = train(out, "fp", [f"model_preset={args.model}", "quantize=false",
                               *schedule(args.steps_fp, args.lr_fp)])  # fmt: skip
        rows[f"full precision, {args.steps_fp} steps (the start)"] = fp
        ternary = [f"model.pretrained={out}/fp", "quantize=true", "diagnostics=false"]
        bpb0 = evaluate_unchanged(out, [*ternary, *schedule(args.steps, args.lr_qat)])
        rows["ternarized, no recovery"] = {"bpb": bpb0, "share": None, "time": None}
        print(f"ternary0 before any step: bits/byte {bpb0:.4f}", flush=True)
        rows[f"full precision, +{args.steps} steps (reference)"] = ref = train(
            out, "fp_more", [f"model.pretrained={out}/fp", "quantize=false",
                             *schedule(args.steps, args.lr_qat)]
        )  # fmt: skip
        rows["(a) full QAT"] = train(out, "qat", [*ternary, *schedule(args.steps, args.lr_qat)])
        lora = [
            "peft.method=lora",
            f"peft.rank={args.rank}",
            f"peft.alpha={args.rank}",  # scale alpha / r = 1
            "peft.target_modules=all-linear",
        ]
        rows[f"(b) LoRA r={args.rank}, ternary base frozen"] = b = train(
            out, "lora", [*ternary, *lora, *schedule(args.steps, args.lr_lora)]
        )
        merged = os.path.join(out, "merged")
        shutil.rmtree(merged, ignore_errors=True)  # merge_run wants an absent or empty directory
        t0 = time.perf_counter()
        report = recipe.merge_run(os.path.join(out, "lora"), merged, max_batches=MERGE_BATCHES)
        merge_s = time.perf_counter() - t0
        bpb_merged = evaluate_run(merged)
        print(f"merged   {report}\nmerged   bits/byte {bpb_merged:.4f}", flush=True)
        rows[f"(c) (b) merged ({report.method} kept)"] = {
            "bpb": bpb_merged,
            "share": b["share"],
            "time": b["time"] + merge_s,
        }
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    print(
        f"\n{args.model} BitNetLM, embedded corpus, 16 x 256 tokens per step: full precision "
        f"{args.steps_fp} steps (LR {args.lr_fp:g}), then {args.steps} recovery steps each "
        f"(QAT LR {args.lr_qat:g}, LoRA LR {args.lr_lora:g}), cosine schedule\n"
    )
    gap = bpb0 - ref["bpb"]
    print("| model | val bits/byte | vs reference | gap closed | trainable | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        delta = r["bpb"] - ref["bpb"]
        closed = gap > 0 and r is not fp and r is not ref
        recovered = f"{100 * (bpb0 - r['bpb']) / gap:.0f}%" if closed else ""
        share = "-" if r["share"] is None else f"{100 * r['share']:.2f}%"
        secs = "-" if r["time"] is None else f"{r['time']:.0f}"
        print(f"| {name} | {r['bpb']:.4f} | {delta:+.4f} | {recovered} | {share} | {secs} |")
    print(
        f"\n(c) train s includes the merge ({merge_s:.0f} s). The merge's own measurement on "
        f"{MERGE_BATCHES} held-out batches (loss in nats; unmerged: adapters kept separate):\n"
    )
    print("| merge method | loss | unmerged loss | max logit diff |")
    print("|---|---:|---:|---:|")
    for method, v in report.measured.items():
        kept = " (kept)" if method == report.method else ""
        print(
            f"| {method}{kept} | {v['loss']:.4f} | {v['unmerged_loss']:.4f} | "
            f"{v['max_logit_diff']:.2e} |"
        )
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
