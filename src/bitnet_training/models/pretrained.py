"""Loading pretrained models: a `transformers` folder, a `transformers` BitNet checkpoint (packed
ternary or latent weights) or a GGUF file, always as a full-precision model with plain
`nn.Linear` layers, ready for `quantize_model` and training.

Nothing is downloaded (`local_files_only=True`) and nothing in a checkpoint can run code
(safetensors, JSON, no `trust_remote_code`). `save_base_files` copies what a run needs to rebuild
the architecture (config, tokenizer) into `run_dir/base/`; `build_from_base` rebuilds it from
there, so a trained run does not depend on the original base path.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from ..atomic import atomic_directory
from ..data.hf_tokenizer import PretrainedTokenizer, has_tokenizer_files, require_transformers
from ..errors import BitNetError
from ..quant.packing import VALUES_PER_BYTE, unpack_ternary
from .bitnet import BitNetLM
from .config import ModelConfig

log = logging.getLogger(__name__)

KINDS = ("transformers", "bitnet", "gguf")
_EXPECTED = "a transformers checkpoint folder (config.json + *.safetensors) or a .gguf file"


@dataclass
class Pretrained:
    """A loaded pretrained model and what a run needs to remember about it.

    model: full precision, plain `nn.Linear` layers. tokenizer: a `PretrainedTokenizer` when
    the source has one, else None. kind: "transformers", "bitnet" (our `BitNetLM`) or "gguf".
    source: the absolute path loaded. fingerprint: the first 16 hex digits of a sha256 over the
    weight files' bytes (identifies the base weights). config: the model's config.json content.
    """

    model: nn.Module
    tokenizer: PretrainedTokenizer | None
    kind: str
    source: str
    fingerprint: str
    config: dict


# ---------------------------------------------------------------------------------------------
# Files


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BitNetError(f"{path!r} is not a readable JSON file: {_first_line(e)}") from None
    if not isinstance(d, dict):
        raise BitNetError(f"{path!r} must hold a JSON object, got {type(d).__name__}")
    return d


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _weight_files(directory: str) -> list[str]:
    """The checkpoint's weight files, sorted: *.safetensors, else pytorch_model*.bin (which
    transformers reads with weights_only=True)."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    return files or sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))


def fingerprint(files: list[str]) -> str:
    """First 16 hex digits of sha256 over each file's name and bytes, in the given order:
    equal for the same weights wherever they are copied, different when any byte changes."""
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BitNetError(f"dtype={dtype!r} is invalid: expected a floating torch dtype")
    return dtype


# ---------------------------------------------------------------------------------------------
# transformers' BitNet storage


def dequantize_ternary(
    weight: torch.Tensor, scale: torch.Tensor, out_features: int, linear_class: str
) -> torch.Tensor:
    """The float64 weight (out_features, in_features) of one offline-quantized BitNet layer.

    `weight`: packed uint8 (ceil(out/4), in) or the ternary codes as floats (out, in);
    `scale`: its `weight_scale`, one value (or one per output row). `linear_class` "bitlinear"
    stores the inverse scale 1 / mean|W| (transformers' BitLinear divides its output by it),
    "autobitlinear" stores mean|W| (AutoBitLinear multiplies): both give W = codes * mean|W|.
    """
    codes = unpack_ternary(weight, out_features) if weight.dtype == torch.uint8 else weight
    s = scale.to(torch.float64)
    if s.numel() == out_features != 1:
        s = s.reshape(-1, *([1] * (codes.dim() - 1)))  # one scale per output row
    elif s.numel() == 1:
        s = s.reshape(())
    else:
        raise BitNetError(
            f"weight_scale has {s.numel()} values: expected 1 or one per row ({out_features})"
        )
    codes = codes.to(torch.float64)
    return codes / s if linear_class == "bitlinear" else codes * s


class _Tensors:
    """Lazy read access to the tensors of several safetensors files (one open handle each)."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self.where, self._handles = {}, []
        for path in files:
            if not path.endswith(".safetensors"):
                raise BitNetError(f"{path!r}: BitNet checkpoints are read from *.safetensors only")
            try:
                f = safe_open(path, framework="pt")
                self._handles.append(f)
                self.where.update(dict.fromkeys(f.keys(), f))
            except Exception as e:  # the Rust reader raises SafetensorError on corrupt files
                raise BitNetError(
                    f"{path!r} is not a readable safetensors file: {_first_line(e)}"
                ) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self.where[key].get_slice(key).get_dtype()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def _bitnet_model_config(cfg) -> ModelConfig:
    """Our `ModelConfig` from a `transformers` BitNetConfig; refuses what BitNetLM lacks."""
    src = getattr(cfg, "_name_or_path", "") or "config.json"
    act = getattr(cfg, "hidden_act", "relu2")
    if act not in ("relu2", "silu"):
        raise BitNetError(f"{src}: hidden_act={act!r} unsupported: expected 'relu2' or 'silu'")
    if getattr(cfg, "attention_bias", False):
        raise BitNetError(f"{src}: attention_bias=True unsupported: expected false")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise BitNetError(f"{src}: rope_type={rope['rope_type']!r} unsupported: expected 'default'")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 500000.0))
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    try:
        return ModelConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            head_dim=getattr(cfg, "head_dim", None),
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope_theta=float(theta),
            initializer_range=float(cfg.initializer_range),
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            hidden_act=act,
            attention_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
            bos_token_id=cfg.bos_token_id,
            eos_token_id=eos,
            pad_token_id=cfg.pad_token_id,
        )
    except BitNetError as e:
        raise BitNetError(f"{src}: {e}") from None


def _auto_config(directory: str, drop_quantization: bool = False):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # unknown model_type, bad values: transformers raises several types
        raise BitNetError(f"{directory!r}: config.json is not usable: {_first_line(e)}") from None
    if drop_quantization and hasattr(cfg, "quantization_config"):
        # We store dequantized float weights: the model must have plain nn.Linear layers.
        del cfg.quantization_config
    return cfg


def _check_bitnet_quant(directory: str, quant: dict) -> None:
    if quant.get("linear_class", "bitlinear") not in ("bitlinear", "autobitlinear"):
        raise BitNetError(
            f"{directory!r}: quantization_config.linear_class={quant['linear_class']!r} "
            "unsupported: expected 'bitlinear' or 'autobitlinear'"
        )
    if quant.get("quantization_mode", "offline") not in ("offline", "online"):
        raise BitNetError(
            f"{directory!r}: quantization_config.quantization_mode="
            f"{quant['quantization_mode']!r} unsupported: expected 'offline' or 'online'"
        )
    if quant.get("use_rms_norm"):
        raise BitNetError(
            f"{directory!r}: quantization_config.use_rms_norm=true (an RMSNorm inside every "
            "BitLinear) is unsupported: expected false"
        )


def _bitnet_model(
    directory: str, config: dict, dtype: torch.dtype, requantizable: bool = False
) -> nn.Module:
    """A BitNetLM (model_type bitnet) or an AutoModel (other types stored with bitnet
    quantization) with plain nn.Linear layers, holding the checkpoint's dequantized weights.

    Offline-quantized layers (`X.weight` beside an `X.weight_scale`) are dequantized in float64
    one tensor at a time and copied into the model (so a float64 model holds the exact
    products, and memory peaks at the model plus one tensor); latent (online) and unquantized
    weights are copied as stored. With `requantizable`, a layer with one scale gamma gets the
    latent weight codes * gamma / mean|codes| instead, whose absmean ternary quantization
    (what `quantize_model` applies) gives back exactly its codes and gamma, so the quantized
    model computes what the checkpoint's does (codes * gamma would re-quantize to the same codes
    but the smaller scale gamma * mean|codes|).
    """
    quant = dict(config.get("quantization_config") or {})
    if quant:
        _check_bitnet_quant(directory, quant)
    offline = bool(quant) and quant.get("quantization_mode", "offline") == "offline"
    linear_class = quant.get("linear_class", "bitlinear")
    cfg = _auto_config(directory, drop_quantization=True)
    if config.get("model_type") == "bitnet":
        model = BitNetLM(_bitnet_model_config(cfg)).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    params = model.state_dict()  # tensors sharing the model's storage
    stored = _Tensors(_weight_files(directory))
    scales = {k for k in stored.where if k.endswith(".weight_scale")}
    weights = set(stored.where) - scales
    weights = {k for k in weights if not k.endswith("rotary_emb.inv_freq")}  # a buffer
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:  # as transformers ties: the output head is the embedding, whatever is stored
        weights.discard("lm_head.weight")
    need = set(params) - ({"lm_head.weight"} if tied else set())
    missing, unexpected = sorted(need - weights), sorted(weights - need)
    if missing or unexpected:
        raise BitNetError(
            f"{directory!r}: weights do not match config.json: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    for k in sorted(scales):
        if not offline:
            log.warning("ignoring %s: the checkpoint is not offline-quantized", k)
        elif k[: -len("_scale")] not in weights:
            raise BitNetError(f"{directory!r}: {k} has no weight beside it")
    for k in sorted(weights):
        want = tuple(params[k].shape)
        packed = stored.dtype(k) == "U8"
        scaled = offline and f"{k}_scale" in scales
        if packed and not scaled:
            raise BitNetError(
                f"{directory!r}: {k} is packed (uint8) but has no {k}_scale: expected an "
                "offline bitnet quantization_config and a scale per packed weight"
            )
        shape = stored.shape(k)
        if packed:  # ceil(out / 4) rows of 4 ternary values
            shape = (want[0], *shape[1:]) if shape[0] == -(-want[0] // VALUES_PER_BYTE) else shape
        if shape != want:
            raise BitNetError(f"{directory!r}: {k} has shape {shape}, config.json implies {want}")
    with torch.no_grad():
        for k in sorted(weights):
            t = stored[k]
            if offline and f"{k}_scale" in scales:
                t = dequantize_ternary(t, stored[f"{k}_scale"], params[k].shape[0], linear_class)
                if requantizable and stored[f"{k}_scale"].numel() == 1:
                    t = t / (t != 0).double().mean().clamp_min(1e-12)
            params[k].copy_(t)
    return model


# ---------------------------------------------------------------------------------------------
# Loaders


def _load_folder(src: str, dtype: torch.dtype, requantizable: bool) -> Pretrained:
    config = _read_json(os.path.join(src, "config.json"))
    require_transformers(f"loading {src!r}")
    files = _weight_files(src)
    if not files:
        raise BitNetError(f"{src!r} has config.json but no weight files: expected *.safetensors")
    quant = config.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise BitNetError(f"{src!r}: quantization_config must be a JSON object")
    method = quant.get("quant_method")
    if config.get("model_type") == "bitnet" or method == "bitnet":
        if method not in (None, "bitnet"):
            raise BitNetError(
                f"{src!r}: quant_method={method!r} unsupported for a BitNet model: "
                "expected 'bitnet' or no quantization_config"
            )
        model = _bitnet_model(src, config, dtype, requantizable)
        kind = "bitnet" if config.get("model_type") == "bitnet" else "transformers"
    else:
        if quant:
            raise BitNetError(
                f"{src!r} is quantized (quant_method={method!r}): expected full-precision "
                "weights or a bitnet checkpoint"
            )
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=dtype)
        except Exception as e:  # unknown architecture, corrupt weights, missing files, ...
            raise BitNetError(
                f"{src!r} cannot be loaded as a transformers causal LM: {_first_line(e)}"
            ) from None
        kind = "transformers"
    tokenizer = PretrainedTokenizer(src) if has_tokenizer_files(src) else None
    return Pretrained(model, tokenizer, kind, src, fingerprint(files), config)


def _gguf_fields(src: str) -> dict:
    """The metadata fields of GGUF file `src` (one read; a one-line error if unreadable)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(src).fields
    except Exception as e:  # truncated, not GGUF
        raise BitNetError(f"{src!r} is not a readable GGUF file: {_first_line(e)}") from None


def _gguf_tokenizer(src: str, fields: dict):
    """Our byte tokenizer when the GGUF holds its vocabulary (what `export --format gguf`
    writes for byte-level runs), else the file's own through transformers, else None."""
    from ..data.tokenizer import SPECIAL_TOKENS, ByteTokenizer

    if "tokenizer.ggml.tokens" not in fields:
        return None
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = fields.get("tokenizer.ggml.merges")
    merges = [] if merges is None else merges.contents()
    if tokens[256:259] == list(SPECIAL_TOKENS) and merges in ([], [" ".join(SPECIAL_TOKENS[:2])]):
        return ByteTokenizer()
    directory, name = os.path.split(src)
    return PretrainedTokenizer(directory, gguf_file=name)


def _load_gguf(src: str, dtype: torch.dtype) -> Pretrained:
    import importlib.util

    require_transformers(f"loading {src!r}")
    # transformers reads GGUF with gguf-py and refuses without accelerate.
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise BitNetError(
            f"{src!r} is a GGUF file: loading it needs the {' and '.join(missing)} "
            f"package{'s' * (len(missing) > 1)} (pip install {' '.join(missing)})"
        )
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(src)
    fields = _gguf_fields(src)
    arch = fields.get("general.architecture")
    if arch is not None and arch.contents() == "bitnet":  # transformers has no bitnet reader
        from .gguf_bitnet import read_gguf

        model, config = read_gguf(src, dtype)
        tokenizer = _gguf_tokenizer(src, fields)
        return Pretrained(model, tokenizer, "gguf", src, fingerprint([src]), config)
    has_vocab = "tokenizer.ggml.model" in fields
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=dtype, local_files_only=True
        )
    except Exception as e:  # unsupported architecture or tensor type, truncated file, ...
        raise BitNetError(
            f"{src!r} cannot be loaded as a GGUF causal LM: {_first_line(e)}"
        ) from None
    tokenizer = PretrainedTokenizer(directory, gguf_file=name) if has_vocab else None
    return Pretrained(model, tokenizer, "gguf", src, fingerprint([src]), model.config.to_dict())


def load_pretrained(
    path: str, dtype: torch.dtype | str = torch.float32, requantizable: bool = False
) -> Pretrained:
    """Load a pretrained causal LM from `path` as a full-precision model in `dtype`.

    `path` is one of: a `transformers` folder (config.json + *.safetensors, any causal LM,
    loaded with `AutoModelForCausalLM`); a `transformers` BitNet folder (model_type "bitnet",
    packed uint8 ternary weights with `weight_scale` in either `linear_class` convention, or
    latent / unquantized float weights), dequantized into our full-precision `BitNetLM` (another
    model_type stored with quant_method "bitnet", such as a Llama 1.58, is dequantized into its
    transformers class, kind "transformers"); a .gguf file, or a folder holding exactly one and
    no config.json (needs the `gguf` and `accelerate` packages). `dtype` is a floating torch
    dtype or its name. Anything else raises `BitNetError` naming the path and what was expected.
    `requantizable`: offline-quantized layers get latent weights that BitNet b1.58's absmean
    quantizer maps back to the checkpoint's exact codes and scale (for QAT from a ternary
    checkpoint; the default gives the dequantized weights, for full-precision use).
    """
    dtype = _as_dtype(dtype)
    src = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(src):
        raise BitNetError(f"pretrained model {src!r} does not exist: expected {_EXPECTED}")
    if os.path.isfile(src):
        if _is_gguf(src):
            return _load_gguf(src, dtype)
        raise BitNetError(f"pretrained model {src!r} is not a GGUF file: expected {_EXPECTED}")
    if os.path.isfile(os.path.join(src, "config.json")):
        return _load_folder(src, dtype, requantizable)
    ggufs = sorted(glob.glob(os.path.join(src, "*.gguf")))
    if len(ggufs) == 1:
        return load_pretrained(ggufs[0], dtype, requantizable)
    found = f" (it has {len(ggufs)} .gguf files: name one)" if ggufs else ""
    raise BitNetError(f"pretrained model {src!r} has no config.json{found}: expected {_EXPECTED}")


# ---------------------------------------------------------------------------------------------
# A run's copy of its base


def _copy_tokenizer(tok, directory: str) -> None:
    # Byte for byte where we can: a re-serialised tokenizer.json would change tokenizer_id.
    copied = tok.copy_files(directory) if isinstance(tok, PretrainedTokenizer) else []
    if "tokenizer_config.json" in copied:
        return
    # Files that name the special tokens are missing: take them from save_pretrained, without
    # replacing the copied originals.
    with tempfile.TemporaryDirectory() as saved:
        tok.save(saved)
        for name in os.listdir(saved):
            if name not in copied:
                shutil.copyfile(os.path.join(saved, name), os.path.join(directory, name))


def save_base_files(pretrained: Pretrained, run_dir: str) -> str:
    """Copy what rebuilds `pretrained`'s architecture into `run_dir/base/` and return that path.

    Writes config.json (the source's own file byte for byte, or `pretrained.config` for a
    GGUF), generation_config.json when the source has one, the tokenizer's files (copied byte
    for byte, so `tokenizer_id` is unchanged) and source.json (kind, source, fingerprint).
    Written to a temporary folder and renamed into place. A `base/` from another base
    (other fingerprint) is refused; from the same base it is replaced.
    """
    base = os.path.join(run_dir, "base")
    old = os.path.join(base, "source.json")
    if os.path.isfile(old):
        prev = _read_json(old).get("fingerprint")
        if prev != pretrained.fingerprint:
            raise BitNetError(
                f"{base!r} already holds another base model (fingerprint {prev}, "
                f"not {pretrained.fingerprint}): use a new run directory"
            )
    with atomic_directory(base) as tmp:
        src_dir = pretrained.source if os.path.isdir(pretrained.source) else None
        if src_dir and os.path.isfile(os.path.join(src_dir, "config.json")):
            shutil.copyfile(os.path.join(src_dir, "config.json"), os.path.join(tmp, "config.json"))
        else:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(pretrained.config, f, indent=2, sort_keys=True, default=str)
        gen = os.path.join(src_dir, "generation_config.json") if src_dir else None
        if gen and os.path.isfile(gen):
            shutil.copyfile(gen, os.path.join(tmp, "generation_config.json"))
        tok = pretrained.tokenizer
        if tok is not None:
            _copy_tokenizer(tok, tmp)
        meta = {
            "kind": pretrained.kind,
            "source": pretrained.source,
            "fingerprint": pretrained.fingerprint,
            "tokenizer": tok is not None,
        }
        with open(os.path.join(tmp, "source.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    return base


def build_from_base(run_dir_base: str, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """The architecture saved by `save_base_files`, freshly initialised (random weights), in
    `dtype`: `BitNetLM` (plain nn.Linear) for kind "bitnet", else
    `AutoModelForCausalLM.from_config`. A trained run's state dict loads into it; the original
    base path is not needed."""
    dtype = _as_dtype(dtype)
    meta_path = os.path.join(run_dir_base, "source.json")
    if not os.path.isfile(meta_path):
        raise BitNetError(
            f"{run_dir_base!r} has no source.json: expected a run's base/ folder "
            "written by save_base_files"
        )
    kind = _read_json(meta_path).get("kind")
    if kind not in KINDS:
        raise BitNetError(f"{meta_path!r}: kind={kind!r} is invalid: expected one of {KINDS}")
    config = _read_json(os.path.join(run_dir_base, "config.json"))
    require_transformers(f"rebuilding {run_dir_base!r}")
    cfg = _auto_config(run_dir_base, drop_quantization=True)
    if kind == "bitnet" and config.get("model_type") == "bitnet":
        return BitNetLM(_bitnet_model_config(cfg)).to(dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)
