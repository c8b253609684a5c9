"""The frozen base of QLoRA (Dettmers et al. 2023, arXiv 2305.14314): NF4 through bitsandbytes.

`quantize_nf4(model)` replaces every `nn.Linear` but the output head (as QLoRA and
`transformers`' bitsandbytes loading do) by bitsandbytes' `Linear4bit` in NF4, with the block
absmax scales themselves quantized to 8 bits (double quantization) unless asked otherwise.
The model is marked `is_loaded_in_4bit`, which is how peft recognizes a 4-bit base: its LoRA
then wraps the layers with its own bitsandbytes layer. The forward dequantizes each weight
on the fly; the stored base is about 4.1 bits per weight (4.5 without double quantization).

Why bitsandbytes: it is the implementation the QLoRA paper released, peft integrates it
(adapters, saving, merging), and since 0.45 it runs on CPUs as well as GPUs. What is ours is
only the placement (which layers, the head spared on any model) and `nf4_round_trip`, the
weights the adapters were trained against, which a merge needs.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..errors import BitNetError
from ..nn.bitlinear import BitLinear
from ..nn.convert import output_head

BLOCK_SIZE = 64  # QLoRA's NF4 block; double quantization groups 256 block scales


def _bnb():
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BitNetError(
            "peft.method=qlora needs bitsandbytes (pip install 'bitnet-training[qlora]')"
        )
    import bitsandbytes

    return bitsandbytes


def nf4_linears(model: nn.Module) -> list[str]:
    """Names of the layers QLoRA stores in NF4: every `nn.Linear` but the output head."""
    head = output_head(model)
    return [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Linear and m is not head and n.split(".")[-1] != "lm_head"
    ]


def quantize_nf4(model: nn.Module, double_quant: bool = True) -> list[str]:
    """Replace every linear layer of `model` but the output head by an NF4 `Linear4bit`
    (frozen, on the layer's device, computing in the layer's dtype), in place. Returns the
    names replaced. Refused in one line: a model with ternary (`BitLinear`) layers, which
    have their own packed frozen form (`qlora_ternary`), and a model with no linear layer."""
    bnb = _bnb()
    if any(isinstance(m, BitLinear) for m in model.modules()):
        raise BitNetError(
            "peft.method=qlora stores a full-precision base in NF4; this model is quantized "
            "(BitLinear): use peft.method=qlora_ternary for a ternary base"
        )
    names = nf4_linears(model)
    if not names:
        raise BitNetError("peft.method=qlora: the model has no linear layer to store in NF4")
    for name in names:
        old = model.get_submodule(name)
        w = old.weight.detach()
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=w.dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            w.to("cpu"),
            requires_grad=False,
            blocksize=BLOCK_SIZE,
            compress_statistics=double_quant,
            quant_type="nf4",
        )
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        # On CPUs with AVX512-BF16, bitsandbytes repacks a weight in place at its first
        # inference forward and computes with a bf16 kernel from then on (in training too),
        # about 1e-2 off the dequantized weight: evaluation would not compute what training
        # computes, and a resumed run not what an uninterrupted one does. Kept off.
        new.support_avx512bf16_for_cpu = False
        new = new.to(w.device)  # Params4bit quantizes when it is moved to a device
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.is_loaded_in_4bit = True  # peft: wrap these with its bitsandbytes LoRA layer
    return names


@torch.no_grad()
def nf4_round_trip(model: nn.Module, double_quant: bool = True) -> nn.Module:
    """Replace, in place, the weight of every layer that `quantize_nf4` stores in NF4 (found
    under a LoRA wrapper too) by its NF4 dequantization: the base weights a QLoRA adapter was
    trained against, as full-precision tensors, so merging the adapter into them is exact."""
    F = _bnb().functional
    head = output_head(model)
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or m is head or name.split(".")[-1] in ("lm_head",):
            continue
        if any(k in name.split(".") for k in ("lora_A", "lora_B", "lora_embedding_A")):
            continue
        w = m.weight
        q, state = F.quantize_4bit(
            w.detach().to("cpu"),
            blocksize=BLOCK_SIZE,
            compress_statistics=double_quant,
            quant_type="nf4",
        )
        w.copy_(F.dequantize_4bit(q, state).to(w.device, w.dtype))
    return model
