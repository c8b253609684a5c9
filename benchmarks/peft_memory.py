"""PEFT memory: peak training memory of full fine-tuning, LoRA, QLoRA, 1.58-bit QLoRA and full
BitNet QAT on one model large enough that weights dominate (the original design's "Memory
Efficiency" table, measured).

Every variant trains the same `BitNetLM` shape (default: hidden 1024, FFN 2816, 24 layers,
16 heads, byte vocabulary: about 300 M parameters) on the same fixed batch under bf16
autocast, each in a fresh process:

  full            all weights train: float32 weights, AdamW (float32 moments)
  lora            LoRA r=16 on every linear but the head; the frozen base stored in bf16
                  (`peft.base_dtype=bfloat16`, bit-identical under bf16 autocast)
  lora_fp32_base  the same with the frozen base left in float32
  qlora           QLoRA: the base in NF4 with double quantization (bitsandbytes), LoRA r=16,
                  8-bit AdamW, activation checkpointing of every block (the QLoRA recipe;
                  its paged optimizer needs a GPU)
  qlora_ternary   1.58-bit QLoRA: the ternary base packed 2 bits per weight, LoRA r=16,
                  8-bit AdamW, activation checkpointing
  bitnet_qat      full BitNet b1.58 QAT: BitLinear everywhere, float32 latent weights, AdamW

Peak memory is what `benchmarks/qat_overhead.py` measures, plus what stays resident: malloc's
bytes in use (PyTorch's CPU allocator is malloc), sampled after every ATen op of the second
training step, minus the bytes in use before the model was built. So it counts the weights,
the optimizer states and the step's activations and gradients, not the Python interpreter or
libraries (which RSS would). The first step allocates the optimizer states; building a
variant (the float32 model NF4 or packing start from) is not part of its peak, as a base
loaded straight into its storage format would not be. Never asserts anything: it prints a
table.

    python benchmarks/peft_memory.py                      # the table (~10 min on 2 cores)
    python benchmarks/peft_memory.py --layers 4 --steps 2 # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

from bitnet_training import BitNetLM, ModelConfig
from bitnet_training.distributed.activation_checkpoint import apply_activation_checkpointing
from bitnet_training.optim import OptimizerConfig, build_optimizer
from bitnet_training.peft import PEFTConfig, apply_peft
from qat_overhead import PeakHeap, _heap_in_use

VARIANTS = ("full", "lora", "lora_fp32_base", "qlora", "qlora_ternary", "bitnet_qat")


def model_config(args) -> ModelConfig:
    return ModelConfig(
        vocab_size=320,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(256, args.seq),
    )


def build(variant: str, cfg: ModelConfig, rank: int):
    """(model, optimizer) of a variant; the model's trainable share is in the report."""
    torch.manual_seed(0)
    lora = dict(rank=rank, alpha=2.0 * rank, target_modules=["all-linear"])
    adamw, adamw8bit = OptimizerConfig(), OptimizerConfig(name="adamw8bit")
    if variant in ("full", "bitnet_qat"):
        model = BitNetLM.bitnet(cfg) if variant == "bitnet_qat" else BitNetLM(cfg)
        return model, build_optimizer(model, adamw, 1e-4)
    if variant in ("lora", "lora_fp32_base"):
        dtype = "bfloat16" if variant == "lora" else "float32"
        model, _ = apply_peft(BitNetLM(cfg), PEFTConfig(method="lora", base_dtype=dtype, **lora))
        return model, build_optimizer(model, adamw, 1e-4)
    if variant == "qlora":
        model, _ = apply_peft(BitNetLM(cfg), PEFTConfig(method="qlora", **lora))
    else:
        model, _ = apply_peft(BitNetLM.bitnet(cfg), PEFTConfig(method="qlora_ternary", **lora))
    apply_activation_checkpointing(model)  # QLoRA's recipe: blocks recomputed in the backward
    return model, build_optimizer(model, adamw8bit, 1e-4)


def child(args) -> None:
    """In a fresh process: resident bytes after the first step, peak bytes in the second,
    both above the heap before the model existed; trainable share; median step time."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = model_config(args)
    for lib in ("peft", "bitsandbytes"):  # imported first: their modules are not the model's
        __import__(lib)
    gc.collect()
    before = _heap_in_use()
    model, opt = build(args.variant, cfg, args.rank)
    gc.collect()
    model.train()
    ids = torch.randint(0, 320, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocates the optimizer states
    gc.collect()
    resident = _heap_in_use() - before
    with PeakHeap() as tracker:
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {
        "resident": resident,
        "peak": tracker.peak - before,
        "trainable": trainable,
        "step_s": statistics.median(times) if times else float("nan"),
    }
    print(json.dumps(out))


def run_child(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant]
    for k in ("hidden", "ffn", "layers", "heads", "batch", "seq", "rank", "steps", "threads"):
        cmd += [f"--{k}", str(getattr(args, k))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="full", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    cfg = model_config(args)
    n = cfg.num_parameters()
    print(
        f"# BitNetLM {n / 1e6:.0f} M parameters (hidden {args.hidden}, FFN {args.ffn}, "
        f"{args.layers} layers), batch {args.batch} x {args.seq} tokens, bf16 autocast, "
        f"LoRA r={args.rank} on every linear but the head, torch {torch.__version__}, "
        f"{args.threads or torch.get_num_threads()} threads\n"
    )
    print(
        "| variant | trainable | resident MiB | peak MiB | peak vs full | step s | step vs full |"
    )
    print("|---|---|---|---|---|---|---|")
    results = {}
    for v in args.variants.split(","):
        r = results[v] = run_child(args, v)
        full = results.get("full", r)
        print(
            f"| {v} | {100 * r['trainable'] / n:.2f}% | {r['resident'] / 2**20:,.0f} | "
            f"{r['peak'] / 2**20:,.0f} | {100 * r['peak'] / full['peak']:.1f}% | "
            f"{r['step_s']:.2f} | {r['step_s'] / full['step_s']:.2f} |",
            flush=True,
        )
    print(
        "\n(resident: weights, optimizer states and what else stays allocated after a step; "
        "peak: the most in use during a step; both above the heap before the model existed)"
    )


if __name__ == "__main__":
    main()
