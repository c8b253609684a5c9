"""load_pretrained: transformers folders, transformers BitNet checkpoints (packed, both
weight_scale conventions, and latent), GGUF, the run's base copy, and every bad input."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_training.data.tokenizer import tokenizer_id
from bitnet_training.errors import BitNetError
from bitnet_training.models.bitnet import BitNetLM
from bitnet_training.models.pretrained import (
    build_from_base,
    load_pretrained,
    save_base_files,
    unpack_ternary,
)

transformers = pytest.importorskip("transformers")

from bitnet_training.data.hf_tokenizer import PretrainedTokenizer  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXTS = ["hello world, the quick brown fox", "jumps over the lazy dog", "ünïcode 🙂 text"]
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def make_tokenizer(directory):
    """A byte-level BPE (~300 tokens) with eos and bos, saved as transformers files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>"
    )
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LlamaForCausalLM and its tokenizer saved with save_pretrained; (dir, model)."""
    d = str(tmp_path_factory.mktemp("llama"))
    tok = make_tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), **SHAPE)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    return d, model


def ids(vocab=290):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# transformers folders


def test_transformers_folder_logits_tokenizer_and_fingerprint(llama_dir):
    d, model = llama_dir
    p = load_pretrained(d)
    assert (p.kind, p.source) == ("transformers", os.path.abspath(d))
    assert all(
        type(m) is torch.nn.Linear for m in p.model.modules() if isinstance(m, torch.nn.Linear)
    )
    assert p.config["model_type"] == "llama" and p.config["hidden_size"] == 64
    with torch.no_grad():
        assert torch.equal(p.model(ids()).logits, model(ids()).logits)
    tok = p.tokenizer
    assert isinstance(tok, PretrainedTokenizer) and tok.path == os.path.join(
        p.source, "tokenizer.json"
    )
    assert tok.vocab_size == len(tok) == len(tok.tok) == model.config.vocab_size
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 1, None)
    for text in [*TEXTS, "  two  spaces\nand a newline "]:
        assert tok.decode(tok.encode(text)) == text
    framed = tok.encode(TEXTS[0], add_bos=True, add_eos=True)
    assert framed == [1, *tok.encode(TEXTS[0]), 0]
    assert tok.decode(framed) == TEXTS[0]
    assert tok.decode(framed, skip_special_tokens=False) == f"<s>{TEXTS[0]}<|endoftext|>"
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.decode(torch.tensor(tok.encode(TEXTS[1]))) == TEXTS[1]
    # Same bytes, same fingerprint; bf16 loading does not change what the base is.
    assert load_pretrained(d, dtype=torch.bfloat16).fingerprint == p.fingerprint
    assert next(load_pretrained(d, dtype="bfloat16").model.parameters()).dtype == torch.bfloat16


def test_fingerprint_changes_with_one_weight(llama_dir, tmp_path):
    d, _ = llama_dir
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    assert load_pretrained(str(copy)).fingerprint == load_pretrained(d).fingerprint
    f = str(copy / "model.safetensors")
    state = load_file(f)
    state["model.norm.weight"][3] += 1e-3
    save_file(state, f, metadata={"format": "pt"})
    assert load_pretrained(str(copy)).fingerprint != load_pretrained(d).fingerprint


def test_base_files_rebuild_without_the_source(llama_dir, tmp_path):
    d, model = llama_dir
    src = tmp_path / "src"
    shutil.copytree(d, src)
    p = load_pretrained(str(src))
    base = save_base_files(p, str(tmp_path / "run"))
    assert base == str(tmp_path / "run" / "base")
    meta = json.loads((tmp_path / "run" / "base" / "source.json").read_text())
    assert meta["kind"] == "transformers" and meta["fingerprint"] == p.fingerprint
    assert meta["source"] == str(src)
    tid = tokenizer_id(p.tokenizer)
    shutil.rmtree(src)  # the run must not need its base path any more
    rebuilt = build_from_base(base)
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ids()).logits, model(ids()).logits)
    tok = PretrainedTokenizer(base)
    assert tokenizer_id(tok) == tid and tok.encode(TEXTS[2]) == p.tokenizer.encode(TEXTS[2])
    # Same base again: replaced; another base: refused.
    assert save_base_files(p, str(tmp_path / "run")) == base
    p.fingerprint = "0" * 16
    with pytest.raises(BitNetError, match="already holds another base model"):
        save_base_files(p, str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# transformers BitNet checkpoints


def hand_pack(codes: torch.Tensor) -> torch.Tensor:
    """bitnet-facts.md: uint8 (ceil(out/4), in); byte [j, k] holds codes + 1 of rows j, j+R,
    j+2R, j+3R of column k in bits 0-1, 2-3, 4-5, 6-7."""
    out = codes.shape[0]
    r = -(-out // 4)
    packed = torch.zeros(r, *codes.shape[1:], dtype=torch.uint8)
    for i in range(4):
        block = (codes[i * r : (i + 1) * r] + 1).to(torch.uint8)
        packed[: block.shape[0]] |= block << (2 * i)
    return packed


def test_unpack_known_bytes_and_transformers_packing():
    # The worked example in transformers.integrations.bitnet.unpack_weights' docstring.
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    want = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert unpack_ternary(packed, 8).tolist() == want
    assert packed.tolist() == [[0b10100001, 0b00011000], [0b10010000, 0b00001010]]  # untouched
    from transformers.integrations.bitnet import pack_weights

    g = torch.Generator().manual_seed(0)
    for out in (8, 6, 5):  # 6 and 5: the last byte plane is partly padding
        codes = torch.randint(-1, 2, (out, 7), generator=g, dtype=torch.int8)
        mine = hand_pack(codes)
        assert torch.equal(mine, pack_weights(codes.clone().float()))
        assert torch.equal(unpack_ternary(mine, out), codes)
    with pytest.raises(BitNetError, match="cannot hold 12 rows"):
        unpack_ternary(hand_pack(codes), 12)


def bitnet_config(vocab_size=300, **kw):
    return transformers.BitNetConfig(
        vocab_size=vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=0,
        **SHAPE,
        **kw,
    )


def write_checkpoint(directory, cfg, linear_class=None, mode="offline", seed=0):
    """A transformers checkpoint of `cfg` with ternary projections (codes times a power of two,
    so both conventions are exact). linear_class None: unquantized float32 weights; else packed
    uint8 + weight_scale (bitlinear: 1 / gamma, autobitlinear: gamma), or latent float weights
    for mode "online". Returns the expected float64 state dict."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    expected, stored = {}, {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        t = t.double()
        if name.endswith("norm.weight"):
            t = 1 + 0.25 * torch.randn_like(t)  # not all ones: a dropped norm would show
        if name.split(".")[-2] in PROJ:
            codes = torch.randint(-1, 2, t.shape, dtype=torch.int8)
            gamma = 2.0 ** -(3 + i % 4)
            t = codes.double() * gamma
            if linear_class is not None and mode == "offline":
                scale = 1 / gamma if linear_class == "bitlinear" else gamma
                stored[name] = hand_pack(codes)
                stored[name + "_scale"] = torch.tensor([scale], dtype=torch.bfloat16)
        expected[name] = t.float().double()
        stored.setdefault(name, t.float())
    if getattr(cfg, "tie_word_embeddings", False):
        del stored["lm_head.weight"]
    os.makedirs(directory, exist_ok=True)
    save_file(stored, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    if linear_class is not None:
        d["quantization_config"] = {
            "quant_method": "bitnet",
            "linear_class": linear_class,
            "quantization_mode": mode,
            "modules_to_not_convert": None,
        }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(d, f)
    return expected


def assert_weights(model, expected):
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_packed_bitnet_checkpoint(tmp_path, linear_class):
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, unpack_weights

    cfg = bitnet_config()
    d = str(tmp_path / "packed")
    expected = write_checkpoint(d, cfg, linear_class)
    p = load_pretrained(d, dtype=torch.float64)
    assert p.kind == "bitnet" and type(p.model) is BitNetLM and p.tokenizer is None
    assert p.config["quantization_config"]["linear_class"] == linear_class
    assert_weights(p.model, expected)
    # transformers' own layers, fed the identity, give their effective (dequantized) weight:
    # the activation quantizer maps each one-hot row to itself.
    stored = load_file(os.path.join(d, "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    w, s = stored[name + ".weight"], stored[name + ".weight_scale"]
    with torch._dynamo.config.patch(disable=True):  # their quantizers are torch.compile'd
        if linear_class == "bitlinear":
            layer = BitLinear(128, 64, bias=False, dtype=torch.float64)
            layer.weight.copy_(w)
        else:
            layer = AutoBitLinear(128, 64, bias=False, dtype=torch.float64)
            layer.weight.data = unpack_weights(w, dtype=torch.float64)
        layer.weight_scale.copy_(s)
        theirs = layer(torch.eye(128, dtype=torch.float64)).T
    torch.testing.assert_close(theirs, expected[name + ".weight"], rtol=1e-12, atol=0)


def test_bitnet_logits_equal_transformers_on_unquantized_copy(tmp_path):
    cfg = bitnet_config()
    packed, plain = str(tmp_path / "packed"), str(tmp_path / "plain")
    expected = write_checkpoint(packed, cfg, "bitlinear", seed=3)
    assert write_checkpoint(plain, cfg, None, seed=3).keys() == expected.keys()
    ours = load_pretrained(packed, dtype=torch.float64).model.eval()
    same = load_pretrained(plain, dtype=torch.float64)
    assert same.kind == "bitnet" and same.fingerprint != load_pretrained(packed).fingerprint
    assert_weights(same.model, expected)
    hf = transformers.BitNetForCausalLM.from_pretrained(
        plain, local_files_only=True, dtype=torch.float64
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, hf(ids()).logits, rtol=1e-10, atol=1e-10)
    # The run's base rebuilds a BitNetLM that takes these weights.
    base = save_base_files(load_pretrained(packed), str(tmp_path / "run"))
    rebuilt = build_from_base(base, dtype=torch.float64)
    assert type(rebuilt) is BitNetLM
    rebuilt.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ids()).logits, ours(ids()).logits)


def test_online_and_tied_bitnet_checkpoints(tmp_path):
    cfg = bitnet_config(tie_word_embeddings=True)
    d = str(tmp_path / "online")
    expected = write_checkpoint(d, cfg, "autobitlinear", mode="online")
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    model = load_pretrained(d, dtype=torch.float64).model
    assert_weights(model, expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_llama_with_bitnet_quantization(tmp_path):
    """A non-bitnet architecture stored with quant_method bitnet (as HF1BitLLM's Llama3 1.58):
    dequantized into the plain transformers model."""
    cfg = transformers.LlamaConfig(vocab_size=300, **SHAPE)
    d = str(tmp_path / "llama158")
    expected = write_checkpoint(d, cfg, "bitlinear")
    p = load_pretrained(d, dtype=torch.float64)
    assert p.kind == "transformers" and type(p.model) is transformers.LlamaForCausalLM
    assert not hasattr(p.model.config, "quantization_config")
    assert_weights(p.model, expected)
    rebuilt = build_from_base(save_base_files(p, str(tmp_path / "run")))
    assert type(rebuilt) is transformers.LlamaForCausalLM
    assert all(
        type(m) is not torch.nn.Linear or m.weight.dtype == torch.float32 for m in rebuilt.modules()
    )


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_paths_name_the_path(tmp_path, llama_dir):
    with pytest.raises(BitNetError, match=r"nope.*does not exist: expected a transformers"):
        load_pretrained(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BitNetError, match=r"notes\.txt.* is not a GGUF file"):
        load_pretrained(str(tmp_path / "notes.txt"))
    (tmp_path / "junk.bin").write_bytes(os.urandom(64))
    with pytest.raises(BitNetError, match=r"junk\.bin.* is not a GGUF file"):
        load_pretrained(str(tmp_path / "junk.bin"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BitNetError, match=r"empty.* has no config\.json"):
        load_pretrained(str(empty))
    (empty / "config.json").write_text("{not json")
    with pytest.raises(BitNetError, match=r"config\.json.* is not a readable JSON file"):
        load_pretrained(str(empty))
    (empty / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(BitNetError, match=r"empty.* has config\.json but no weight files"):
        load_pretrained(str(empty))
    with pytest.raises(BitNetError, match="dtype=torch.int8 is invalid"):
        load_pretrained(llama_dir[0], dtype=torch.int8)


def test_bad_checkpoints_name_the_problem(tmp_path, llama_dir):
    d = tmp_path / "m"
    shutil.copytree(llama_dir[0], d)
    (d / "model.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(BitNetError, match=r"m.* cannot be loaded as a transformers causal LM"):
        load_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-model"}))
    with pytest.raises(BitNetError, match="config.json is not usable|cannot be loaded"):
        load_pretrained(str(d))
    (d / "config.json").write_text(
        json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    )
    with pytest.raises(BitNetError, match=r"is quantized \(quant_method='gptq'\)"):
        load_pretrained(str(d))

    b = str(tmp_path / "b")
    write_checkpoint(b, bitnet_config(), "bitlinear")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BitNetError, match=r"model\.safetensors.* is not a readable safetensors"):
        load_pretrained(b)
    write_checkpoint(b, bitnet_config(), "bitlinear")
    f = os.path.join(b, "model.safetensors")
    state = load_file(f)
    del state["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(state, f)
    with pytest.raises(BitNetError, match=r"up_proj\.weight.* is packed \(uint8\) but has no"):
        load_pretrained(b)
    write_checkpoint(b, bitnet_config(vocab_size=400), "bitlinear")
    (tmp_path / "b" / "config.json").write_text(
        json.dumps({**json.loads((tmp_path / "b" / "config.json").read_text()), "vocab_size": 300})
    )
    with pytest.raises(
        BitNetError, match=r"weight has shape \(400, 64\), config\.json implies \(300, 64\)"
    ):
        load_pretrained(b)
    write_checkpoint(b, bitnet_config(hidden_act="gelu"), "bitlinear")
    with pytest.raises(BitNetError, match="hidden_act='gelu' unsupported"):
        load_pretrained(b)


def test_bad_tokenizers(tmp_path, llama_dir):
    with pytest.raises(BitNetError, match=r"tokenizer .*nothing.* does not exist"):
        PretrainedTokenizer(str(tmp_path / "nothing"))
    d = tmp_path / "m"
    shutil.copytree(llama_dir[0], d)
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(BitNetError, match=r"tokenizer .*m.* cannot be loaded"):
        load_pretrained(str(d))
    noeos = tmp_path / "noeos"
    tok = make_tokenizer(noeos)
    tok.eos_token = None
    tok.save_pretrained(noeos)
    with pytest.raises(BitNetError, match=r"noeos.* has no end-of-text \(eos\) token"):
        PretrainedTokenizer(str(noeos))
    t = PretrainedTokenizer(llama_dir[0])
    t.bos_token_id = None
    with pytest.raises(BitNetError, match="has no bos token"):
        t.encode("x", add_bos=True)


def test_base_folder_errors(tmp_path):
    with pytest.raises(BitNetError, match=r"has no source\.json"):
        build_from_base(str(tmp_path))
    (tmp_path / "source.json").write_text('{"kind": "onnx"}')
    with pytest.raises(BitNetError, match="kind='onnx' is invalid"):
        build_from_base(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# GGUF


def test_gguf_without_the_package_says_pip_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    absent = {"gguf", "accelerate"}

    def find_spec(name, *args):  # what is not absent of the two counts as installed
        if name in ("gguf", "accelerate"):
            return None if name in absent else True
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    msg = r"model\.gguf.* needs the gguf and accelerate packages \(pip install gguf accelerate\)"
    with pytest.raises(BitNetError, match=msg):
        load_pretrained(str(f))
    absent.discard("accelerate")
    with pytest.raises(BitNetError, match=r"needs the gguf package \(pip install gguf\)"):
        load_pretrained(str(f))


def write_gguf(path, model, tokenizer_json):
    """`model` (a LlamaForCausalLM) as a llama GGUF in f32 with a byte-level BPE vocabulary,
    written as llama.cpp's converter writes it (q / k rows permuted for its rotary layout)."""
    import gguf
    import numpy as np

    cfg = model.config
    with open(tokenizer_json, encoding="utf-8") as f:
        tj = json.load(f)
    special = {t["content"]: t["id"] for t in tj["added_tokens"]}
    by_id = {**tj["model"]["vocab"], **special}
    tokens = sorted(by_id, key=by_id.get)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_eos_token_id(0)
    w.add_bos_token_id(1)

    def permute(x, heads):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return x.reshape(heads, 2, x.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(x.shape)

    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for key, t in model.state_dict().items():
        x, stem = t.float().numpy(), key.rsplit(".", 1)[0]
        if stem in top:
            w.add_tensor(f"{top[stem]}.weight", x)
            continue
        layer, module = stem.split(".")[2], stem.split(".", 3)[3]
        if module == "self_attn.q_proj":
            x = permute(x, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            x = permute(x, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{per_layer[module]}.weight", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_model_and_tokenizer(tmp_path, llama_dir):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")  # transformers refuses GGUF without it
    d, model = llama_dir
    folder = tmp_path / "gguf"
    folder.mkdir()
    f = str(folder / "tiny.gguf")
    write_gguf(f, model, os.path.join(d, "tokenizer.json"))
    p = load_pretrained(f)
    assert (p.kind, p.source, p.config["model_type"]) == ("gguf", f, "llama")
    with torch.no_grad():
        assert torch.equal(p.model(ids()).logits, model(ids()).logits)
    ref = PretrainedTokenizer(d)
    assert p.tokenizer.vocab_size == ref.vocab_size
    assert (p.tokenizer.eos_token_id, p.tokenizer.bos_token_id) == (0, 1)
    for text in TEXTS:
        assert p.tokenizer.encode(text) == ref.encode(text)
        assert p.tokenizer.decode(p.tokenizer.encode(text)) == text
    # A folder with one GGUF is that GGUF; the fingerprint is the file's.
    again = load_pretrained(str(folder))
    assert again.source == f and again.fingerprint == p.fingerprint
    base = save_base_files(p, str(tmp_path / "run"))
    assert tokenizer_id(PretrainedTokenizer(base)) == tokenizer_id(p.tokenizer)
    rebuilt = build_from_base(base)
    rebuilt.load_state_dict(p.model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ids()).logits, model(ids()).logits)
    (folder / "junk.gguf").write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(BitNetError, match=r"junk\.gguf.* is not a readable GGUF file"):
        load_pretrained(str(folder / "junk.gguf"))
    with pytest.raises(BitNetError, match=r"gguf.* has no config\.json \(it has 2 \.gguf files"):
        load_pretrained(str(folder))


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_packed_checkpoint_requantizes_to_its_own_codes_and_scales(tmp_path, linear_class):
    from bitnet_training import BitLinear as OurBitLinear
    from bitnet_training import QATConfig, quantize_model

    d = str(tmp_path / "packed")
    expected = write_checkpoint(d, bitnet_config(), linear_class)
    plain = load_pretrained(d, dtype=torch.float64).model
    exact = load_pretrained(d, dtype=torch.float64, requantizable=True).model
    quantize_model(plain, QATConfig())
    quantize_model(exact, QATConfig())
    for name, m in exact.named_modules():
        if not isinstance(m, OurBitLinear):
            continue
        want = expected[name + ".weight"]
        gamma = want.abs().max()  # codes * gamma: the checkpoint's scale
        q = m.quantized_weight()
        # the scale is computed in float32: equal to rounding
        torch.testing.assert_close(q.scale.double().reshape(()), gamma, rtol=1e-6, atol=0)
        assert torch.equal(q.codes.double() * gamma, want)
        # The dequantized weights re-quantize to the same codes but a smaller scale.
        p = plain.get_submodule(name).quantized_weight()
        assert torch.equal(p.codes, q.codes)
        assert p.scale.double().reshape(()) < gamma
