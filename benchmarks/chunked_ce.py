"""Chunked cross-entropy: peak memory and time of the loss over a large vocabulary.

The plain loss makes the (tokens, vocab) logits, their float32 copy and the softmax's
gradient; the chunked one (`loss.chunk_size`) never holds more than one chunk's float32
logits, and recomputes them in the backward. Measured here for the head's matmul plus the loss,
forward and backward, on `--tokens` tokens of width `--hidden` over a `--vocab` vocabulary
(default 4,096 x 1,024 over 32,768: a batch of 4 x 1,024 tokens of a Llama-size vocabulary),
float32, each variant in a fresh process; peak = malloc's bytes in use sampled after every
ATen op, above the inputs. Never asserts anything: it prints a table.

    python benchmarks/chunked_ce.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bitnet_training.loss import causal_lm_loss, chunked_causal_lm_loss
from qat_overhead import PeakHeap


def child(args) -> None:
    torch.manual_seed(0)
    h = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    w = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens))

    def step():
        if args.chunk:
            loss = chunked_causal_lm_loss(h, w, labels, chunk_size=args.chunk)
        else:
            loss = causal_lm_loss(F.linear(h, w), labels)
        loss.backward()
        h.grad = w.grad = None
        return float(loss)

    step()  # warm-up
    with PeakHeap() as tracker:
        t = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - t
    print(json.dumps({"peak": tracker.peak - tracker.base, "s": seconds, "loss": loss}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--chunks", default="0,4096,1024,256", help="0: the plain loss")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    threads = torch.get_num_threads()
    print(f"# {args.tokens} tokens x {args.hidden} -> vocabulary {args.vocab}, float32, "
          f"forward + backward, torch {torch.__version__}, {threads} threads\n")  # fmt: skip
    print("| loss | chunk | peak MiB | vs plain | time s | loss value |")
    print("|---|---:|---:|---:|---:|---:|")
    plain = None
    for chunk in map(int, args.chunks.split(",")):
        cmd = [sys.executable, __file__, "--child", "--chunk", str(chunk),
               "--tokens", str(args.tokens), "--hidden", str(args.hidden),
               "--vocab", str(args.vocab)]  # fmt: skip
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        plain = plain or r
        name = "chunked" if chunk else "plain"
        ratio = r["peak"] / plain["peak"]
        print(f"| {name} | {chunk or '-'} | {r['peak'] / 2**20:,.0f} | {ratio:.2f} | "
              f"{r['s']:.2f} | {r['loss']:.6f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
