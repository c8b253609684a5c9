"""The original design's performance and memory tables, planned (`bitnet_training.planner`):
what a GPU needs per device for each row, so its claims can be checked before a GPU is lent.
Sequence length 2048 (the design names none), bf16 autocast, AdamW unless said; LLaMA's 7B /
13B shapes. Prints tables; asserts nothing.

    python benchmarks/plan_tables.py
"""

from __future__ import annotations

from bitnet_training.config import load_config
from bitnet_training.planner import GIB, Layout, plan, shape_overrides


def total(shape: str, extra: list[str], layout: Layout | None = None) -> tuple[float, dict]:
    cfg = load_config(None, [*shape_overrides(shape), "data.seq_len=2048", *extra])
    p = plan(cfg, layout or Layout(), device="cuda")
    return p.total / GIB, p.components


def main() -> None:
    print("## Training rows of the design (BitNet QAT, AdamW), planned GiB per GPU\n")
    print("| model | batch | design says | planned | + act. ckpt | + act. ckpt, 8-bit AdamW |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape, batch, says in (("7b", 8, 24), ("7b", 16, 40), ("13b", 4, 24), ("13b", 8, 48)):
        b = f"training.batch_size={batch}"
        plain = total(shape, [b])[0]
        ac = total(shape, [b, "training.activation_checkpointing=true"])[0]
        ac8 = total(shape, [b, "training.activation_checkpointing=true",
                            "training.optimizer.name=adamw8bit"])[0]  # fmt: skip
        print(f"| {shape} | {batch} | {says} | {plain:.0f} | {ac:.0f} | {ac8:.0f} |")
    print("\n## Memory by method (7B, batch 1 x 2048, activation checkpointing)\n")
    print("| method | design says | planned GiB | vs full fine-tuning | weights | optimizer |")
    print("|---|---:|---:|---:|---:|---:|")
    ac = ["training.batch_size=1", "training.activation_checkpointing=true"]
    rows = [
        ("full fine-tuning", "100%", ["quantize=false"]),
        ("LoRA r=16", "25%", ["quantize=false", "peft.method=lora", "peft.rank=16"]),
        ("QLoRA (NF4) r=16", "15%", ["quantize=false", "peft.method=qlora", "peft.rank=16"]),
        ("1.58-bit QLoRA r=16", "-", ["peft.method=qlora_ternary", "peft.rank=16"]),
        ("BitNet QAT", "30%", []),
        ("BitNet QAT, weight cache off", "-", ["qat.cache_quantized_weight=false"]),
    ]
    full = None
    for name, says, extra in rows:
        t, c = total("7b", [*ac, *extra])
        full = full or t
        print(f"| {name} | {says} | {t:.1f} | {100 * t / full:.0f}% | "
              f"{c['weights'] / GIB:.1f} | {c['optimizer states'] / GIB:.1f} |")  # fmt: skip
    print("\n## Scaling rows (7B BitNet QAT, batch 1 x 2048 per GPU, act. ckpt), FSDP\n")
    print("| GPUs | design says GB per GPU | planned GiB per GPU |")
    print("|---:|---:|---:|")
    for n, says in ((1, 24), (2, 12), (4, 6), (8, 3)):
        t = total("7b", ac, Layout(fsdp=n) if n > 1 else None)[0]
        print(f"| {n} | {says} | {t:.1f} |")


if __name__ == "__main__":
    main()
