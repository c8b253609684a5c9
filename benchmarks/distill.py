"""Distillation into 1.58 bits: plain QAT against logit distillation and BitDistill.

A full-precision BitNetLM teacher (`quantize=false`, preset `tiny` by default, `--model small`
for the issue's preset) is trained on the embedded corpus. Its ternarized copy
(`model.pretrained=<teacher>`, `quantize=true`) is then trained for the same step budget and
schedule three ways:

  (a) plain QAT     the student's own next-token cross-entropy
  (b) logits KD     + logits KL at temperature 5, weight 10 (BitDistill's logit term)
  (c) BitDistill    + (b) + Q / K / V attention-relation KL on the last layer, weight 1e5
                    (arXiv 2510.13998's defaults; `teacher.pretrained=<teacher>`)

and the teacher itself trains on for the same steps (the reference: the teacher is not
converged, so every run keeps learning). Printed: validation bits per byte of each (the
whole validation split), its difference to the reference, the share of the ternarization
gap it closes, and the training wall time (distillation runs the teacher's forward too).
Uses the library's public API, offline, under a temporary directory (or --out). Prints
tables; never asserts anything.

    python benchmarks/distill.py                   # ~15 min on 2 cores (tiny)
    python benchmarks/distill.py --model small     # the issue's preset (much slower)
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time

from peft_recovery import evaluate_unchanged, schedule, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model preset of the teacher")
    ap.add_argument("--steps-fp", type=int, default=300, help="teacher training steps")
    ap.add_argument("--steps", type=int, default=150, help="student steps of each variant")
    ap.add_argument("--lr-fp", type=float, default=1.5e-3)
    ap.add_argument("--lr", type=float, default=1e-3, help="the students' peak LR")
    ap.add_argument("--relation-weight", type=float, default=1e5)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp directory)")
    args = ap.parse_args()
    logging.getLogger("bitnet_training").setLevel(logging.WARNING)

    out = args.out or tempfile.mkdtemp(prefix="distill_")
    t_all = time.perf_counter()
    try:
        rows = {}
        teacher = f"{out}/teacher"
        rows[f"teacher, {args.steps_fp} steps (the start)"] = t = train(
            out, "teacher", [f"model_preset={args.model}", "quantize=false",
                             *schedule(args.steps_fp, args.lr_fp)]
        )  # fmt: skip
        student = [f"model.pretrained={teacher}", "quantize=true", "diagnostics=false",
                   *schedule(args.steps, args.lr)]  # fmt: skip
        bpb0 = evaluate_unchanged(out, student)
        rows["ternarized, no training"] = {"bpb": bpb0, "share": None, "time": None}
        print(f"ternary0 before any step: bits/byte {bpb0:.4f}", flush=True)
        rows[f"teacher, +{args.steps} steps (reference)"] = ref = train(
            out, "teacher_more", [f"model.pretrained={teacher}", "quantize=false",
                                  *schedule(args.steps, args.lr)]
        )  # fmt: skip
        kd = [f"teacher.pretrained={teacher}", "loss.distill.logit_weight=10",
              "loss.distill.temperature=5"]  # fmt: skip
        rows["(a) plain QAT"] = train(out, "qat", student)
        rows["(b) + logits KD (T=5, weight 10)"] = train(
            out, "kd", [*student, *kd, "loss.distill.relation_weight=0"]
        )
        rows[f"(c) BitDistill: + relations (weight {args.relation_weight:g})"] = train(
            out,
            "bitdistill",
            [*student, *kd, f"loss.distill.relation_weight={args.relation_weight}"],
        )
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    print(
        f"\n{args.model} BitNetLM, embedded corpus, 16 x 256 tokens per step: teacher "
        f"{args.steps_fp} steps (LR {args.lr_fp:g}), then {args.steps} steps each (LR "
        f"{args.lr:g}), cosine schedule\n"
    )
    gap = bpb0 - ref["bpb"]
    print("| model | val bits/byte | vs reference | gap closed | train s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        closed = gap > 0 and r is not t and r is not ref and r["time"] is not None
        recovered = f"{100 * (bpb0 - r['bpb']) / gap:.0f}%" if closed else ""
        secs = "-" if r["time"] is None else f"{r['time']:.0f}"
        print(f"| {name} | {r['bpb']:.4f} | {r['bpb'] - ref['bpb']:+.4f} | {recovered} | {secs} |")
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
