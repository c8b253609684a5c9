"""What ternary diagnostics cost: one `TernaryDiagnostics` measurement (every BitLinear's
share of -1 / 0 / +1, flip rate and quantization error) against one training step of the
`tiny` BitNetLM (forward, backward, AdamW; bf16 autocast; 16 x 256 tokens), timed
alternately in one process. Prints the ratio per measurement and amortized over a log
interval; asserts nothing.

    python benchmarks/diagnostics_cost.py [--repeats 10] [--log-every 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bitnet_training import BitNetLM
from bitnet_training.nn import TernaryDiagnostics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = BitNetLM.bitnet("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (16, 256))
    diag = TernaryDiagnostics()
    diag.setup(type("T", (), {"model": model})())

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s, diag_s = [], []
    for i in range(args.repeats + 2):
        t = time.perf_counter()
        step()
        t1 = time.perf_counter()
        diag.measure()
        t2 = time.perf_counter()
        if i >= 2:  # warm-up: first steps allocate, the first measurement has no flips
            step_s.append(t1 - t)
            diag_s.append(t2 - t1)
    s, d = statistics.median(step_s), statistics.median(diag_s)
    n = sum(1 for _ in diag.layers)
    print(
        f"tiny BitNetLM, {n} BitLinear layers, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| training step ms | diagnostics ms | diagnostics / step | amortized over "
        f"log_every={args.log_every} |"
    )
    print("|---:|---:|---:|---:|")
    print(f"| {s * 1e3:.0f} | {d * 1e3:.1f} | {d / s:.3f} | {d / s / args.log_every:.4f} |")


if __name__ == "__main__":
    main()
