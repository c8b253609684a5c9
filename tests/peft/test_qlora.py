"""QLoRA (NF4 through bitsandbytes) on `BitNetLM` and a `transformers` Llama, and the 8-bit /
paged AdamW that goes with it: the base is stored in NF4 with double quantization, only the
adapters train, the base's NF4 codes stay as they were, outputs at step 0 are the NF4 base's,
adapters round-trip through peft, a merge into the dequantized base is exact, and 8-bit AdamW
resumes bit-exactly."""

import pytest
import torch

from bitnet_training import BitNetError, BitNetLM, ModelConfig
from bitnet_training.optim import OptimizerConfig, build_optimizer
from bitnet_training.peft import PEFTConfig, apply_peft, save_adapter
from bitnet_training.peft.nf4 import nf4_linears, nf4_round_trip, quantize_nf4
from bitnet_training.train import CheckpointIO, Trainer, TrainingConfig

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

SHAPE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
BACKENDS = ["bitnet", "llama"]


def base(backend="bitnet", seed=0):
    torch.manual_seed(seed)
    if backend == "llama":
        transformers = pytest.importorskip("transformers")
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
    return BitNetLM(ModelConfig(**SHAPE)).eval()


def ids(seed=1):
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


class Windows(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = ids(i)[0]
        return {"input_ids": x, "labels": x}


def train(model, out, steps=3, resume=None, **kw):
    cfg = TrainingConfig(
        output_dir=str(out), max_steps=steps, batch_size=2, mixed_precision="fp32",
        log_every=1, learning_rate=1e-2, **kw,
    )  # fmt: skip
    # The NF4 base is rebuilt from its source: checkpoints hold what trains (as PEFT runs do).
    io = CheckpointIO(trainable_only=True)
    return Trainer(model, cfg, Windows(), checkpoint_io=io).train(resume_from=resume)


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x).logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_qlora_stores_the_base_in_nf4_and_trains_only_the_adapters(tmp_path, backend):
    reference = nf4_round_trip(base(backend))  # the weights NF4 gives back, full precision
    wrapped, report = apply_peft(base(backend), PEFTConfig(method="qlora", rank=4))
    nf4 = [m for m in wrapped.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(nf4) == 14 and all(m.weight.quant_state.nested for m in nf4)  # double quant
    assert all(m.weight.dtype == torch.uint8 for m in nf4)  # two codes per byte
    assert report.total == sum(p.numel() for p in base(backend).parameters()) + (
        report.trainable
    )  # the NF4 weights count as the weights they stand for
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # B = 0: the output is the NF4 base's, which is the dequantized weights' output.
    torch.testing.assert_close(logits(wrapped), logits(reference), rtol=1e-5, atol=1e-5)
    codes = [m.weight.detach().clone() for m in nf4]
    train(wrapped, tmp_path)
    assert all(torch.equal(m.weight, c) for m, c in zip(nf4, codes, strict=True))
    assert not torch.equal(logits(wrapped), logits(reference))  # the adapters learned


def test_double_quant_can_be_turned_off_and_the_head_stays_full_precision():
    model = base()
    names = quantize_nf4(model, double_quant=False)
    assert "lm_head" not in names and type(model.lm_head) is torch.nn.Linear
    assert not model.model.layers[0].mlp.up_proj.weight.quant_state.nested
    with pytest.raises(BitNetError, match="no linear layer to store in NF4"):
        quantize_nf4(model)  # already NF4: nothing left to store


def test_a_ternary_base_is_refused_with_the_method_to_use():
    with pytest.raises(BitNetError, match="use peft.method=qlora_ternary"):
        apply_peft(BitNetLM.bitnet(ModelConfig(**SHAPE)), PEFTConfig(method="qlora"))
    from bitnet_training.config import load_config

    with pytest.raises(BitNetError, match="peft.packing='base3' has no effect here"):
        load_config(None, ["peft.method=qlora", "peft.packing=base3", "quantize=false"])
    with pytest.raises(BitNetError, match="peft.double_quant=false has no effect here"):
        load_config(None, ["peft.method=lora", "peft.double_quant=false"])


def test_qlora_adapter_round_trips_through_peft(tmp_path):
    cfg = PEFTConfig(method="qlora", rank=4, target_modules=["q_proj", "down_proj"])
    wrapped, _ = apply_peft(base(), cfg)
    train(wrapped, tmp_path / "run")
    out = save_adapter(wrapped, str(tmp_path / "adapter"))
    theirs = base()
    quantize_nf4(theirs)
    theirs = peft.PeftModel.from_pretrained(theirs, out)
    assert torch.equal(logits(theirs), logits(wrapped))  # peft loads it onto the NF4 base
    again, _ = apply_peft(base(), cfg.model_copy(update={"adapter": out}))
    assert torch.equal(logits(again), logits(wrapped))  # and we load it back


def test_merging_into_the_dequantized_base_is_exact(tmp_path):
    from bitnet_training.peft.merge import merge_lora

    cfg = PEFTConfig(method="qlora", rank=4)
    wrapped, _ = apply_peft(base(), cfg)
    train(wrapped, tmp_path)
    adapter = save_adapter(wrapped, str(tmp_path / "adapter"))

    def unpacked():  # what `bitnet-train merge` builds for a QLoRA run
        model, _ = apply_peft(base(), PEFTConfig(method="lora", rank=4, adapter=adapter))
        return nf4_round_trip(model)

    x = ids(5)
    batches = [{"input_ids": x, "labels": x}]
    merged, report = merge_lora(unpacked(), unpacked, batches)
    assert report.method == "requantize" and report.layers == 14  # full precision: one way
    assert report.measured["requantize"]["max_logit_diff"] < 1e-4
    torch.testing.assert_close(logits(merged, x), logits(wrapped, x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert len(nf4_linears(merged)) == 14


def test_adamw8bit_trains_and_resumes_bit_exactly(tmp_path):
    model = BitNetLM.bitnet(ModelConfig(**SHAPE))
    opt = build_optimizer(model, OptimizerConfig(name="adamw8bit"), 1e-3)
    assert type(opt).__name__ == "AdamW8bit"
    wrapped, _ = apply_peft(base(), PEFTConfig(method="qlora", rank=4))
    full = train(wrapped, tmp_path / "full", steps=4, optimizer="adamw8bit")

    first, _ = apply_peft(base(), PEFTConfig(method="qlora", rank=4))
    train(first, tmp_path / "part", steps=4, optimizer="adamw8bit", save_every=2)
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoint-00000004")
    (tmp_path / "part" / "latest").write_text("checkpoint-00000002\n")
    again, _ = apply_peft(base(), PEFTConfig(method="qlora", rank=4))
    resumed = train(
        again, tmp_path / "part", steps=4, resume="latest", optimizer="adamw8bit", save_every=2
    )

    def losses(r):
        return [h["loss"] for h in r.history if h["kind"] == "train"]

    assert losses(resumed) == losses(full)[2:]


def test_a_full_checkpoint_of_a_4bit_base_is_refused_before_training(tmp_path):
    wrapped, _ = apply_peft(base(), PEFTConfig(method="qlora", rank=4))
    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2)
    with pytest.raises(BitNetError, match=r"CheckpointIO\(trainable_only=True\)"):
        Trainer(wrapped, cfg, Windows()).train()
    assert not any(tmp_path.iterdir())


def test_paged_optimizer_states_need_a_gpu():
    model = BitNetLM(ModelConfig(**SHAPE))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: paging applies")
    with pytest.raises(BitNetError, match="paged=true needs a CUDA GPU"):
        build_optimizer(model, OptimizerConfig(paged=True), 1e-3)
    with pytest.raises(BitNetError, match="paged"):
        OptimizerConfig(name="sgd", paged=True)
