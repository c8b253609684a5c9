"""Prefix tuning and P-tuning v2 on BitNetLM (plain and ternary) and on a tiny transformers
Llama: only the prefix trains, the base stays bit-identical, the prefix is exactly extra
key/value positions (a prefix made of a real prompt's cache equals prompting with it), and
generation continues from it."""

import inspect
import warnings

import pytest
import torch
from torch import nn

from bitnet_training.errors import BitNetError
from bitnet_training.models import BitNetLM, ModelConfig
from bitnet_training.peft.prompt import apply_prompt

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
HEADS = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
L, KV, HD, NVT = 2, 2, 16, 5  # layers, kv heads, head_dim, virtual tokens
KV_DIM = KV * HD
BACKENDS = ["plain", "ternary", "llama"]


@pytest.fixture(autouse=True)
def _quiet():
    # peft still passes transformers' deprecated `past_key_values` name: not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def make_base(backend: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if backend == "llama":
        cfg = transformers.LlamaConfig(**SHAPE, **HEADS)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = ModelConfig(**SHAPE, **HEADS)
    return (BitNetLM.bitnet(cfg) if backend == "ternary" else BitNetLM(cfg)).eval()


def batch(b=2, t=8, seed=1):
    return torch.randint(0, 96, (b, t), generator=torch.Generator().manual_seed(seed))


def base_logits(base, ids, cache=None):
    """The base's logits, `cache` (per layer (k, v)) as its past: our hand-built forward."""
    if isinstance(base, BitNetLM):
        return base(ids, past_key_values=cache).logits
    kw = {}
    if cache is not None:
        hf = transformers.DynamicCache()
        for i, (k, v) in enumerate(cache):
            hf.update(k, v, i)
        # transformers 5.x renamed `past_key_values` to `cache`.
        params = inspect.signature(base.forward).parameters
        kw = {"cache" if "cache" in params else "past_key_values": hf}
    past = cache[0][0].shape[2] if cache is not None else 0
    mask = torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.long)
    return base(input_ids=ids, attention_mask=mask, **kw).logits


def hand_prefix(flat: torch.Tensor, b: int):
    """peft's flattened layout by explicit indexing: per virtual token, layer i's key is slot
    2i and its value 2i + 1, each kv_heads x head_dim. -> per layer (k, v) (b, KV, NVT, HD)."""
    n = flat.shape[0]
    slots = flat.reshape(n, 2 * L, KV, HD)
    out = []
    for i in range(L):
        k = torch.stack([torch.stack([slots[j, 2 * i, h] for j in range(n)]) for h in range(KV)])
        v = torch.stack(
            [torch.stack([slots[j, 2 * i + 1, h] for j in range(n)]) for h in range(KV)]
        )
        out.append((k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["prefix", "ptuning_v2"])
def test_only_the_prefix_trains(backend, method):
    model = apply_prompt(make_base(backend), method, NVT)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 1 and names[0].endswith("embedding.weight")
    assert model.trainable_parameters() == NVT * L * 2 * KV_DIM == 640
    assert set(model.adapter_state_dict()) == {"embedding.weight"}
    assert model.method == method


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(backend):
    base = make_base(backend)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_prompt(base, "ptuning_v2", NVT)
    start = model.adapter_state_dict()["embedding.weight"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = batch()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = base.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not torch.equal(model.adapter_state_dict()["embedding.weight"], start)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_equal_a_hand_built_forward_with_the_same_prefix(backend):
    base = make_base(backend)
    model = apply_prompt(base, "prefix", NVT)
    ids = batch()
    with torch.no_grad():
        got = model(input_ids=ids)
        cache = hand_prefix(model.adapter_state_dict()["embedding.weight"], ids.shape[0])
        want = base_logits(base, ids, cache)
        plain = base_logits(base, ids)
    assert got.logits.shape == (2, 8, 96)  # the real tokens only
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-5)
    assert (got.logits - plain).abs().max() > 1e-2  # the prefix does act


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_prefix_made_of_a_prompts_cache_equals_prompting_with_it(backend):
    # The strongest check of layout, positions and mask: the prefix *is* extra positions 0..P-1
    # seen by every real token. float64, so no int8 activation code flips (DESIGN.md).
    base = make_base(backend).double()
    prompt, ids = batch(1, NVT, seed=3), batch(1, 6, seed=4)
    with torch.no_grad():
        if isinstance(base, BitNetLM):
            cache = base(prompt, use_cache=True).past_key_values
        else:
            out = base(input_ids=prompt, use_cache=True)
            hf = out["cache"] if "cache" in out else out["past_key_values"]
            cache = [(layer.keys, layer.values) for layer in hf.layers]
        # peft's flattened layout: per token [layer 0 k, layer 0 v, layer 1 k, ...].
        flat = torch.cat(
            [t[0].permute(1, 0, 2).reshape(NVT, KV_DIM) for kv in cache for t in kv], dim=1
        )
        model = apply_prompt(base, "ptuning_v2", NVT).double()
        model.load_adapter_state_dict({"prompt_embeddings": flat})
        got = model(input_ids=ids).logits
        want = base_logits(base, torch.cat((prompt, ids), dim=1))[:, NVT:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_projection_trains_the_encoder_mlp(backend):
    model = apply_prompt(make_base(backend), "prefix", NVT, prefix_projection=True)
    hidden = 64  # default: the model's hidden size
    mlp = KV_DIM * hidden + hidden + hidden * L * 2 * KV_DIM + L * 2 * KV_DIM
    assert model.trainable_parameters() == NVT * KV_DIM + mlp
    small = apply_prompt(make_base(backend), "prefix", NVT, True, encoder_hidden_size=16)
    assert small.trainable_parameters() == NVT * KV_DIM + KV_DIM * 16 + 16 + 16 * 128 + 128
    state = small.adapter_state_dict()
    assert set(state) == {
        "embedding.weight",
        *(f"transform.{i}.{p}" for i in (0, 2) for p in ["weight", "bias"]),
    }
    ids = batch()
    small(input_ids=ids, labels=ids).loss.backward()
    first = dict(small.named_parameters())
    grads = {n: p.grad for n, p in first.items() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_equals_a_manual_argmax_loop(backend):
    model = apply_prompt(make_base(backend), "prefix", NVT)
    ids = batch(2, 4)
    out = model.generate(ids, max_new_tokens=6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(ids, max_new_tokens=6, use_cache=False), seq)
    # Sampling follows the generator; top_k=1 is greedy.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1 = model.generate(ids, 5, do_sample=True, temperature=0.7, top_k=5, generator=g1)
    s2 = model.generate(ids, 5, do_sample=True, temperature=0.7, top_k=5, generator=g2)
    assert torch.equal(s1, s2) and s1.shape == (2, 9)
    assert torch.equal(model.generate(ids, 6, do_sample=True, top_k=1), seq)


def test_generation_counts_the_prefix_in_the_position_limit():
    model = apply_prompt(make_base("plain"), "prefix", NVT)
    with pytest.raises(BitNetError, match=r"past \(5\) \+ prompt \(55\) \+ max_new_tokens \(5\)"):
        model.generate(torch.zeros(1, 55, dtype=torch.long), 5)
    assert model.generate(torch.zeros(1, 55, dtype=torch.long), 4).shape == (1, 59)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_state_round_trips_and_mismatches_are_refused(backend):
    model = apply_prompt(make_base(backend), "prefix", NVT)
    other = apply_prompt(make_base(backend), "prefix", NVT)
    ids = batch()
    with torch.no_grad():
        other.load_adapter_state_dict(model.adapter_state_dict())
        assert torch.equal(other(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(BitNetError, match=r"embedding.weight has shape \(3, 128\)"):
        other.load_adapter_state_dict({"embedding.weight": torch.zeros(3, 128)})
    with pytest.raises(BitNetError, match="keys .* do not match"):
        other.load_adapter_state_dict({"lora_A": torch.zeros(1)})
    projected = apply_prompt(make_base(backend), "prefix", NVT, prefix_projection=True)
    with pytest.raises(BitNetError, match="cannot be loaded into a prefix_projection"):
        projected.load_adapter_state_dict({"prompt_embeddings": torch.zeros(NVT, 128)})
    with pytest.raises(BitNetError, match="cannot be merged") as err:
        model.merge()
    assert "\n" not in str(err.value)


def test_zero_init_gives_zero_prefixes():
    for backend in ("plain", "llama"):
        model = apply_prompt(make_base(backend), "ptuning_v2", NVT, init="zero")
        assert model.adapter_state_dict()["embedding.weight"].abs().sum() == 0


def test_a_peft_saved_llama_prefix_loads_with_peft_and_gives_the_same_logits(tmp_path):
    from peft import PeftModel

    model = apply_prompt(make_base("llama"), "ptuning_v2", NVT)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(make_base("llama"), str(tmp_path))
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_arguments_are_one_line_errors():
    base = make_base("plain")
    cases = [
        (dict(method="prefix", num_virtual_tokens=0), "num_virtual_tokens=0"),
        (dict(method="prefix", num_virtual_tokens=2.5), "num_virtual_tokens=2.5"),
        (dict(method="lora", num_virtual_tokens=4), "method='lora'.*prefix, ptuning_v2"),
        (dict(method="prefix", num_virtual_tokens=4, init="xavier"), "init='xavier'"),
        (
            dict(method="ptuning_v2", num_virtual_tokens=4, prefix_projection=True),
            "prefix_projection=True is invalid for ptuning_v2",
        ),
        (
            dict(method="prefix", num_virtual_tokens=4, encoder_hidden_size=8),
            "needs prefix_projection=True",
        ),
        (
            dict(method="prefix", num_virtual_tokens=4, prefix_projection=True,
                 encoder_hidden_size=0),
            "encoder_hidden_size=0",
        ),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(BitNetError, match=message) as err:
            apply_prompt(base, **kwargs)
        assert "\n" not in str(err.value)
    assert all(p.requires_grad for p in base.parameters())  # refused before freezing
    with pytest.raises(BitNetError, match="got Sequential, which has none to prefix"):
        apply_prompt(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8)), "prefix", 4)
    base.model.layers = nn.ModuleList()
    with pytest.raises(BitNetError, match="no decoder layers"):
        apply_prompt(base, "prefix", 4)
