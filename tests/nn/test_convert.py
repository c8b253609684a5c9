"""quantize_model on plain modules and on a small transformers LlamaForCausalLM."""

import pytest
import torch
from torch import nn

from bitnet_training import BitLinear, QATConfig, quantize_model
from bitnet_training.errors import BitNetError

transformers = pytest.importorskip("transformers")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def test_llama_conversion_report_forward_backward():
    model = tiny_llama()
    params_before = {n: p for n, p in model.named_parameters()}
    report = quantize_model(model, QATConfig())
    block = {p: "self_attn" if p in PROJ[:4] else "mlp" for p in PROJ}
    expected = sorted(f"model.layers.{i}.{block[p]}.{p}" for i in range(2) for p in PROJ)
    assert sorted(report.replaced) == expected
    assert report.skipped == [("lm_head", "output head stays full precision")]
    assert isinstance(model.model.layers[0].self_attn.q_proj, BitLinear)
    assert type(model.lm_head) is nn.Linear
    # Same parameter objects: names, tensors, and any optimizer built before stay valid.
    assert {n: p for n, p in model.named_parameters()} == params_before
    ids = torch.randint(0, 64, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert "replaced 14 nn.Linear" in str(report)


def test_applying_twice_changes_nothing_more():
    model = tiny_llama()
    quantize_model(model)
    modules = dict(model.named_modules())
    again = quantize_model(model)
    assert again.replaced == [] and len(again.already) == 14
    assert dict(model.named_modules()) == modules


def test_include_and_exclude_globs():
    model = tiny_llama()
    report = quantize_model(model, include=["q_proj", "v_proj", "lm_head"], exclude=["layers.1.*"])
    assert sorted(report.replaced) == [
        "lm_head",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert ("model.layers.1.self_attn.q_proj", "excluded") in report.skipped
    assert ("model.layers.0.mlp.up_proj", "not included") in report.skipped


def test_include_matching_nothing_is_an_error_and_changes_nothing():
    model = tiny_llama()
    with pytest.raises(BitNetError, match=r"include pattern\(s\) \['qproj'\] matched no nn.Linear"):
        quantize_model(model, include=["q_proj", "qproj"])
    assert not any(isinstance(m, BitLinear) for m in model.modules())


def test_tied_head_and_bare_linear():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

    m = Tied()
    report = quantize_model(m)
    assert report.replaced == ["hidden"]
    assert report.skipped == [("out", "weight tied to an embedding")]
    with pytest.raises(BitNetError, match="BitLinear.from_linear"):
        quantize_model(nn.Linear(4, 4))


def test_config_is_shared_by_converted_layers_and_devices_kept():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    cfg = QATConfig(weight_bits=1)
    quantize_model(model, cfg)
    assert all(m.config is cfg for m in model if isinstance(m, BitLinear))
    assert model(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64
