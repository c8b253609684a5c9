"""Preprocessing: text, JSON lines or gzip of either -> token shards plus an index.

Output directory layout:
    index.json             format version, tokenizer (kind, hash, vocab size, EOS id), dtype,
                           per split: shards (file, tokens, documents), totals, UTF-8 bytes;
                           sources (path, bytes, documents), settings fingerprint, statistics
    tokenizer.json         the tokenizer (BPE trained here, or the one given); none for `byte`
    {train,val}-NNNNN.bin  tokens, uint16 when the vocabulary fits, else uint32; every
                           document is followed by the EOS token
    {train,val}-NNNNN.idx  uint64 start offset of each document in its shard

Everything is written to a temporary sibling directory that replaces `output` only once
complete, so an interrupted run never leaves shards that look valid.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import BitNetError, ConfigError
from .tokenizer import EOS_NAMES, ByteTokenizer, HFTokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TEXT_EXTS = (".txt", ".text", ".md")
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
UTF8_POLICIES = ("error", "replace", "skip")


@dataclass
class PreprocessConfig:
    """What `preprocess` reads and writes.

    inputs: files, directories (searched recursively for .txt/.md/.jsonl/.json/.ndjson and
        their .gz) or glob patterns. A text file is one document; a JSON-lines file holds one
        document per line, its text in `jsonl_field`.
    tokenizer: `byte`, `bpe` (trained here on the inputs: `vocab_size`, `special_tokens`), a
        path to an existing `tokenizer.json`, or a pretrained model's directory holding one
        (so shards match the model's tokenizer: `model.pretrained` checks they do).
    invalid_utf8: `error` (stop, naming the file), `replace` (U+FFFD) or `skip` (drop the
        document); counts are reported either way.
    val_fraction: share of documents held out for validation (by a hash of file and position).
    shard_tokens: tokens per shard file; workers: processes that tokenize (1 is fastest on
        2 cores: reading is the bottleneck for bytes, and BPE already uses every core inside
        `tokenizers`; see benchmarks/data_throughput.py).
    """

    inputs: list[str] = field(default_factory=list)
    output: str = ""
    tokenizer: str = "byte"
    vocab_size: int = 8192
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    jsonl_field: str = "text"
    invalid_utf8: str = "error"
    val_fraction: float = 0.01
    shard_tokens: int = 1 << 26
    workers: int = 1
    overwrite: bool = False

    def __post_init__(self):
        if self.tokenizer not in ("byte", "bpe") and os.path.isdir(self.tokenizer):
            found = os.path.join(self.tokenizer, "tokenizer.json")
            if not os.path.isfile(found):
                raise ConfigError(
                    "preprocess.tokenizer", self.tokenizer, "a directory holding tokenizer.json"
                )
            self.tokenizer = found
        if not self.inputs:
            raise ConfigError(
                "preprocess.inputs", self.inputs, "at least one file, directory or glob"
            )
        if not self.output:
            raise ConfigError("preprocess.output", self.output, "an output directory")
        if self.invalid_utf8 not in UTF8_POLICIES:
            raise ConfigError(
                "preprocess.invalid_utf8", self.invalid_utf8, ", ".join(UTF8_POLICIES)
            )
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("preprocess.val_fraction", self.val_fraction, "a number in [0, 1)")
        for name in ("vocab_size", "shard_tokens", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"preprocess.{name}", v, "a positive integer")
        if self.tokenizer == "bpe" and not set(EOS_NAMES) & set(self.special_tokens):
            raise ConfigError(
                "preprocess.special_tokens",
                self.special_tokens,
                f"a list that includes an end-of-text token ({', '.join(EOS_NAMES)})",
            )
        if self.tokenizer == "bpe" and self.vocab_size < 256 + len(self.special_tokens):
            raise ConfigError(
                "preprocess.vocab_size",
                self.vocab_size,
                f">= {256 + len(self.special_tokens)} (256 bytes + special tokens)",
            )


# --------------------------------------------------------------------------- reading
def expand_inputs(patterns: list[str]) -> list[str]:
    """The input files, in a stable order; a pattern that matches nothing is an error."""
    # Explicit files may be .json (JSON lines); directory search is stricter, below.
    # In directories: not `.json` (a tokenizer or index is JSON too), nor hidden directories
    # or earlier shard directories (they hold an index.json).
    exts = tuple(e + g for e in (*TEXT_EXTS, ".jsonl", ".ndjson") for g in ("", ".gz"))
    files: list[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = []
            for root, dirs, names in os.walk(pat):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                if "index.json" in names and root != pat:
                    dirs[:] = []
                    continue
                found += [os.path.join(root, f) for f in sorted(names) if f.endswith(exts)]
            if not found:
                raise BitNetError(f"input directory {pat!r} holds no {', '.join(exts)} files")
        elif any(c in pat for c in "*?["):
            found = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
            if not found:
                raise BitNetError(f"input pattern {pat!r} matches no files")
        elif os.path.isfile(pat):
            found = [pat]
        else:
            raise BitNetError(f"input {pat!r} does not exist")
        files.extend(f for f in found if f not in files)
    return files


def _is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith(JSONL_EXTS)


def _decode(raw: bytes, path: str, where: str, policy: str, counts: dict) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if policy == "error":
            raise BitNetError(
                f"{path}{where}: invalid UTF-8 at byte {e.start} (use --invalid-utf8 "
                "replace or skip)"
            ) from None
        counts["invalid_utf8_" + ("replaced" if policy == "replace" else "skipped")] += 1
        return raw.decode("utf-8", errors="replace") if policy == "replace" else None


def iter_documents(path: str, field_name: str, policy: str, counts: dict) -> Iterator[str]:
    """The documents of one input file, as text. Bad content is a `BitNetError` naming the
    file (and line, for JSON lines)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            if not _is_jsonl(path):
                raw = f.read()
                if b"\0" in raw[:65536]:
                    raise BitNetError(f"{path}: a binary file, expected text")
                text = _decode(raw, path, "", policy, counts)
                if text is not None and text.strip():
                    yield text
                elif text is not None:
                    counts["empty_documents"] += 1
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = _decode(line, path, f":{lineno}", policy, counts)
                if text is None:
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise BitNetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or field_name not in obj:
                    raise BitNetError(f"{path}:{lineno}: no {field_name!r} field")
                value = obj[field_name]
                if not isinstance(value, str):
                    raise BitNetError(f"{path}:{lineno}: field {field_name!r} is not a string")
                if value.strip():
                    yield value
                else:
                    counts["empty_documents"] += 1
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise BitNetError(f"cannot read {path!r}: {e}") from None


# ---------------------------------------------------------------------- tokenizing
_WORKER_TOKENIZER = None


def _init_worker(kind: str, path: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = ByteTokenizer() if kind == "byte" else HFTokenizer(path)


def _encode_arrays(tok, texts: list[str], dtype) -> list[np.ndarray]:
    """Token arrays (cheap to send between processes, unlike lists of ints)."""
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(dtype) for t in texts]
    return [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(texts)]


def _encode(texts: list[str], dtype) -> list[np.ndarray]:
    return _encode_arrays(_WORKER_TOKENIZER, texts, dtype)


def train_bpe(texts: Iterator[str], vocab_size: int, special_tokens: list[str], path: str):
    """Train a byte-level BPE tokenizer with Hugging Face `tokenizers` and save it to `path`
    (`tokenizer.json`, loadable by `transformers.PreTrainedTokenizerFast`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(path)


def _split_of(path: str, index: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"{os.path.basename(path)}:{index}".encode()).digest()
    return "val" if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else "train"


class _ShardWriter:
    def __init__(self, out: str, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.cap = out, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.starts: list[int] = []
        self.n = 0
        self.shards: list[dict] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, ids: np.ndarray, eos: int, n_bytes: int) -> None:
        arr = np.append(ids.astype(self.dtype, copy=False), np.asarray(eos, dtype=self.dtype))
        self.starts.append(self.n)
        self.buf.append(arr)
        self.n += len(arr)
        self.tokens += len(arr)
        self.documents += 1
        self.bytes += n_bytes
        if self.n >= self.cap:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        np.concatenate(self.buf).tofile(os.path.join(self.out, name + ".bin"))
        np.asarray(self.starts, dtype=np.uint64).tofile(os.path.join(self.out, name + ".idx"))
        self.shards.append({"file": name + ".bin", "tokens": self.n, "documents": len(self.starts)})
        self.buf, self.starts, self.n = [], [], 0

    def summary(self) -> dict:
        return {
            "shards": self.shards,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
        }


def _fingerprint(cfg: PreprocessConfig, files: list[str]) -> str:
    """Settings and inputs (path, size, mtime; the tokenizer file's content): equal
    fingerprints mean equal shards."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "overwrite", "workers")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    if cfg.tokenizer not in ("byte", "bpe") and os.path.isfile(cfg.tokenizer):
        h.update(_file_hash(cfg.tokenizer).encode())
    return h.hexdigest()[:16]


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def preprocess(cfg: PreprocessConfig, progress=None) -> dict:
    """Tokenize `cfg.inputs` into shards under `cfg.output`; returns the index (a dict with a
    `stats` entry: documents, tokens, bytes, seconds, MB/s, tokens/s). `progress(n_bytes)`,
    if given, is called as input is consumed."""
    t0 = time.perf_counter()
    files = expand_inputs(cfg.inputs)
    out = os.path.abspath(cfg.output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise BitNetError(f"output {cfg.output!r} is a file, not a directory")
    for f in files:
        if os.path.commonpath([os.path.abspath(f), out]) == out:
            raise BitNetError(
                f"input {f!r} lies inside the output {cfg.output!r}: choose another output"
            )
    fingerprint = _fingerprint(cfg, files)
    if (
        os.path.isdir(out)
        and os.listdir(out)
        and not os.path.isfile(os.path.join(out, "index.json"))
    ):
        # --overwrite replaces shards, never a directory of other files.
        raise BitNetError(
            f"output {cfg.output!r} is a non-empty directory that holds no shards: choose "
            "another output (--overwrite only replaces earlier shards)"
        )
    if os.path.isdir(out) and os.listdir(out) and not cfg.overwrite:
        same = False
        index_path = os.path.join(out, "index.json")
        with contextlib.suppress(OSError, ValueError, AttributeError), open(index_path) as f:
            same = json.load(f).get("fingerprint") == fingerprint  # else: no usable index
        raise BitNetError(
            f"output {cfg.output!r} already holds "
            + ("these shards (same inputs and settings)" if same else "other files or shards")
            + ": pass --overwrite to replace it, or choose another output"
        )
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-preprocess-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        index = _preprocess_into(cfg, files, tmp, progress, fingerprint)
        if os.path.isdir(out) and os.listdir(out):
            trash = tempfile.mkdtemp(prefix=".trash-", dir=parent)
            os.replace(out, os.path.join(trash, "old"))
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            if os.path.isdir(out):
                os.rmdir(out)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats = index["stats"]
    stats["seconds"] = time.perf_counter() - t0
    stats["mb_per_s"] = stats["bytes"] / 1e6 / max(stats["seconds"], 1e-9)
    stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    return index


def _preprocess_into(
    cfg: PreprocessConfig, files: list[str], out: str, progress, fingerprint: str
) -> dict:
    counts = {"invalid_utf8_replaced": 0, "invalid_utf8_skipped": 0, "empty_documents": 0}

    def documents():
        for path in files:
            for i, text in enumerate(
                iter_documents(path, cfg.jsonl_field, cfg.invalid_utf8, counts)
            ):
                yield path, i, text

    if cfg.tokenizer == "byte":
        kind, tok_path, tok = "byte", None, ByteTokenizer()
        tok_hash = "byte"
    else:
        kind, tok_path = "hf", os.path.join(out, "tokenizer.json")
        if cfg.tokenizer == "bpe":
            train_bpe((t for _, _, t in documents()), cfg.vocab_size, cfg.special_tokens, tok_path)
        elif not os.path.isfile(cfg.tokenizer):
            raise BitNetError(
                f"tokenizer {cfg.tokenizer!r} does not exist (byte, bpe or a tokenizer.json)"
            )
        else:
            HFTokenizer(cfg.tokenizer)  # a broken file is reported under its own name
            shutil.copyfile(cfg.tokenizer, tok_path)
        tok = HFTokenizer(tok_path)
        tok_hash = _file_hash(tok_path)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    writers = {s: _ShardWriter(out, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    sources = {
        p: {"path": os.path.abspath(p), "bytes": os.path.getsize(p), "documents": 0} for p in files
    }

    def batches(limit=1 << 20):
        batch, size = [], 0
        for item in documents():
            batch.append(item)
            size += len(item[2])
            if size >= limit:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def write(batch, encoded):
        for (path, i, text), ids in zip(batch, encoded, strict=True):
            n_bytes = len(text.encode("utf-8"))
            writers[_split_of(path, i, cfg.val_fraction)].add(ids, tok.eos_token_id, n_bytes)
            sources[path]["documents"] += 1
            if progress is not None:
                progress(n_bytes)

    if cfg.workers > 1:
        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(cfg.workers, _init_worker, (kind, tok_path)) as pool:
            pending = []
            for batch in batches():
                texts = [t for _, _, t in batch]
                pending.append((batch, pool.apply_async(_encode, (texts, dtype))))
                while len(pending) > 2 * cfg.workers:  # bounded memory, order kept
                    b, r = pending.pop(0)
                    write(b, r.get())
            for b, r in pending:
                write(b, r.get())
    else:
        for batch in batches():
            write(batch, _encode_arrays(tok, [t for _, _, t in batch], dtype))
    for w in writers.values():
        w.flush()
    splits = {s: w.summary() for s, w in writers.items()}
    if splits["train"]["documents"] == 0:
        raise BitNetError("the inputs hold no documents for training (all empty or skipped)")
    index = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "kind": kind,
            "hash": tok_hash,
            "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_token_id,
        },
        "dtype": np.dtype(dtype).name,
        "splits": splits,
        "sources": list(sources.values()),
        "fingerprint": fingerprint,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("inputs", "output")},
        "stats": {
            "documents": sum(sp["documents"] for sp in splits.values()),
            "tokens": sum(sp["tokens"] for sp in splits.values()),
            "bytes": sum(sp["bytes"] for sp in splits.values()),
            **counts,
        },
    }
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index
