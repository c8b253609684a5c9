"""Prefix tuning and P-tuning v2: the base is frozen and trainable per-layer key/value prefixes
are prepended to every attention layer's cache.

Prefix tuning (Li & Liang 2021, arXiv 2101.00190) learns, for each layer, `num_virtual_tokens`
keys and values that every real token attends to, optionally through an MLP
reparameterization (`prefix_projection`: embedding -> Linear -> tanh -> Linear, which the
paper found stabilizes training). P-tuning v2 (Liu et al. 2021, arXiv 2110.07602) is the same
deep prompt at every layer without the reparameterization: here it is prefix tuning with
`prefix_projection=False` (and refuses it). On our `BitNetLM` (plain or quantized) the prefix
is ours, passed as `past_key_values`; on a `transformers` causal LM it is `peft`'s prefix
tuning (`PrefixTuningConfig`), whose state has the same layout and names as ours.
"""

from __future__ import annotations

import inspect
import sys
from abc import ABC, abstractmethod
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import BitNetError
from ..models.bitnet import BitNetLM, KVCache

METHODS = ("prefix", "ptuning_v2")
INITS = ("normal", "zero")


class PrefixEncoder(nn.Module):
    """The trainable prefix: per layer a key and a value of shape (batch, kv_heads,
    num_virtual_tokens, head_dim).

    Without projection the prefix is one `embedding` table (num_virtual_tokens,
    layers * 2 * kv_heads * head_dim); with `prefix_projection` it is an `embedding`
    (num_virtual_tokens, kv_heads * head_dim) fed through `transform` = Linear(kv_dim,
    encoder_hidden_size), tanh, Linear(encoder_hidden_size, layers * 2 * kv_dim). Names, shapes
    and the flattened layout (per virtual token: layer 0 key, layer 0 value, layer 1 key, ...,
    each kv_heads x head_dim) are `peft`'s `PrefixEncoder`'s, so its `prompt_embeddings` load
    here. `init="normal"` is `nn.Embedding`'s N(0, 1) (peft's default); `"zero"` zeroes the
    table (or the last MLP layer), as peft's `init_weights="zero"`.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_virtual_tokens: int,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        init: str = "normal",
    ):
        super().__init__()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens, self.prefix_projection = num_virtual_tokens, prefix_projection
        kv_dim = num_kv_heads * head_dim
        out = num_layers * 2 * kv_dim
        if prefix_projection:
            hidden = encoder_hidden_size or kv_dim
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, out)
            )
            if init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out)
            if init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def flat(self) -> torch.Tensor:
        """The prefix as peft saves it: (num_virtual_tokens, layers * 2 * kv_heads * head_dim)."""
        w = self.embedding.weight
        return self.transform(w) if self.prefix_projection else w

    def forward(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """Per layer (k, v), each (batch_size, kv_heads, num_virtual_tokens, head_dim)."""
        kv = self.flat().view(
            self.num_virtual_tokens, 2 * self.num_layers, self.num_kv_heads, self.head_dim
        )
        # (2 * layers, kv_heads, tokens, head_dim), broadcast over the batch without a copy:
        # every sequence sees the same prefix, and autograd sums its gradient over the batch.
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        if dtype is not None:
            kv = kv.to(dtype)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]


class _PromptModel(nn.Module, ABC):
    """What both backends share: counting, the adapter's state and the refusal to merge."""

    method: str
    num_virtual_tokens: int

    @abstractmethod
    def _encoder(self) -> nn.Module:
        """The module holding the trainable prefix (its state is the adapter's)."""

    def trainable_parameters(self) -> int:
        """How many parameters train (the prefix encoder's)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The prefix encoder's state only (`embedding.weight`, and `transform.*` with
        prefix_projection), detached copies: what a PEFT checkpoint saves."""
        return {k: v.detach().clone() for k, v in self._encoder().state_dict().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load `adapter_state_dict()`'s output, or peft's saved `{"prompt_embeddings":
        (num_virtual_tokens, layers * 2 * kv_dim)}` (only without prefix_projection: an MLP's
        output cannot be turned back into its parameters). A mismatch is a one-line error."""
        enc = self._encoder()
        if set(state) == {"prompt_embeddings"}:
            if enc.prefix_projection:
                raise BitNetError(
                    "a flattened prefix (peft's prompt_embeddings) cannot be loaded into a "
                    "prefix_projection encoder; apply the prompt without prefix_projection"
                )
            state = {"embedding.weight": state["prompt_embeddings"]}
        own = enc.state_dict()
        if set(state) != set(own):
            raise BitNetError(
                f"the adapter's keys {sorted(state)} do not match this prefix's {sorted(own)}"
            )
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise BitNetError(
                    f"adapter tensor {k} has shape {tuple(v.shape)}, this prefix needs "
                    f"{tuple(own[k].shape)} (num_virtual_tokens, layers or heads differ)"
                )
        enc.load_state_dict(state)

    @abstractmethod
    def base(self) -> nn.Module:
        """The frozen model the prefix feeds."""

    def get_output_embeddings(self) -> nn.Module | None:
        """The frozen base's output head (what metrics capture the logits from)."""
        return self.base().get_output_embeddings()

    def merge(self) -> None:
        """Always refused: a prefix adds attention positions, it is no weight delta."""
        raise BitNetError(
            f"{self.method} adapters cannot be merged into the weights (prefix / P-tuning v2 "
            "add key/value positions, not weight deltas): keep the adapter for inference"
        )


class BitNetPromptModel(_PromptModel):
    """A frozen `BitNetLM` with a trainable `PrefixEncoder`.

    `forward(input_ids (batch, seq), labels=None)` runs the base with the prefix as its
    `past_key_values`: the real tokens take positions num_virtual_tokens.. and see every
    prefix position; the output's `logits` (batch, seq, vocab) and `loss` cover the real
    tokens only. Given `past_key_values` (a cache that already holds the prefix) it continues
    that cache instead. `generate(...)` is `BitNetLM.generate` started from the prefix.
    """

    def __init__(self, base: BitNetLM, method: str, encoder: PrefixEncoder):
        super().__init__()
        self.base_model, self.prefix_encoder, self.method = base, encoder, method
        self.num_virtual_tokens = encoder.num_virtual_tokens
        self.config = base.config

    def base(self) -> nn.Module:
        return self.base_model

    def _encoder(self) -> PrefixEncoder:
        return self.prefix_encoder

    def prefix(self, batch_size: int) -> KVCache:
        """Per layer (k, v), each (batch_size, kv_heads, num_virtual_tokens, head_dim), in the
        base's dtype."""
        return self.prefix_encoder(batch_size, self.base_model.model.embed_tokens.weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ):
        if past_key_values is None:
            past_key_values = self.prefix(input_ids.shape[0])
        return self.base_model(input_ids, labels, past_key_values, use_cache)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs):
        """`BitNetLM.generate(input_ids (batch, prompt), max_new_tokens, do_sample,
        temperature, top_k, eos_token_id, use_cache, generator, vocab_limit)` after the
        prefix. Returns (batch, prompt + generated)."""
        with torch.no_grad():
            prefix = self.prefix(input_ids.shape[0])
        return self.base_model.generate(input_ids, max_new_tokens, past_key_values=prefix, **kwargs)


class _PeftSteps:
    """`BitNetLM`'s step interface (`self(ids, past_key_values=, use_cache=)`, `.config`) over
    a peft prefix model, so `BitNetLM.generate`'s one sampling loop serves it too."""

    def __init__(self, peft_model, num_virtual_tokens: int):
        self.peft_model, self.base = peft_model, peft_model.get_base_model()
        cfg = self.base.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0)
        # The prefix occupies the first positions, so the real tokens get fewer.
        self.config = SimpleNamespace(max_position_embeddings=(limit or 2**31) - num_virtual_tokens)
        # transformers 5.x renamed the forward's `past_key_values` to `cache`.
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def __call__(self, input_ids, past_key_values=None, use_cache=False):
        b, t = input_ids.shape
        # A fresh prefix cache when starting (the cache object is updated in place).
        cache = past_key_values if past_key_values is not None else self.peft_model.get_prompt(b)
        mask = torch.ones(b, cache.get_seq_length() + t, dtype=torch.long, device=input_ids.device)
        out = self.base(
            input_ids=input_ids, attention_mask=mask, use_cache=True, **{self.cache_kw: cache}
        )
        return SimpleNamespace(logits=out.logits, past_key_values=cache if use_cache else None)


class PeftPromptModel(_PromptModel):
    """A `transformers` causal LM under `peft`'s prefix tuning (`self.peft_model`, a
    `PeftModelForCausalLM`; P-tuning v2 is its prefix tuning without projection).

    `forward(input_ids (batch, seq), labels=None, attention_mask=None, **kwargs)` is the peft
    model's: `logits` (batch, seq, vocab) for the real tokens, `loss` with labels.
    `generate(...)` takes `BitNetLM.generate`'s arguments and runs its loop over the peft
    prefix cache: with peft 0.21 and transformers 5.x, `peft_model.generate` silently drops
    the prefix (transformers passes its own `cache`, which wins over peft's `past_key_values`)
    and returns the base's tokens. `save_pretrained(dir)` writes peft's adapter format.
    """

    def __init__(self, peft_model, method: str, num_virtual_tokens: int):
        super().__init__()
        self.peft_model, self.method = peft_model, method
        self.num_virtual_tokens = num_virtual_tokens
        self.config = peft_model.get_base_model().config

    def base(self) -> nn.Module:
        return self.peft_model.get_base_model()

    def _encoder(self) -> nn.Module:
        return self.peft_model.prompt_encoder[self.peft_model.active_adapter]

    @property
    def peft_config(self):
        return self.peft_model.peft_config

    def save_pretrained(self, directory: str, **kwargs) -> None:
        """peft's `save_pretrained`: `adapter_config.json` + `adapter_model.safetensors`."""
        self.peft_model.save_pretrained(directory, **kwargs)

    def forward(self, input_ids=None, labels=None, attention_mask=None, **kwargs):
        return self.peft_model(
            input_ids=input_ids, labels=labels, attention_mask=attention_mask, **kwargs
        )

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs):
        """As `BitNetPromptModel.generate`: (batch, prompt) -> (batch, prompt + generated)."""
        steps = _PeftSteps(self.peft_model, self.num_virtual_tokens)
        return BitNetLM.generate(steps, input_ids, max_new_tokens, **kwargs)


def _check(method, num_virtual_tokens, prefix_projection, encoder_hidden_size, init) -> None:
    if method not in METHODS:
        raise BitNetError(f"method={method!r} is invalid: expected one of {', '.join(METHODS)}")
    n = num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BitNetError(f"num_virtual_tokens={n!r} is invalid: expected an integer > 0")
    if init not in INITS:
        raise BitNetError(f"init={init!r} is invalid: expected one of {', '.join(INITS)}")
    if prefix_projection and method == "ptuning_v2":
        raise BitNetError(
            "prefix_projection=True is invalid for ptuning_v2 (deep prompts without "
            "reparameterization): use method='prefix'"
        )
    if encoder_hidden_size is not None:
        if not prefix_projection:
            raise BitNetError(
                f"encoder_hidden_size={encoder_hidden_size!r} needs prefix_projection=True"
            )
        h = encoder_hidden_size
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise BitNetError(f"encoder_hidden_size={h!r} is invalid: expected an integer > 0")


def _transformers_lm(model: nn.Module):
    """The `transformers` text config of `model` if it is a `transformers` causal LM, else
    None (without importing transformers: a model of it means it is imported)."""
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel) or not hasattr(model, "generate"):
        return None
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def apply_prompt(
    model: nn.Module,
    method: str,
    num_virtual_tokens: int,
    prefix_projection: bool = False,
    encoder_hidden_size: int | None = None,
    init: str = "normal",
) -> BitNetPromptModel | PeftPromptModel:
    """Freeze `model` and return it wrapped with trainable per-layer key/value prefixes.

    `method` is `"prefix"` (prefix tuning, optionally with `prefix_projection`, the MLP of
    hidden size `encoder_hidden_size`, default the model's hidden size) or `"ptuning_v2"`
    (the same deep prompts, no reparameterization). `model` is a `BitNetLM` (plain or
    quantized: the prefix is ours) or a `transformers` causal LM (peft's prefix tuning).
    The base's parameters get `requires_grad=False` in place. The result is called like the
    base (`model(input_ids=..., labels=...)` -> `.loss`, `.logits` (batch, seq, vocab) of the
    real tokens) and has `generate`, `trainable_parameters`, `adapter_state_dict`,
    `load_adapter_state_dict` and `merge` (which refuses). Bad arguments, or a model without
    attention layers, raise a one-line `BitNetError`.
    """
    _check(method, num_virtual_tokens, prefix_projection, encoder_hidden_size, init)
    if isinstance(model, BitNetLM):
        cfg = model.config
        if len(model.model.layers) == 0:
            raise BitNetError("the BitNetLM has no decoder layers: there is nothing to prefix")
        encoder = PrefixEncoder(
            len(model.model.layers),
            cfg.num_key_value_heads,
            cfg.head_dim,
            num_virtual_tokens,
            prefix_projection,
            (encoder_hidden_size or cfg.hidden_size) if prefix_projection else None,
            init,
        ).to(model.model.embed_tokens.weight.device)
        model.requires_grad_(False)
        return BitNetPromptModel(model, method, encoder)
    text_cfg = _transformers_lm(model)
    layers = getattr(text_cfg, "num_hidden_layers", 0) if text_cfg is not None else 0
    if not layers or not getattr(text_cfg, "num_attention_heads", 0):
        raise BitNetError(
            f"{method} needs a BitNetLM or a transformers causal LM with attention layers; "
            f"got {type(model).__name__}, which has none to prefix"
        )
    from peft import PrefixTuningConfig, get_peft_model

    peft_cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
        encoder_hidden_size=encoder_hidden_size or text_cfg.hidden_size,
        init_weights="zero" if init == "zero" else None,
    )
    return PeftPromptModel(get_peft_model(model, peft_cfg), method, num_virtual_tokens)
