"""apply_peft: LoRA (peft's engine) on full-precision and ternary bases, BitFit, AdaLoRA
under a plain Trainer, target resolution, and adapters that peft loads both ways."""

import os

import pytest
import torch

from bitnet_training import BitLinear, BitNetError, BitNetLM, ModelConfig
from bitnet_training.peft import PEFTConfig, apply_peft, resolve_targets, save_adapter
from bitnet_training.train import Trainer, TrainingConfig

peft = pytest.importorskip("peft")

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base(quantized=True, seed=0):
    torch.manual_seed(seed)
    return BitNetLM.bitnet(CFG) if quantized else BitNetLM(CFG)


def ids(seed=1):
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


class Windows(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = ids(i)[0]
        return {"input_ids": x, "labels": x}


def train(model, tmp_path, steps=3, **kw):
    cfg = TrainingConfig(**{
        "output_dir": str(tmp_path), "max_steps": steps, "batch_size": 2,
        "mixed_precision": "fp32", "log_every": 1, "learning_rate": 1e-2, **kw,
    })  # fmt: skip
    return Trainer(model, cfg, Windows()).train()


def test_all_linear_spares_the_head_and_bad_patterns_list_the_names():
    m = base()
    names = resolve_targets(m, ["all-linear"])
    assert len(names) == 14 and "lm_head" not in names
    assert resolve_targets(m, ["layers.1.*q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    with pytest.raises(BitNetError, match=r"'qkv' matches no linear module; the model has "):
        resolve_targets(m, ["qkv"])


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_trains_only_adapters_and_starts_at_the_base(tmp_path, quantized):
    m = base(quantized)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
    wrapped, report = apply_peft(m, PEFTConfig(method="lora", rank=4, rank_pattern=["q_proj=2"]))
    assert report.wrapped == resolve_targets(base(), ["all-linear"])
    assert report.ranks["model.layers.0.self_attn.q_proj"] == 2
    assert report.ranks["model.layers.0.mlp.up_proj"] == 4
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert report.trainable == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=x).logits, ref)  # B = 0: the base's output
    layers = [mod for mod in wrapped.modules() if isinstance(mod, BitLinear)]
    assert len(layers) == (14 if quantized else 0)  # the ternary base sits inside LoRA
    train(wrapped, tmp_path)
    after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in wrapped.state_dict().items()
        if "lora_" not in k
    }
    assert all(torch.equal(after[k], v) for k, v in before.items())  # base unchanged
    with torch.no_grad():
        assert not torch.equal(wrapped(input_ids=x).logits, ref)  # the adapters learned


def test_adapter_round_trips_through_peft(tmp_path):
    wrapped, _ = apply_peft(base(), PEFTConfig(method="lora", rank=4, target_modules=["q_proj"]))
    train(wrapped, tmp_path / "run")
    out = save_adapter(wrapped, str(tmp_path / "adapter"))
    assert sorted(os.listdir(out))[:2] == ["README.md", "adapter_config.json"] or (
        "adapter_model.safetensors" in os.listdir(out)
    )
    x = ids()
    with torch.no_grad():
        ours = wrapped(input_ids=x).logits
        theirs = peft.PeftModel.from_pretrained(base(), out)(input_ids=x).logits
    assert torch.equal(ours, theirs)  # peft loads our adapter onto the same base
    again, _ = apply_peft(
        base(), PEFTConfig(method="lora", rank=4, target_modules=["q_proj"], adapter=out)
    )
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, ours)  # and we load peft's
    assert any(p.requires_grad for p in again.parameters())
    with pytest.raises(BitNetError, match="has no adapter_model.safetensors"):
        apply_peft(base(), PEFTConfig(method="lora", adapter=str(tmp_path)))


def test_bitfit_adds_zero_biases_and_trains_only_them(tmp_path):
    m = base()
    x = ids()
    with torch.no_grad():
        ref = m(x).logits
    wrapped, report = apply_peft(m, PEFTConfig(method="bitfit", target_modules=["o_proj"]))
    assert wrapped is m and len(report.wrapped) == 2 and report.trainable == 2 * 64
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref)  # zero biases: the same output at step 0
    train(m, tmp_path)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)
    }
    assert m.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0


def test_adalora_budget_runs_under_a_plain_trainer(tmp_path):
    cfg = PEFTConfig(
        method="adalora", init_rank=6, target_rank=2, tinit=1, tfinal=1, delta_t=1,
        target_modules=["q_proj", "v_proj"],
    )  # fmt: skip
    wrapped, report = apply_peft(base(), cfg)
    assert set(report.ranks.values()) == {6}
    r = train(wrapped, tmp_path, steps=6)
    ranks = [h["adalora_rank"] for h in r.history if h["kind"] == "train"]
    assert ranks[0] == 4 * 6 and ranks[-1] < ranks[0]  # the budget shrank, no manual calls
    assert wrapped.peft_config["default"].total_step == 6


def test_method_keys_and_bases_are_checked():
    from bitnet_training.config import load_config

    with pytest.raises(BitNetError, match="peft.rank=4 has no effect here"):
        load_config(None, ["peft.method=bitfit", "peft.rank=4"])
    with pytest.raises(BitNetError, match="peft.rank_pattern"):
        load_config(None, ["peft.method=lora", "peft.rank_pattern=q_proj"])
    cfg = load_config(None, ["peft.method=lora", "peft.rank=4", "peft.target_modules=q_proj"])
    assert cfg.peft.rank == 4 and cfg.peft.target_modules == ["q_proj"]


def test_merge_into_full_precision_is_exact_and_unmerge_restores():
    m = base(quantized=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    wrapped, _ = apply_peft(m, PEFTConfig(method="lora", rank=4, init="gaussian"))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 would make the test trivial
    x = ids()
    with torch.no_grad():
        adapted = wrapped(input_ids=x).logits
        wrapped.merge_adapter()
        merged = wrapped(input_ids=x).logits
        wrapped.unmerge_adapter()
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)  # float rounding only
    restored = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in wrapped.state_dict().items()
        if "lora_" not in k
    }
    for k, v in before.items():
        torch.testing.assert_close(restored[k], v, rtol=0, atol=1e-6)  # W + BA - BA


def test_merge_into_a_ternary_base_is_measured_and_the_better_kept():
    from bitnet_training.peft.merge import merge_lora

    def adapted():
        wrapped, _ = apply_peft(base(), PEFTConfig(method="lora", rank=4))
        torch.manual_seed(3)
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
        return wrapped

    batches = [{"input_ids": ids(i), "labels": ids(i)} for i in range(3)]
    merged, report = merge_lora(adapted(), adapted, batches)
    assert set(report.measured) == {"requantize", "refit"} and report.layers == 14
    r = report.measured
    assert report.method == min(r, key=lambda k: r[k]["loss"])
    assert all(v["max_logit_diff"] > 0 for v in r.values())  # a ternary merge is not exact
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with pytest.raises(BitNetError, match="only LoRA adapters merge"):
        merge_lora(base(), adapted, batches)


def test_adapters_that_do_not_fit_are_refused(tmp_path):
    wrapped, _ = apply_peft(base(), PEFTConfig(method="lora", rank=4, target_modules=["q_proj"]))
    out = save_adapter(wrapped, str(tmp_path / "a"))
    with pytest.raises(BitNetError, match="has rank 4, peft.rank is 8: set peft.rank=4"):
        apply_peft(base(), PEFTConfig(method="lora", target_modules=["q_proj"], adapter=out))
    with pytest.raises(BitNetError, match="adapts other modules"):
        apply_peft(base(), PEFTConfig(method="lora", rank=4, adapter=out))  # all-linear here
    with pytest.raises(BitNetError, match="peft.rank_budget has no effect with peft.adapter"):
        apply_peft(base(), PEFTConfig(method="lora", target_modules=["q_proj"], rank_budget=500,
                                      adapter=out))  # fmt: skip
    with pytest.raises(BitNetError, match="is a LORA adapter; peft.method=adalora needs"):
        apply_peft(base(), PEFTConfig(method="adalora", adapter=out))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "adapter_config.json").write_text('{"peft_type": "BITFIT"}')
    (junk / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(BitNetError, match="unreadable adapter_model.safetensors"):
        apply_peft(base(), PEFTConfig(method="bitfit", adapter=str(junk)))


def test_ranks_chosen_within_a_budget_follow_singular_value_energy():
    from bitnet_training.peft import select_ranks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16))
    with torch.no_grad():  # layer 0 has rank exactly 2; layer 1 is a full-rank random matrix
        net[0].weight.copy_(torch.randn(16, 2) @ torch.randn(2, 16))
    ranks = select_ranks(net, ["0", "1"], budget=8 * 32)
    assert ranks == {"0": 2, "1": 6}  # layer 0 never gets more than its rank
    assert select_ranks(net, ["0", "1"], budget=64) == {"0": 1, "1": 1}
    with pytest.raises(BitNetError, match="rank_budget=63 is too small"):
        select_ranks(net, ["0", "1"], budget=63)


def test_rank_budget_through_apply_peft_is_reported_and_kept():
    cfg = PEFTConfig(method="lora", rank_budget=3000, target_modules=["q_proj", "up_proj"])
    wrapped, report = apply_peft(base(), cfg)
    lora = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert lora == report.trainable <= 3000
    assert "ranks chosen within 3,000 LoRA parameters" in str(report)
    for name, r in report.ranks.items():
        layer = wrapped.get_submodule("base_model.model." + name)
        assert layer.r["default"] == r


@pytest.mark.parametrize("method", ["lora", "bitfit", "prefix"])
def test_a_bfloat16_frozen_base_changes_no_output_under_bf16_autocast(tmp_path, method):
    def run(base_dtype):
        cfg = PEFTConfig(method=method, base_dtype=base_dtype)
        wrapped, report = apply_peft(base(quantized=False), cfg)
        r = train(wrapped, tmp_path / base_dtype, steps=3, mixed_precision="bf16")
        return wrapped, report, [h["loss"] for h in r.history if h["kind"] == "train"]

    ref_model, _, ref_losses = run("float32")
    model, report, losses = run("bfloat16")
    assert losses == ref_losses  # autocast rounds the weights to bf16 anyway: bit-identical
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    stored = [m for m in linears if m.weight.dtype == torch.bfloat16]
    assert report.stored == len(stored) > 0 and "stored in bfloat16" in str(report)
    assert all(not p.requires_grad for m in stored for p in m.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    model.eval()
    ref_model.eval()
    x = ids(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=x).logits, ref_model(input_ids=x).logits)
    with torch.no_grad():  # outside autocast (generation): bf16 matmuls, float32 out
        out = model(input_ids=x).logits
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref_model(input_ids=x).logits, rtol=0.05, atol=0.05)


def test_a_bfloat16_base_is_refused_where_it_cannot_apply():
    from bitnet_training.config import load_config

    with pytest.raises(BitNetError, match="this base is ternary: peft.method=qlora_ternary"):
        apply_peft(base(quantized=True), PEFTConfig(method="lora", base_dtype="bfloat16"))
    with pytest.raises(BitNetError, match="peft.base_dtype='bfloat16' has no effect here"):
        load_config(None, ["peft.method=qlora", "quantize=false", "peft.base_dtype=bfloat16"])


def llama(quantized=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = {k: getattr(CFG, k) for k in ("vocab_size", "hidden_size", "intermediate_size")}
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **shape,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).eval()
    if quantized:
        from bitnet_training import quantize_model

        quantize_model(model)
    return model


LLAMA_METHODS = {  # method -> (quantized base, what trains)
    "lora": (False, ("lora_A", "lora_B")),
    "adalora": (False, ("lora_A", "lora_B", "lora_E")),
    "bitfit": (False, ("o_proj.bias",)),
    "qlora_ternary": (True, ("lora_A", "lora_B")),
}


@pytest.mark.parametrize("method", list(LLAMA_METHODS))
def test_each_method_on_a_transformers_llama(tmp_path, method):
    quantized, trains = LLAMA_METHODS[method]
    x = ids()
    with torch.no_grad():
        ref = llama(quantized)(input_ids=x).logits
    frozen = {k: v.clone() for k, v in llama(quantized).state_dict().items()}
    extra = {"target_modules": ["o_proj"]} if method == "bitfit" else {}
    if method == "adalora":
        extra = {"init_rank": 4, "target_rank": 2, "tinit": 1, "tfinal": 1}
    wrapped, report = apply_peft(llama(quantized), PEFTConfig(method=method, **extra))
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all(any(t in n for t in trains) for n in names)
    assert report.trainable == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert "lm_head" not in " ".join(report.wrapped)
    with torch.no_grad():  # zero B / zero biases (AdaLoRA: zero E): the base's output
        torch.testing.assert_close(wrapped(input_ids=x).logits, ref, rtol=1e-6, atol=1e-6)
    train(wrapped, tmp_path, steps=4)
    after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in wrapped.state_dict().items()
        if not any(t in k for t in ("lora_", "ranknum", ".bias"))
    }
    packed = method == "qlora_ternary"  # the latent weights became packed codes
    assert packed or all(torch.equal(after[k], v) for k, v in frozen.items() if k in after)
    assert packed or sum(k in after for k in frozen) == len(frozen)
    with torch.no_grad():
        assert not torch.equal(wrapped(input_ids=x).logits, ref)  # and it learned
