"""insert_subln: BitNet sub-norms on a tiny Llama, against a hand-built reference."""

import copy
import inspect

import pytest
import torch
from torch import nn

from bitnet_training.errors import BitNetError
from bitnet_training.models.bitnet import BitNetLM
from bitnet_training.models.config import ModelConfig
from bitnet_training.nn.convert import quantize_model
from bitnet_training.nn.norm import RMSNorm
from bitnet_training.nn.subln import insert_subln
from bitnet_training.quant.config import QATConfig

transformers = pytest.importorskip("transformers")

LAYERS = 2


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize_norms(model, seed=2):
    """Sub-norm weights away from ones, so a norm applied twice or to the wrong tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sub_norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


class Normed(nn.Module):
    """The reference: an explicit norm then the projection (no hooks)."""

    def __init__(self, norm, proj):
        super().__init__()
        self.norm, self.proj = norm, proj

    def forward(self, x):
        return self.proj(self.norm(x))


def reference(plain, hooked):
    """`plain` (a copy of the model before insertion) with each o_proj / down_proj replaced by
    Normed(a copy of `hooked`'s sub-norm, o_proj): the hand-built SubLN model."""
    ref = copy.deepcopy(plain)
    for i in range(LAYERS):
        for block, proj, norm in (
            ("self_attn", "o_proj", "attn_sub_norm"),
            ("mlp", "down_proj", "ffn_sub_norm"),
        ):
            where = f"model.layers.{i}.{block}"
            n = copy.deepcopy(hooked.get_submodule(f"{where}.{norm}"))
            ref.set_submodule(f"{where}.{proj}", Normed(n, ref.get_submodule(f"{where}.{proj}")))
    return ref


def test_llama_gets_sub_norms_applied_to_projection_inputs():
    model = tiny_llama()
    plain = copy.deepcopy(model)
    before = logits(model)
    names = insert_subln(model)
    assert names == [
        n
        for i in range(LAYERS)
        for n in (f"model.layers.{i}.self_attn.attn_sub_norm", f"model.layers.{i}.mlp.ffn_sub_norm")
    ]
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.attn_sub_norm.weight"].shape == (64,)
    assert sd["model.layers.1.mlp.ffn_sub_norm.weight"].shape == (128,)
    norm = model.model.layers[0].self_attn.attn_sub_norm
    assert isinstance(norm, RMSNorm) and norm.eps == 1e-6 and bool((norm.weight == 1).all())
    assert not torch.allclose(logits(model), before, atol=1e-3)  # the norms change the output
    randomize_norms(model)
    torch.testing.assert_close(logits(model), logits(reference(plain, model)), rtol=0, atol=0)

    # By hand on one projection: o_proj sees w * x / sqrt(mean(x^2) + eps).
    seen = {}
    attn = model.model.layers[1].self_attn
    spy = attn.o_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    x = torch.randn(2, 5, 64)
    attn.o_proj(x)
    spy.remove()
    w = attn.attn_sub_norm.weight
    want = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(seen["x"], want)
    torch.testing.assert_close(seen["y"], want @ attn.o_proj.weight.T)


def test_idempotent_deepcopy_and_state_dict():
    model = tiny_llama()
    insert_subln(model, eps=1e-4)
    randomize_norms(model)
    out = logits(model)
    assert model.model.layers[0].mlp.ffn_sub_norm.eps == 1e-4
    assert insert_subln(model) == []
    torch.testing.assert_close(logits(model), out, rtol=0, atol=0)  # still applied once

    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin), out, rtol=0, atol=0)
    randomize_norms(twin, seed=5)  # the copy's hooks use the copy's norms, not the original's
    torch.testing.assert_close(logits(model), out, rtol=0, atol=0)
    assert not torch.allclose(logits(twin), out, atol=1e-4)

    fresh = tiny_llama(seed=9)
    insert_subln(fresh, eps=1e-4)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh), out, rtol=0, atol=0)


def test_survives_quantize_model_and_wrapping():
    """quantize_model swaps o_proj / down_proj for new BitLinear modules; a PEFT-style wrapper
    keeps the old one as base_layer: the norm still applies once, to the whole layer's input."""
    a, b = tiny_llama(), tiny_llama()
    insert_subln(a)
    randomize_norms(a)
    quantize_model(a, QATConfig())  # SubLN first, then quantization
    quantize_model(b, QATConfig())
    insert_subln(b)  # quantization first: hooks go straight onto the BitLinears
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(logits(a), logits(b), rtol=0, atol=0)
    assert type(a.model.layers[0].self_attn.o_proj).__name__ == "BitLinear"

    class Wrapper(nn.Module):  # what a LoRA layer looks like from outside: base_layer + extra path
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.extra = base, nn.Linear(base.in_features, base.out_features)
            nn.init.zeros_(self.extra.weight)
            nn.init.zeros_(self.extra.bias)

        def forward(self, x):
            return self.base_layer(x) + self.extra(x)

    before = logits(a)
    attn = a.model.layers[0].self_attn
    attn.o_proj = Wrapper(attn.o_proj)
    torch.testing.assert_close(logits(a), before, rtol=0, atol=0)  # zero extra path: same
    seen = {}
    # Prepended: runs before the sub-norm hook, so it sees the raw input.
    attn.o_proj.register_forward_pre_hook(lambda m, args: seen.update(raw=args[0]), prepend=True)
    attn.o_proj.extra.register_forward_hook(lambda m, args, out: seen.update(extra=args[0]))
    attn.o_proj.base_layer.register_forward_hook(lambda m, args, out: seen.update(base=args[0]))
    a(IDS)
    x, w = seen["raw"], attn.attn_sub_norm.weight
    want = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(seen["extra"], want)
    torch.testing.assert_close(seen["base"], want)  # once, not again inside the wrapper


def full_precision_bitnet(cfg):
    if "qat" in inspect.signature(BitNetLM.__init__).parameters:
        return BitNetLM(cfg, qat=False)
    return BitNetLM(cfg)


def test_bitnet_already_has_them():
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = full_precision_bitnet(cfg).eval()
    keys, out = list(model.state_dict()), logits(model)
    assert insert_subln(model) == []
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(logits(model), out, rtol=0, atol=0)


def test_errors():
    with pytest.raises(BitNetError, match="found no o_proj or down_proj in Sequential"):
        insert_subln(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(BitNetError, match="eps=0.0 is invalid"):
        insert_subln(tiny_llama(), eps=0.0)
