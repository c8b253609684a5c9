"""GGUF in llama.cpp's `bitnet` layout: written with `gguf`, read back by `gguf`'s reader and
our loader with the same ternary codes, checked by llama.cpp itself when llama-cpp-python is
installed; what llama.cpp's bitnet graph cannot run is refused before anything is written."""

import os

import numpy as np
import pytest
import torch

from bitnet_training import BitNetLM, ModelConfig
from bitnet_training.data.tokenizer import ByteTokenizer
from bitnet_training.errors import BitNetError
from bitnet_training.export.gguf import write_gguf
from bitnet_training.models.pretrained import load_pretrained
from bitnet_training.nn import quantize_model
from bitnet_training.nn.bitlinear import BitLinear
from bitnet_training.quant.config import QATConfig

gguf = pytest.importorskip("gguf")
SHAPE = dict(
    vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    hidden_act="silu", tie_word_embeddings=True,
)  # fmt: skip
IDS = torch.tensor([ByteTokenizer().encode("the quick brown fox jumps")])


def model(**kw):
    torch.manual_seed(0)
    return BitNetLM.bitnet(ModelConfig(**{**SHAPE, **kw})).eval()


def codes(m):
    return [x.quantized_weight() for x in m.modules() if isinstance(x, BitLinear)]


@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0", "f16", "f32"])
def test_gguf_reads_back_with_the_same_codes(tmp_path, kind):
    ours = model()
    path = str(tmp_path / f"m-{kind}.gguf")
    write_gguf(ours, ByteTokenizer(), path, kind)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_q.scale"] == "F32"
    p = load_pretrained(path)  # our loader: transformers' has no bitnet architecture
    assert p.kind == "gguf" and isinstance(p.tokenizer, ByteTokenizer)
    back = p.model
    quantize_model(back, QATConfig())
    back.eval()
    for a, b in zip(codes(ours), codes(back), strict=True):
        assert torch.equal(a.codes, b.codes) and torch.allclose(a.scale, b.scale, rtol=1e-6)
    if kind != "f32":  # the embedding (also the output layer) is stored in f16
        with torch.no_grad():
            w = ours.model.embed_tokens.weight
            w.copy_(w.half().float())
    expected = ours(IDS).logits
    assert (back(IDS).logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_what_llama_cpp_cannot_run_is_refused(tmp_path):
    path = str(tmp_path / "m.gguf")
    for kw, message in [
        ({"hidden_act": "relu2"}, "model.hidden_act=relu2, but llama.cpp's bitnet graph runs"),
        ({"tie_word_embeddings": False}, "model.tie_word_embeddings=false"),
    ]:
        with pytest.raises(BitNetError, match=message):
            write_gguf(model(**kw), ByteTokenizer(), path)
    narrow = model(hidden_size=384, num_attention_heads=6)  # the tiny preset's width
    with pytest.raises(BitNetError, match=r"q_proj has in_features=384, not a multiple of 256"):
        write_gguf(narrow, ByteTokenizer(), path, "tq1_0")
    with pytest.raises(BitNetError, match="--gguf-type 'q4_0' is invalid"):
        write_gguf(model(), ByteTokenizer(), path, "q4_0")
    assert not os.path.exists(path)
    write_gguf(narrow, ByteTokenizer(), path, "f16")  # f16 / f32 have no block size


# Measured: f32 4.5e-4 (llama.cpp keeps its KV cache in f16); TQ 2.6e-2 on this random-init
# model, whose logits our own per-token activation quantization moves by 2.5%.
@pytest.mark.parametrize("kind, tolerance", [("f32", 1e-3), ("tq2_0", 5e-2), ("tq1_0", 5e-2)])
def test_llama_cpp_runs_the_file(tmp_path, kind, tolerance):
    """llama.cpp (llama-cpp-python, built from source) loads the GGUF and computes our
    logits: with ternary types it quantizes activations per 256-value block (Q8_K), not per
    token, so it agrees approximately; with f32 weights it does not quantize activations, so
    it is compared with our model without activation quantization."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ours = model()
    path = str(tmp_path / f"m-{kind}.gguf")
    write_gguf(ours, ByteTokenizer(), path, kind)
    llm = llama_cpp.Llama(path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize(b"the quick", add_bos=False, special=False) == IDS[0, :9].tolist()
    llm.eval(IDS[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[: IDS.shape[1]], dtype=np.float32))
    with torch.no_grad():
        if kind == "f32":
            for m in ours.modules():
                if isinstance(m, BitLinear):
                    m.config = m.config.replace(enable_activation_quantization=False)
        else:
            w = ours.model.embed_tokens.weight
            w.copy_(w.half().float())
        expected = ours(IDS).logits[0]
    rel = ((theirs - expected).abs().max() / expected.abs().max()).item()
    assert rel <= tolerance, rel


def test_a_declared_target_is_checked_before_training(tmp_path, capsys):
    from bitnet_training.cli import main

    out = tmp_path / "run"
    for args, message in [
        (["export_target=gguf-tq2_0"], "export_target=gguf-tq2_0: model.hidden_act=relu2"),
        (["export_target=gguf-tq1_0", "model.hidden_act=silu", "model.tie_word_embeddings=true"],
         "q_proj has in_features=384, not a multiple of 256"),
        (["export_target=hf", "model.intermediate_size=1026"], "out_features=1026"),
    ]:  # fmt: skip
        assert main(["train", f"training.output_dir={out}", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()  # refused before anything was written
    # the ternary format packs per-channel scales: declaring it does not refuse them
    assert main(["plan", "--device", "cpu", "export_target=ternary", "qat.per_channel=true"]) == 0
    capsys.readouterr()
    assert main(["plan", "export_target=gguf-f16", "model.hidden_act=silu"]) == 2
    assert "model.tie_word_embeddings=false" in capsys.readouterr().err
