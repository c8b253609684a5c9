"""1.58-bit QLoRA's packed base: PackedTernaryLinear equals BitLinear.eval() (outputs and
input gradients) for every scale granularity and both packings, pack_model, memory, and LoRA
from peft on the packed base against LoRA on the unpacked one."""

import copy
import math

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from bitnet_training import BitLinear, BitNetLM, ModelConfig, QATConfig
from bitnet_training.errors import BitNetError
from bitnet_training.peft.packed import PackedTernaryLinear, lora_config, pack_model

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
QATS = {
    "tensor": QATConfig(),
    "channel": QATConfig(per_channel=True),
    "group": QATConfig(group_size=16),
    "unfused-4bit": QATConfig(fused=False, activation_bits=4),
    "input-norm": QATConfig(norm_placement="input", integer_matmul=False),
}


def layer_pair(qat, packing, dtype=torch.float64, bias=True):
    layer = BitLinear(48, 40, bias=bias, config=qat).to(dtype).eval()
    if layer.norm is not None:  # a non-trivial norm weight, so copying it matters
        torch.nn.init.uniform_(layer.norm.weight, 0.5, 1.5)
    return layer, PackedTernaryLinear.from_bitlinear(layer, packing)


def out_and_grad(module, x, g):
    x = x.detach().requires_grad_(True)
    y = module(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y, gx


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("qat", QATS, ids=str)
def test_packed_layer_equals_bitlinear(qat, packing):
    layer, packed = layer_pair(QATS[qat], packing)
    assert list(packed.parameters(recurse=False)) == []  # nothing trains
    assert all(not p.requires_grad for p in packed.parameters())
    assert torch.equal(packed.codes(), layer.quantized_weight().codes)
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    y0, gx0 = out_and_grad(layer, x, g)
    y1, gx1 = out_and_grad(packed, x, g)
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0)  # float64: exact
    # float32, and bf16 autocast: the same arithmetic, so equal up to float tolerance.
    layer32, packed32 = layer.float(), copy.deepcopy(packed).float()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y0, gx0 = out_and_grad(layer32, x.float(), g.float())
            y1, gx1 = out_and_grad(packed32, x.float(), g.float())
        tol = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
        assert y1.dtype == y0.dtype
        torch.testing.assert_close(y1, y0, **tol)
        torch.testing.assert_close(gx1, gx0, **tol)


def test_training_keeps_no_dequantized_weight_between_forward_and_backward(monkeypatch):
    # Without the saved-tensor hooks autograd would hold each layer's dequantized weight
    # (16-32 bits per weight) until the backward; with them only the packed codes remain.
    storages = []
    rebuild = PackedTernaryLinear._weight

    def spy(self, dt, codes=None):
        w = rebuild(self, dt, codes)
        storages.append(StorageWeakRef(w.untyped_storage()))
        return w

    monkeypatch.setattr(PackedTernaryLinear, "_weight", spy)
    for qat in (QATConfig(), QATConfig(fused=False), QATConfig(group_size=16)):
        storages.clear()
        layer, packed = layer_pair(qat, "2bit", torch.float32)
        x = torch.randn(4, 48, requires_grad=True)
        y = packed(x)
        assert len(storages) == 1 and storages[0].expired()
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        assert len(storages) == 2  # rebuilt once for the backward
        x0 = x.detach().requires_grad_(True)
        torch.testing.assert_close(gx, torch.autograd.grad(layer(x0), x0, g)[0], rtol=0, atol=0)


def test_state_dict_round_trip_through_the_constructor():
    layer, packed = layer_pair(QATConfig(group_size=16), "base3")
    keys = set(packed.state_dict())
    assert keys == {"qweight", "weight_scale", "bias"}
    fresh = PackedTernaryLinear(48, 40, "base3", "group", 16, bias=True, config=layer.config)
    fresh = fresh.to(torch.float64)
    fresh.load_state_dict(packed.state_dict())
    x = torch.randn(2, 48, dtype=torch.float64)
    assert torch.equal(fresh(x), layer(x))


def test_from_bitlinear_refuses_what_is_not_ternary_now():
    cases = {
        "weight_bits=8": BitLinear(16, 8, config=QATConfig(weight_bits=8)),
        "weight_bits=None": BitLinear(16, 8, config=QATConfig.off()),
        "weight quantization is blended": BitLinear(16, 8),
        "activation_observer='minmax'": BitLinear(
            16, 8, config=QATConfig(activation_observer="minmax")),
        "needs a BitLinear, got Linear": torch.nn.Linear(16, 8),
    }  # fmt: skip
    cases["weight quantization is blended"].weight_blend = 0.5
    for message, layer in cases.items():
        with pytest.raises(BitNetError, match=message) as e:
            PackedTernaryLinear.from_bitlinear(layer)
        assert "\n" not in str(e.value)
    with pytest.raises(BitNetError, match="packing='4bit' is invalid: expected one of 2bit, base3"):
        PackedTernaryLinear.from_bitlinear(BitLinear(16, 8), "4bit")


def small_model(qat=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return BitNetLM.bitnet(ModelConfig(**CFG), qat or QATConfig()).to(dtype)


@pytest.mark.parametrize("packing,bits", [("2bit", 2.0), ("base3", 1.6)])
def test_pack_model_replaces_every_bitlinear_and_stores_bits_per_weight(packing, bits):
    model = small_model(QATConfig(per_channel=True))
    ids = torch.randint(0, 96, (2, 12))
    want = model(ids).logits
    weights = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, BitLinear)}
    names = pack_model(model, packing)
    assert names == list(weights) and len(names) == 2 * len(PROJ)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert torch.equal(model(ids).logits, want)
    total_codes = total_bytes = 0
    for name in names:
        layer = model.get_submodule(name)
        n = weights[name]
        assert layer.qweight.numel() == math.ceil(n / (8 / bits))  # 4 or 5 codes per byte
        scales = layer.out_features  # per channel: one float32 each
        assert layer.weight_scale.dtype == torch.float32
        assert layer.nbytes() == layer.qweight.numel() + 4 * scales  # no bias in BitNetLM
        total_codes += n
        total_bytes += layer.qweight.numel()
    # 2 or 1.6 bits per weight, plus at most one partly filled byte per layer.
    bpw = 8 * total_bytes / total_codes
    assert bits <= bpw <= bits + 8 * len(names) / total_codes
    # Against the float64 latent weights they replace: 32x or ~40x smaller.
    assert 64 / bpw >= (32.0 if packing == "2bit" else 39.9)


def test_pack_model_refusals_leave_the_model_unchanged():
    with pytest.raises(BitNetError, match="has no BitLinear layer to pack; quantize it first"):
        pack_model(BitNetLM(ModelConfig(**CFG)))
    with pytest.raises(BitNetError, match="cannot replace the model itself"):
        pack_model(BitLinear(8, 8))
    model = small_model()
    model.model.layers[1].mlp.down_proj.weight_blend = 0.5  # the last layer is refused
    with pytest.raises(BitNetError, match="blended in"):
        pack_model(model)
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 2 * len(PROJ)


# -- peft ------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def lora_pair(packing="2bit"):
    """(plain peft LoRA on the BitLinear model, peft LoRA on its packed copy), same adapters
    with random non-zero B (B = 0 would hide any difference in the base's input gradients)."""
    model = small_model()
    packed = copy.deepcopy(model)
    pack_model(packed, packing)
    unpacked = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ))
    with torch.no_grad():
        for n, p in unpacked.named_parameters():
            if "lora_B" in n:
                p.normal_()
    # peft cannot read a dtype off packed codes: its adapters start float32, cast them.
    wrapped = peft.get_peft_model(packed, lora_config(r=4, lora_alpha=8, target_modules=PROJ))
    wrapped = wrapped.to(torch.float64)
    state = peft.get_peft_model_state_dict(unpacked)
    peft.set_peft_model_state_dict(wrapped, state)
    return unpacked, wrapped


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_lora_on_packed_base_equals_lora_on_bitlinear_base(packing):
    unpacked, wrapped = lora_pair(packing)
    lora = [m for m in wrapped.modules() if type(m).__name__ == "PackedLoraLinear"]
    assert len(lora) == 2 * len(PROJ)
    assert all(isinstance(m.base_layer, PackedTernaryLinear) for m in lora)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert trainable == {n for n, p in unpacked.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 96, (2, 16))
    out0, out1 = unpacked(ids, labels=ids), wrapped(ids, labels=ids)
    assert torch.equal(out1.logits, out0.logits)
    out0.loss.backward()
    out1.loss.backward()
    grads0 = {n: p.grad for n, p in unpacked.named_parameters() if p.requires_grad}
    grads1 = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads1.values())
    for n, g in grads1.items():
        torch.testing.assert_close(g, grads0[n], rtol=1e-12, atol=0)


def test_merging_into_packed_base_is_refused():
    _, wrapped = lora_pair()
    for merge in (wrapped.merge_and_unload, wrapped.merge_adapter):
        with pytest.raises(BitNetError, match="cannot merge LoRA into a packed ternary base") as e:
            merge()
        assert "\n" not in str(e.value)


def test_adapter_saved_from_unpacked_model_loads_onto_packed_base(tmp_path):
    from bitnet_training.peft.packed import register_with_peft

    model = small_model(dtype=torch.float32)
    packed = copy.deepcopy(model)
    pack_model(packed)
    unpacked = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=PROJ))
    with torch.no_grad():
        for n, p in unpacked.named_parameters():
            if "lora_B" in n:
                p.normal_()
    unpacked.save_pretrained(tmp_path)
    config = register_with_peft(peft.LoraConfig.from_pretrained(tmp_path))
    loaded = peft.PeftModel.from_pretrained(packed, tmp_path, config=config)
    ids = torch.randint(0, 96, (1, 10))
    torch.testing.assert_close(loaded(ids).logits, unpacked(ids).logits)


def test_lora_options_that_need_the_dense_base_are_refused():
    for kw, message in (
        (dict(use_dora=True), "use_dora=True needs the dense base weight"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' reads the dense base"),
    ):
        with pytest.raises(BitNetError, match=message):
            lora_config(target_modules=PROJ, **kw)
    from bitnet_training.peft.packed import register_with_peft

    with pytest.raises(BitNetError, match="needs a peft.LoraConfig, got IA3Config"):
        register_with_peft(peft.IA3Config(target_modules=PROJ))
    wrapped = peft.get_peft_model(small_model(), peft.LoraConfig(r=2, target_modules=PROJ))
    with pytest.raises(BitNetError, match="already wrapped by an adapter; pack the base before"):
        pack_model(wrapped)
