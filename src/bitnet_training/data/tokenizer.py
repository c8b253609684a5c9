"""A byte-level tokenizer that needs no files: 256 byte ids plus special tokens."""

from __future__ import annotations

from ..errors import BitNetError

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
# Names a `tokenizer.json` may give its end-of-text token, in order of preference.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|eos|>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then `<|bos|>` = 256, `<|eos|>` = 257, `<|pad|>` = 258.

    Lossless for any text: `decode(encode(s)) == s`. A model using it needs
    `vocab_size >= ByteTokenizer.vocab_size` (the `tiny` preset has 320: 259 rounded up to a
    multiple of 64 for matmul-friendly shapes; the extra rows are never targets).
    """

    vocab_size = 256 + len(SPECIAL_TOKENS)
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`: its UTF-8 bytes, optionally framed by BOS / EOS."""
        ids = list(text.encode("utf-8"))
        return (
            ([self.bos_token_id] if add_bos else [])
            + ids
            + ([self.eos_token_id] if add_eos else [])
        )

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (ints or a 1-D tensor); invalid UTF-8 (a cut-off character) becomes
        U+FFFD; special tokens are dropped, or written by name with skip_special_tokens=False."""
        out, buf = [], bytearray()
        for i in (int(t) for t in ids):
            if 0 <= i < 256:
                buf.append(i)
            elif 256 <= i < self.vocab_size:
                if not skip_special_tokens:
                    out.append(buf.decode("utf-8", errors="replace"))
                    out.append(SPECIAL_TOKENS[i - 256])
                    buf = bytearray()
            else:
                raise BitNetError(
                    f"token id {i} is outside the byte vocabulary (0..{self.vocab_size - 1})"
                )
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (a `tokenizer.json`, e.g. from
    `bitnet-train preprocess --tokenizer bpe`) behind the same interface as `ByteTokenizer`:
    `encode`, `decode`, `vocab_size`, `eos_token_id` (the first of `eos_names` it knows), and
    `encode_batch` for preprocessing. `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`
    loads the same file."""

    eos_names = EOS_NAMES

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise BitNetError(f"tokenizer {path!r} cannot be loaded: {e}") from None
        self.path = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        ids = [self.tok.token_to_id(n) for n in self.eos_names]
        found = [i for i in ids if i is not None]
        if not found:
            raise BitNetError(
                f"tokenizer {path!r} has no end-of-text token (one of {', '.join(self.eos_names)})"
            )
        self.eos_token_id = found[0]
        self.bos_token_id = None
        self.pad_token_id = None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ids + ([self.eos_token_id] if add_eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size


def tokenizer_id(tokenizer) -> str:
    """Names a tokenizer's vocabulary: `byte`, or `hf:` and a hash of its `tokenizer.json`.
    Checkpoints store it, so a model is never evaluated or resumed under another one."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    path = getattr(tokenizer, "path", None)
    if path is None:
        return type(tokenizer).__name__
    import hashlib

    with open(path, "rb") as f:
        return "hf:" + hashlib.sha256(f.read()).hexdigest()[:16]
