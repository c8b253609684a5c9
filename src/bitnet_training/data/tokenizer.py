"""A byte-level tokenizer that needs no files: 256 byte ids plus special tokens."""

from __future__ import annotations

from ..errors import BitNetError

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


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

    def __len__(self) -> int:
        return self.vocab_size
