"""A run's tokenizer as files `transformers.AutoTokenizer.from_pretrained(DIR)` loads.

The byte tokenizer (UTF-8 bytes as ids 0..255, then `<|bos|>`, `<|eos|>`, `<|pad|>`) becomes
a `tokenizers` byte-level BPE with no merges: each byte is its own token, with the same id,
so `AutoTokenizer` encodes and decodes any text exactly as `ByteTokenizer` does (tested). A
`tokenizer.json` of ours (`preprocess --tokenizer bpe`) is wrapped as it is; a pretrained
model's tokenizer is written by `transformers` itself.
"""

from __future__ import annotations

from ..data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, HFTokenizer
from ..errors import BitNetError


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-symbol map, which `tokenizers`' ByteLevel and llama.cpp's gpt2
    vocabularies use: printable bytes stand for themselves, the others for the symbols from
    U+0100 on, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in symbols:
            symbols[b], extra = chr(256 + extra), extra + 1
    return symbols


def _byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    stand_in = byte_symbols()
    if set(stand_in.values()) != set(ByteLevel.alphabet()):
        raise BitNetError("tokenizers' byte-level alphabet is not GPT-2's byte map")
    vocab = {stand_in[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids 256, 257, 258
    return tok


def write_tokenizer(tokenizer, directory: str) -> None:
    """Write `tokenizer`'s files into `directory` for `AutoTokenizer`."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, ByteTokenizer):
        bos, eos, pad = SPECIAL_TOKENS
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_bpe(), bos_token=bos, eos_token=eos, pad_token=pad
        )
    elif isinstance(tokenizer, HFTokenizer):
        eos = tokenizer.tok.id_to_token(tokenizer.eos_token_id)
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, eos_token=eos)
    elif hasattr(tokenizer, "save"):  # a pretrained model's own tokenizer
        tokenizer.save(directory)
        return
    else:
        raise BitNetError(f"export: cannot write a {type(tokenizer).__name__} tokenizer")
    fast.save_pretrained(directory)
