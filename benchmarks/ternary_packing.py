"""Ternary packing throughput: pack / unpack speed (million codes per second) and bits per
weight of each format of `bitnet_training.quant.packing`, on a 4096 x 4096 code tensor.

Also times the two unpacking methods considered (a 256-entry lookup table through
`index_select`, which the library uses, against shifting and masking / dividing) as a ratio
in the same process. Best of `--repeats` runs after a warm-up; prints tables, asserts nothing.

    python benchmarks/ternary_packing.py [--size 4096] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from bitnet_training.quant.packing import (
    pack_2bit,
    pack_base3,
    pack_ternary_transformers,
    unpack_2bit,
    unpack_base3,
    unpack_ternary,
)


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lookup table on the device
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def shift_unpack_2bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The alternative to the lookup table: shift and mask each of the 4 bit fields."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return (((packed.unsqueeze(-1) >> shifts) & 3).view(torch.int8) - 1).reshape(-1)[:numel]


def divide_unpack_base3(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The alternative to the lookup table: integer division by 3^j, modulo 3."""
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)
    digits = (packed.unsqueeze(-1) // powers) % 3
    return (digits.view(torch.int8) - 1).reshape(-1)[:numel]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="the code tensor is size x size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (args.size, args.size), generator=g, dtype=torch.int8)
    n = codes.numel()
    formats = {
        "2bit": (pack_2bit, lambda p: unpack_2bit(p, n, check=False)),
        "base3": (pack_base3, lambda p: unpack_base3(p, n, check=False)),
        "transformers": (pack_ternary_transformers, lambda p: unpack_ternary(p, args.size)),
    }
    print(f"{args.size} x {args.size} int8 codes, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; best of {args.repeats}")  # fmt: skip
    print(f"{'format':<14}{'bits/weight':>12}{'pack Mcodes/s':>16}{'unpack Mcodes/s':>18}")
    packed_of = {}
    for name, (pack, unpack) in formats.items():
        packed = pack(codes)
        packed_of[name] = packed
        t_pack = best_seconds(lambda pack=pack: pack(codes), args.repeats)
        t_unpack = best_seconds(lambda unpack=unpack, p=packed: unpack(p), args.repeats)
        bits = 8 * packed.numel() / n
        print(f"{name:<14}{bits:>12.3f}{n / t_pack / 1e6:>16.0f}{n / t_unpack / 1e6:>18.0f}")
    print("\n(transformers' unpack validates its bytes: one extra pass and a host sync.)")

    print(f"\n{'unpack method':<34}{'Mcodes/s':>10}{'vs lookup':>11}")
    rows = [
        ("2bit lookup table (library)", lambda: unpack_2bit(packed_of["2bit"], n, check=False)),
        ("2bit shift and mask", lambda: shift_unpack_2bit(packed_of["2bit"], n)),
        ("base3 lookup table (library)", lambda: unpack_base3(packed_of["base3"], n, check=False)),
        ("base3 divide and modulo", lambda: divide_unpack_base3(packed_of["base3"], n)),
    ]
    base = None
    for label, fn in rows:
        t = best_seconds(fn, args.repeats)
        base = t if "library" in label else base
        print(f"{label:<34}{n / t / 1e6:>10.0f}{base / t:>10.2f}x")


if __name__ == "__main__":
    main()
