"""BitNetLM against transformers' BitNetForCausalLM, and its generation."""

import pytest
import torch

from bitnet_training import BitLinear, BitNetLM, ModelConfig, QATConfig, quantize_model
from bitnet_training.errors import BitNetError, ConfigError

transformers = pytest.importorskip("transformers")


def small_config(**kw):
    return ModelConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )


def hf_twin(cfg: ModelConfig, ours: BitNetLM, quantized: bool):
    """transformers' BitNetForCausalLM with `ours`' weights; AutoBitLinear (online) if quantized."""
    from transformers.integrations.bitnet import AutoBitLinear

    hf_cfg = transformers.BitNetConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act=cfg.hidden_act,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    hf = transformers.BitNetForCausalLM(hf_cfg)
    if quantized:  # what quantization_config linear_class=autobitlinear, mode=online builds
        for name, m in list(hf.named_modules()):
            if type(m) is torch.nn.Linear and name != "lm_head":
                new = AutoBitLinear(m.in_features, m.out_features, bias=False, online_quant=True)
                hf.set_submodule(name, new)
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf.eval()


def test_parameter_names_equal_transformers():
    cfg = small_config()
    ours = BitNetLM.bitnet(cfg)
    hf = hf_twin(cfg, ours, quantized=False)
    assert list(ours.state_dict()) == list(hf.state_dict())


@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_logits_equal_transformers_without_quantization(act):
    cfg = small_config(hidden_act=act)
    ours = BitNetLM(cfg).eval()
    hf = hf_twin(cfg, ours, quantized=False)
    ids = torch.randint(0, 96, (2, 24))
    # Same math; SDPA vs eager attention sum in a different order: 1e-5.
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qat", [QATConfig(fused=False), QATConfig()])
def test_logits_equal_transformers_autobitlinear_online(qat):
    cfg = small_config()
    ours = BitNetLM.bitnet(cfg, qat).eval()
    hf = hf_twin(cfg, ours, quantized=True)
    ids = torch.randint(0, 96, (2, 24))
    # AutoBitLinear's quantizers are wrapped in torch.compile; run them eagerly (same math).
    with torch._dynamo.config.patch(disable=True):
        b = hf(ids).logits
    a = ours(ids).logits
    # Identical ternary and int8 codes; only float summation order differs (measured max
    # |diff| 3e-7, against 0.6 between quantized and unquantized logits): 1e-5.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_forward_backward_and_loss():
    model = BitNetLM.bitnet(small_config())
    ids = torch.randint(0, 96, (3, 16))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 16, 96)
    ref = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_qat_training_learns_a_sequence():
    model = BitNetLM.bitnet(small_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(32).remainder(96).view(1, 32).repeat(4, 1)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate_cached_equals_uncached_and_greedy():
    model = BitNetLM.bitnet(small_config()).double()
    prompt = torch.randint(0, 96, (2, 5))
    a = model.generate(prompt, max_new_tokens=12, use_cache=True)
    b = model.generate(prompt, max_new_tokens=12, use_cache=False)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    # Greedy: each new token is the argmax of the full-sequence forward.
    logits = model(a[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), a[:, 5:])


def test_generate_sampling_topk_temperature_eos():
    model = BitNetLM.bitnet(small_config())
    prompt = torch.randint(0, 96, (2, 4))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(prompt, 10, do_sample=True, temperature=0.8, top_k=5, generator=g1)
    s2 = model.generate(prompt, 10, do_sample=True, temperature=0.8, top_k=5, generator=g2)
    assert torch.equal(s1, s2)
    # top_k=1 sampling is greedy.
    k1 = model.generate(prompt, 10, do_sample=True, top_k=1, generator=g1)
    assert torch.equal(k1, model.generate(prompt, 10))
    # Every sampled token is among the top 5 of its step.
    logits = model(s1[:, :-1]).logits[:, 3:]
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == s1[:, 4:, None]).any(-1).all()
    greedy = model.generate(prompt, 10)
    eos = int(greedy[0, 6])
    out = model.generate(prompt, 10, eos_token_id=eos)
    row = out[0, 4:].tolist()
    assert eos in row and all(t == eos for t in row[row.index(eos) :])


def test_generate_and_forward_errors():
    model = BitNetLM(small_config())
    with pytest.raises(ConfigError, match="temperature=0"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, do_sample=True, temperature=0)
    with pytest.raises(BitNetError, match="exceeds max_position_embeddings=64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(BitNetError, match=r"input_ids must be \(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_tied_embeddings_and_presets():
    model = BitNetLM(small_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tiny = ModelConfig.preset("tiny")
    assert 5e6 <= tiny.num_parameters() <= 15e6
    assert BitNetLM("tiny").num_parameters() == tiny.num_parameters()
    big = ModelConfig.preset("2b4t")  # shape only: never instantiated in tests
    assert (big.hidden_size, big.num_hidden_layers, big.num_key_value_heads) == (2560, 30, 5)
    assert 2.3e9 < big.num_parameters() < 2.5e9
    with pytest.raises(BitNetError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="model.num_key_value_heads=3"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=64)


def test_generate_under_inference_mode_equals_no_grad():
    model = BitNetLM.bitnet(small_config())
    prompt = torch.randint(0, 96, (1, 4))
    expected = model.generate(prompt, 6)
    with torch.inference_mode():
        assert torch.equal(model.generate(prompt, 6), expected)


def test_models_build_plain_linears_and_quantization_is_the_transform():
    plain = BitNetLM(small_config())
    assert not any(isinstance(m, BitLinear) for m in plain.modules())
    torch.manual_seed(0)
    a = BitNetLM.bitnet(small_config(), QATConfig(weight_bits=1))
    torch.manual_seed(0)
    b = BitNetLM(small_config())
    quantize_model(b, QATConfig(weight_bits=1))
    names = [n for n, m in a.named_modules() if isinstance(m, BitLinear)]
    assert len(names) == 7 * 2 and "lm_head" not in names
    assert all(m.config.weight_bits == 1 for m in a.modules() if isinstance(m, BitLinear))
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(a(ids).logits, b(ids).logits)
