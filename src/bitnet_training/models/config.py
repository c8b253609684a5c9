"""`ModelConfig`: the shape of a BitNet decoder LM, with presets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..errors import BitNetError, ConfigError
from ..settings import Section

PRESETS: dict[str, dict] = {
    # 256 byte tokens + special tokens, padded to a multiple of 64.
    "tiny": dict(vocab_size=320, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024),
    "small": dict(vocab_size=320, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    # microsoft/bitnet-b1.58-2B-4T's config.json.
    "2b4t": dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912,
                 num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5,
                 max_position_embeddings=4096, tie_word_embeddings=True,
                 bos_token_id=128000, eos_token_id=128001),
}  # fmt: skip


class ModelConfig(Section):
    """Architecture hyper-parameters, named as `transformers`' `BitNetConfig` names them.
    Defaults are the `tiny` preset; `head_dim` is filled in."""

    _path = "model"

    pretrained: str = Field(
        "",
        description="a local transformers checkpoint directory, a GGUF file or a run / "
        "checkpoint directory of ours: the architecture comes from it (no other model key, "
        "no model_preset)",
    )
    vocab_size: int = Field(320, gt=0, description="token ids 0 .. vocab_size - 1")
    hidden_size: int = Field(384, gt=0, description="the residual stream's width")
    intermediate_size: int = Field(1024, gt=0, description="the MLP's inner width")
    num_hidden_layers: int = Field(4, gt=0, description="decoder layers")
    num_attention_heads: int = Field(6, gt=0, description="query heads")
    num_key_value_heads: int = Field(
        2, gt=0, description="key / value heads (grouped-query attention)"
    )
    head_dim: int | None = Field(
        None, gt=0, description="per-head width, even (None: hidden_size / num_attention_heads)"
    )
    max_position_embeddings: int = Field(1024, gt=0, description="the longest sequence")
    rms_norm_eps: float = Field(1e-5, gt=0, description="RMSNorm's epsilon")
    rope_theta: float = Field(500000.0, gt=0, description="rotary embeddings' base")
    initializer_range: float = Field(0.02, ge=0, description="std of the initial weights")
    tie_word_embeddings: bool = Field(False, description="the LM head shares the embedding")
    hidden_act: Literal["relu2", "silu"] = Field(
        "relu2",
        description="the gated FFN's activation: relu2 (squared ReLU, BitNet b1.58 2B4T) or "
        "silu (the earlier BitNet b1.58 models; what llama.cpp's bitnet graph runs)",
    )
    attention_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the attention probabilities (training only)"
    )
    residual_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on each attention / MLP output before it joins the residual "
        "stream (training only)",
    )
    bos_token_id: int | None = Field(None, description="begin-of-sequence id")
    eos_token_id: int | None = Field(None, description="end-of-sequence id")
    pad_token_id: int | None = Field(None, description="padding id")

    @model_validator(mode="after")
    def _check(self):
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads % kv:
            raise ConfigError(
                "num_key_value_heads", kv, f"a divisor of num_attention_heads ({heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % heads:
                raise ConfigError(
                    "num_attention_heads",
                    heads,
                    f"a divisor of hidden_size ({self.hidden_size}) unless head_dim is set",
                )
            self.__dict__["head_dim"] = self.hidden_size // heads  # no re-validation
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError("head_dim", self.head_dim, "an even integer >= 2 (rotary pairs)")
        return self

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named shape: `tiny` (~6.6 M parameters, trains on a CPU), `small` (~40 M) or
        `2b4t` (BitNet b1.58 2B4T, for memory planning), with field overrides."""
        if name not in PRESETS:
            raise BitNetError(
                f"unknown model preset {name!r}: expected one of {', '.join(PRESETS)}"
            )
        return cls(**{**PRESETS[name], **overrides})

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (latent weights, no buffers)."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + h  # q, k, v, o projections + attn_sub_norm
        mlp = 3 * h * i + i  # gate, up, down + ffn_sub_norm
        layer = attn + mlp + 2 * h  # + the two pre-norms
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else emb
        return emb + L * layer + h + head
