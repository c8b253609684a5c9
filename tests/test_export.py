"""Export: `transformers` loads what `--format hf` writes and computes our logits, in both
weight_scale conventions and as latent (online) weights; `--format ternary` loads back with
identical logits; the byte tokenizer round-trips through AutoTokenizer; bad input is a
one-line error that leaves nothing behind."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bitnet_training import BitNetLM, ModelConfig
from bitnet_training.cli import main
from bitnet_training.data.tokenizer import ByteTokenizer
from bitnet_training.errors import BitNetError
from bitnet_training.export.hf import write_hf
from bitnet_training.export.ternary import load_ternary
from bitnet_training.export.tokenizer import write_tokenizer
from bitnet_training.models.pretrained import load_pretrained
from bitnet_training.quant.config import QATConfig
from test_cli import MICRO, run, write_corpus

transformers = pytest.importorskip("transformers")
SHAPE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def model(qat=None, **kw):
    torch.manual_seed(0)
    return BitNetLM.bitnet(ModelConfig(**{**SHAPE, **kw}), qat).double().eval()


def hf_logits(directory, ids, dtype=torch.float64):
    # transformers' BitNet quantizers are torch.compile'd: eager here (same arithmetic)
    with torch._dynamo.config.patch(disable=True):
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        return type(hf).__name__, hf(ids).logits


@pytest.mark.parametrize(
    "linear_class, mode",
    [("bitlinear", "offline"), ("autobitlinear", "offline"), ("autobitlinear", "online")],
)
def test_transformers_computes_our_logits(tmp_path, linear_class, mode):
    ours = model()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    write_hf(ours, str(tmp_path), linear_class, mode, dtype=torch.float64)
    name, theirs = hf_logits(str(tmp_path), ids)
    assert name == "BitNetForCausalLM"
    expected = ours(ids).logits
    # transformers quantizes activations in float32 (and keeps 1/gamma for bitlinear): 1e-7
    assert (theirs - expected).abs().max() <= 1e-6 * expected.abs().max()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    stored = load_file(tmp_path / "model.safetensors")
    layer = ours.model.layers[0].self_attn.q_proj
    gamma = layer.quantized_weight().scale.float()
    key = "model.layers.0.self_attn.q_proj.weight"
    if mode == "online":
        assert torch.equal(stored[key], layer.weight.detach())
        return
    assert stored[key].dtype == torch.uint8 and stored[key].shape == (16, 64)  # 4 rows a byte
    scale = stored[key + "_scale"]  # the two conventions are opposite
    assert torch.equal(scale, (1 / gamma if linear_class == "bitlinear" else gamma).reshape(1))
    # and our own loader takes it back: the same ternary codes
    back = load_pretrained(str(tmp_path), dtype=torch.float64, requantizable=True).model
    from bitnet_training.nn import quantize_model

    quantize_model(back, QATConfig())
    assert torch.equal(
        back.model.layers[0].self_attn.q_proj.quantized_weight().codes,
        layer.quantized_weight().codes,
    )


def test_byte_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    write_tokenizer(ByteTokenizer(), str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Ternary 1.58 bits: héllo, 日本語!\n\t" + "".join(map(chr, range(1, 300)))
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == ByteTokenizer().encode(text) and tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_what_the_formats_cannot_hold_is_refused(tmp_path):
    for qat, setting in [
        (QATConfig(weight_bits=2), "qat.weight_bits"),
        (QATConfig(per_channel=True), "qat.per_channel"),
        (QATConfig(activation_bits=4), "qat.activation_bits"),
        (QATConfig(norm_placement="input"), "qat.norm_placement"),
    ]:
        with pytest.raises(BitNetError, match=setting.replace(".", r"\.")):
            write_hf(model(qat), str(tmp_path))
    with pytest.raises(BitNetError, match="out_features=130, not a multiple of 4"):
        write_hf(model(intermediate_size=130), str(tmp_path))
    with pytest.raises(BitNetError, match="--mode online needs --linear-class autobitlinear"):
        write_hf(model(), str(tmp_path), "bitlinear", "online")
    plain = BitNetLM(ModelConfig(**SHAPE))
    with pytest.raises(BitNetError, match="no quantized layers"):
        write_hf(plain, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_export_from_the_command_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--no-progress", *MICRO, *corpus, "training.max_steps=3",
                       f"training.output_dir={out}")  # fmt: skip
    assert code == 0, err
    from bitnet_training.recipe import load_run

    _, ours, _, _ = load_run(str(out))
    ours = ours.eval()
    ids = torch.tensor([ByteTokenizer().encode("the quick brown fox")])
    with torch.no_grad():
        expected = ours(ids).logits
    # --format ternary: base-3 codes, 1.6 bits a weight, the same logits
    code, stdout, err = run(capsys, "export", out, "-o", tmp_path / "t", "--format", "ternary",
                            "--dtype", "float32")  # fmt: skip
    assert code == 0, err
    assert "exported" in stdout
    packed, tok = load_ternary(str(tmp_path / "t"))
    assert isinstance(tok, ByteTokenizer)
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, expected)
    q = load_file(tmp_path / "t" / "model.safetensors")["model.layers.0.mlp.gate_proj.qweight"]
    assert q.numel() == -(-128 * 64 // 5)  # 5 codes per byte
    # --format hf: transformers' pipeline generates with the exported tokenizer
    code, _, err = run(capsys, "export", out, "-o", tmp_path / "hf", "--dtype", "float32")
    assert code == 0, err
    theirs = hf_logits(str(tmp_path / "hf"), ids, torch.float32)[1]
    assert (theirs - expected).abs().max() <= 1e-4 * expected.abs().max()
    with torch._dynamo.config.patch(disable=True):
        pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
        text = pipe("the quick", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("the quick") and len(text) > len("the quick")
    # bad input: one line, status 2, nothing written
    for args, message in [
        (["--format", "gguf2"], "--format 'gguf2' is invalid"),
        (["--dtype", "int8"], "--dtype 'int8' is invalid"),
        (["--format", "ternary", "--mode", "online"], "describe the hf format only"),
        (["--linear-class", "fancy"], "--linear-class 'fancy' is invalid"),
        (["--format", "gguf"], "model.hidden_act=relu2, but llama.cpp's bitnet graph runs"),
        (["--gguf-type", "f16"], "--gguf-type describes the gguf format only"),
    ]:
        code, _, err = run(capsys, "export", out, "-o", tmp_path / "bad", *args)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()
    code, _, err = run(capsys, "export", out, "-o", tmp_path / "hf")
    assert code == 2 and "exists and is not empty" in err
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run(capsys, "export", out, "-o", tmp_path / "file.txt" / "sub")
    assert code == 2 and "cannot be created" in err and err.count("\n") == 1, err
    code, _, err = run(capsys, "export", out, "-o", tmp_path / "g", "--format", "gguf",
                       "--dtype", "float32")  # fmt: skip
    assert code == 2 and "gguf's is --gguf-type" in err
    code, _, err = run(capsys, "export", tmp_path / "nothing", "-o", tmp_path / "bad")
    assert code == 2 and not (tmp_path / "bad").exists()


def test_full_precision_runs_are_refused(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "fp"
    code, _, err = run(capsys, "train", "--no-progress", *MICRO, *corpus, "quantize=false",
                       "training.max_steps=1", f"training.output_dir={out}")  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "export", out, "-o", tmp_path / "x")
    assert code == 2 and "quantize=false" in err and not (tmp_path / "x").exists()


def test_a_quantized_llama_exports_as_its_own_class(tmp_path):
    from bitnet_training.nn import quantize_model

    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).double().eval()
    quantize_model(llama, QATConfig())
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    write_hf(llama, str(tmp_path), "autobitlinear", "offline", dtype=torch.float64)
    name, theirs = hf_logits(str(tmp_path), ids)
    assert name == "LlamaForCausalLM"
    expected = llama(ids).logits
    assert (theirs - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_an_interrupted_export_leaves_nothing(tmp_path, capsys, monkeypatch):
    import bitnet_training.export.tokenizer as tokenizer

    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--no-progress", *MICRO, *corpus, "training.max_steps=1",
                       f"training.output_dir={out}")  # fmt: skip
    assert code == 0, err

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "write_tokenizer", interrupted)  # after the weights
    assert main(["export", str(out), "-o", str(tmp_path / "x")]) != 0  # Ctrl-C mid-export
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))
