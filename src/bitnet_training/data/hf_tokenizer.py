"""`PretrainedTokenizer`: a `transformers` tokenizer behind our data pipeline's interface."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from ..errors import BitNetError

# Files `save_pretrained` may write for a tokenizer; copying these copies the tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# The file that names the vocabulary (hashed by `tokenizer_id`), in order of preference: the
# full serialised tokenizer first, then a model file, the config only as a last resort.
_IDENTITY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "tokenizer_config.json",
)


def require_transformers(what: str) -> None:
    """Raise a one-line BitNetError when `transformers` (the `hf` extra) is not installed."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise BitNetError(f"{what} needs transformers (pip install 'bitnet-training[hf]')")


def has_tokenizer_files(directory: str) -> bool:
    """Whether `directory` holds any file a `transformers` tokenizer is loaded from."""
    return any(os.path.isfile(os.path.join(directory, f)) for f in _IDENTITY_FILES)


class PretrainedTokenizer:
    """A `transformers` tokenizer (`AutoTokenizer`, local files only) with the interface of
    `ByteTokenizer` / `HFTokenizer`: `encode(text, add_bos, add_eos) -> list[int]`,
    `encode_batch(texts)`, `decode(ids)`, `vocab_size` (= `len(tokenizer)`, added tokens
    included), `eos_token_id`, `bos_token_id`, `pad_token_id` and `path`, the file that
    identifies the vocabulary (`tokenizer.json` when present) for `tokenizer_id`.

    Args:
        directory: the folder holding the tokenizer files (or the GGUF file's folder).
        gguf_file: a GGUF file name inside `directory` whose metadata holds the tokenizer; its
            files are then written once to a private temporary folder, so `path` and `save`
            work as for a folder of files.

    `encode` never adds the tokenizer's own special tokens (a Llama tokenizer would prepend
    BOS by itself): only the BOS / EOS asked for.
    """

    def __init__(self, directory: str, gguf_file: str | None = None):
        where = os.path.join(directory, gguf_file) if gguf_file else directory
        if not os.path.exists(where):
            raise BitNetError(f"tokenizer {where!r} does not exist")
        require_transformers(f"tokenizer {where!r}")
        from transformers import AutoTokenizer

        try:
            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            tok = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
        except Exception as e:  # transformers raises OSError, ValueError, JSON and Rust errors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BitNetError(f"tokenizer {where!r} cannot be loaded: {msg}") from None
        if tok.eos_token_id is None:
            raise BitNetError(f"tokenizer {where!r} has no end-of-text (eos) token")
        self.tok = tok
        if gguf_file:
            # The vocabulary lives inside the GGUF: write it out so it has files to hash and copy.
            directory = tempfile.mkdtemp(prefix="bitnet-tokenizer-")
            atexit.register(shutil.rmtree, directory, True)
            tok.save_pretrained(directory)
        self.directory = os.path.abspath(directory)
        found = [f for f in _IDENTITY_FILES if os.path.isfile(os.path.join(self.directory, f))]
        if not found:
            raise BitNetError(
                f"tokenizer {where!r} has none of the files that identify a vocabulary "
                f"({', '.join(_IDENTITY_FILES)})"
            )
        self.path = os.path.join(self.directory, found[0])
        self.vocab_size = len(tok)
        self.eos_token_id = int(tok.eos_token_id)
        self.bos_token_id = None if tok.bos_token_id is None else int(tok.bos_token_id)
        self.pad_token_id = None if tok.pad_token_id is None else int(tok.pad_token_id)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by BOS / EOS (never other special tokens)."""
        if add_bos and self.bos_token_id is None:
            raise BitNetError(f"tokenizer {self.path!r} has no bos token to add")
        # verbose=False: documents are longer than model_max_length by design (we window them).
        ids = self.tok.encode(text, add_special_tokens=False, verbose=False)
        return (
            ([self.bos_token_id] if add_bos else [])
            + list(ids)
            + ([self.eos_token_id] if add_eos else [])
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens); batched in Rust for fast tokenizers."""
        if not texts:
            return []
        return [
            list(x)
            for x in self.tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        ]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (ints or a 1-D tensor); special tokens dropped unless asked for.
        No clean-up of spaces, so `decode(encode(s)) == s` wherever the tokenizer is lossless."""
        return self.tok.decode(
            [int(i) for i in ids],
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def save(self, directory: str) -> None:
        """Write the tokenizer's files into `directory` (`save_pretrained`), created if needed;
        `PretrainedTokenizer(directory)` loads them back."""
        os.makedirs(directory, exist_ok=True)
        self.tok.save_pretrained(directory)

    def copy_files(self, directory: str) -> list[str]:
        """Copy the tokenizer's own files byte for byte into `directory` (so `tokenizer_id`
        of the copy equals the original's, which a re-serialising `save` does not promise);
        returns the copied names."""
        os.makedirs(directory, exist_ok=True)
        copied = []
        for name in TOKENIZER_FILES:
            src = os.path.join(self.directory, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(directory, name))
                copied.append(name)
        return copied

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({self.directory!r}, vocab_size={self.vocab_size})"
