"""Data throughput: preprocessing (MB/s, tokens/s) and loaders (tokens/s) against what the
`tiny` model's training step consumes. Target: every loader >= 10x faster than training.

The input is the embedded corpus written `--copies` times as JSON lines (one document per
line) into a temporary directory. Loaders are timed the way the Trainer uses them (indexing
and collating batches of 16 x 256 tokens; streaming through a DataLoader); training is timed
on the same batch shape (bf16, forward + backward + AdamW). Prints tables; asserts nothing.

    python benchmarks/data_throughput.py [--copies 8] [--batches 200]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader, default_collate

from bitnet_training import BitNetLM
from bitnet_training.data import (
    ByteTokenizer,
    PreprocessConfig,
    ShardDataset,
    StreamingTextDataset,
    TokenWindowDataset,
    embedded_corpus,
    preprocess,
)
from bitnet_training.data.sampler import ResumableBatchSampler

SEQ, BATCH = 256, 16


def training_tokens_per_s(steps: int = 4) -> float:
    torch.manual_seed(0)
    model = BitNetLM.bitnet("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (BATCH, SEQ))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return BATCH * SEQ / (sum(times[1:]) / steps)


def map_loader_tokens_per_s(ds, batches: int) -> float:
    sampler = iter(ResumableBatchSampler(len(ds), BATCH, seed=0))
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(0)
        b = default_collate([ds[i] for i in next(sampler)])
        n += b["input_ids"].numel()
    return n / (time.perf_counter() - t)


def stream_tokens_per_s(ds, batches: int, workers: int) -> float:
    loader = DataLoader(ds, batch_size=BATCH, drop_last=True, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is paid once per epoch, not per batch
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            n += next(it)["input_ids"].numel()
        except StopIteration:
            break
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="data_throughput_")
    src = os.path.join(tmp, "corpus.jsonl")
    docs = embedded_corpus()
    with open(src, "w") as f:
        for _ in range(args.copies):
            for d in docs:
                f.write(json.dumps({"text": d.text}) + "\n")
    mb = os.path.getsize(src) / 1e6
    print(
        f"input: {mb:.1f} MB of JSON lines ({len(docs) * args.copies} documents), "
        f"{os.cpu_count()} CPUs\n"
    )

    print("| preprocessing | workers | MB/s | tokens/s | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, tok, workers in (
        ("byte", "byte", 1),
        ("byte", "byte", 2),
        ("BPE 4096 (incl. training)", "bpe", 1),
        ("BPE 4096 (incl. training)", "bpe", 2),
    ):
        out = os.path.join(tmp, f"{tok}-{workers}")
        index = preprocess(
            PreprocessConfig(
                inputs=[src], output=out, tokenizer=tok, vocab_size=4096, workers=workers
            )
        )
        st = index["stats"]
        print(
            f"| {name} | {workers} | {st['mb_per_s']:.1f} | {st['tokens_per_s']:,.0f} | "
            f"{st['seconds']:.1f} |"
        )

    train_tps = training_tokens_per_s()
    shards = os.path.join(tmp, "byte-1")
    tok = ByteTokenizer()
    in_memory = TokenWindowDataset.from_documents(docs, tok, SEQ)

    def stream(workers):
        ds = StreamingTextDataset([src], tok, SEQ, shuffle_buffer=1024)
        return stream_tokens_per_s(ds, args.batches, workers)

    rows = [
        ("TokenWindowDataset (in memory)", map_loader_tokens_per_s(in_memory, args.batches)),
        (
            "ShardDataset sequential (memmap)",
            map_loader_tokens_per_s(ShardDataset(shards, "train", SEQ), args.batches),
        ),
        (
            "ShardDataset random (memmap)",
            map_loader_tokens_per_s(ShardDataset(shards, "train", SEQ, "random"), args.batches),
        ),
        ("StreamingTextDataset, 0 workers", stream(0)),
        ("StreamingTextDataset, 2 workers", stream(2)),
    ]
    print(f"\ntraining consumes {train_tps:,.0f} tokens/s (tiny, bf16, {BATCH} x {SEQ})\n")
    print("| loader | tokens/s | x training |")
    print("|---|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} | {tps / train_tps:.0f}x |")


if __name__ == "__main__":
    main()
