"""How to turn a trained full-precision model into a 1.58-bit one: four recipes compared.

A full-precision `tiny` BitNetLM is trained briefly on the embedded corpus. From those same
weights, each recipe then trains the same number of steps with the same optimizer and
schedule, and is evaluated on the validation split:

  fp          keep training in full precision: the reference line
  (a) at once quantization (ternary weights, 8-bit activations) switched on at step 0
  (b) lambda  progressive warm-up: y = x + lambda * stopgrad(q(x) - x), lambda linear 0 -> 1
              over the first half (weights and activations)
  (c) stages  weight bit width 8 -> 4 -> 2 -> 1.58, a quarter of the steps each
  (d) lambda + Quant-Noise   (b), with half the weight blocks quantized per forward (p = 0.5)

Also printed: each model's loss right at conversion (step 0, no training). Prints a table;
asserts nothing.

    python benchmarks/qat_recipes.py                      # ~10 min on 2 cores
    python benchmarks/qat_recipes.py --pretrain-steps 40 --steps 40
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from bitnet_training import BitNetLM, QATConfig, Trainer, TrainingConfig
from bitnet_training.data import ByteTokenizer, build_datasets
from bitnet_training.data.config import DataConfig
from bitnet_training.nn import QATControl
from bitnet_training.optim import SchedulerConfig


def recipes(steps: int) -> dict[str, QATConfig | None]:
    half, q = steps // 2, steps // 4
    ramp = {"shape": "linear", "start_step": 0, "end_step": half}
    return {
        "fp": None,
        "(a) at once": QATConfig(),
        "(b) lambda": QATConfig(weight_schedule=ramp, activation_schedule=ramp),
        "(c) stages": QATConfig(weight_bit_stages=[(0, 8), (q, 4), (2 * q, 2), (3 * q, 1.58)]),
        "(d) lambda + Quant-Noise": QATConfig(
            weight_schedule=ramp, activation_schedule=ramp, quant_noise=0.5
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    data = build_datasets(DataConfig(seq_len=args.seq_len), ByteTokenizer())
    tmp = tempfile.mkdtemp(prefix="qat_recipes_")

    def config(name: str, steps: int, lr: float, sched: SchedulerConfig) -> TrainingConfig:
        return TrainingConfig(
            learning_rate=lr,
            batch_size=args.batch_size,
            max_steps=steps,
            scheduler=sched,
            eval_steps=args.eval_batches,
            log_every=50,
            save_total_limit=1,
            output_dir=f"{tmp}/{name}",
            seed=0,
        )

    torch.manual_seed(0)
    fp = BitNetLM("tiny")
    t0 = time.perf_counter()
    pre = Trainer(
        fp,
        config("pretrain", args.pretrain_steps, 1.5e-3, SchedulerConfig("cosine", warmup_steps=20)),
        data.train,
        data.val,
    )
    pre_metrics = pre.train().metrics
    weights = {k: v.clone() for k, v in fp.state_dict().items()}
    print(
        f"pretrained full precision for {args.pretrain_steps} steps: val loss "
        f"{pre_metrics['val_loss']:.4f}, bits/byte {pre_metrics['val_bits_per_byte']:.3f} "
        f"({time.perf_counter() - t0:.0f} s)\n"
    )

    rows = []
    for name, qat in recipes(args.steps).items():
        model = BitNetLM.bitnet("tiny", qat) if qat else BitNetLM("tiny")
        model.load_state_dict(weights)
        sched = SchedulerConfig("cosine", warmup_steps=10, eta_min=1e-4)
        cfg = config(name.split()[0].strip("()"), args.steps, 1e-3, sched)
        callbacks = [QATControl()] if qat is not None else []
        for m in model.modules():  # the step-0 view: lambda, stage and noise at step 0
            if hasattr(m, "set_progress"):
                m.set_progress(0)
        at_conversion = Trainer(model, cfg, None, data.val).evaluate()["val_loss"]
        trainer = Trainer(model, cfg, data.train, data.val, callbacks)
        t0 = time.perf_counter()
        result = trainer.train()
        m = result.metrics
        rows.append(
            (name, at_conversion, m["val_loss"], m["val_bits_per_byte"], time.perf_counter() - t0)
        )
        print(f"{name:28s} done: val loss {m['val_loss']:.4f}")

    print(
        f"\n{args.steps} steps each from the same full-precision weights "
        f"({args.batch_size} x {args.seq_len} tokens per step):\n"
    )
    print("| recipe | val loss at step 0 | val loss | val bits/byte | perplexity | time s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, l0, loss, bpb, secs in rows:
        print(f"| {name} | {l0:.3f} | {loss:.4f} | {bpb:.3f} | {math.exp(loss):.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
