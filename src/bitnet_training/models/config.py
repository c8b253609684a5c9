"""`ModelConfig`: the shape of a BitNet decoder LM, with presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import BitNetError, ConfigError


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, named as `transformers`' `BitNetConfig` names them.

    Defaults are the `tiny` preset. `head_dim` defaults to hidden_size / num_attention_heads.
    """

    vocab_size: int = 320
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model.{name}", v, "a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "model.num_key_value_heads",
                self.num_key_value_heads,
                f"a divisor of num_attention_heads ({self.num_attention_heads})",
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    "model.num_attention_heads",
                    self.num_attention_heads,
                    f"a divisor of hidden_size ({self.hidden_size}) unless head_dim is set",
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        hd = self.head_dim
        if not isinstance(hd, int) or isinstance(hd, bool) or hd < 2 or hd % 2:
            raise ConfigError(
                "model.head_dim", hd, "a positive even integer (rotary pairs) or None"
            )
        if not self.rms_norm_eps > 0:
            raise ConfigError("model.rms_norm_eps", self.rms_norm_eps, "a positive number")
        if not self.rope_theta > 0:
            raise ConfigError("model.rope_theta", self.rope_theta, "a positive number")

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(
                    f"model.{key}", d[key], f"a known field ({', '.join(sorted(known))})"
                )
        return cls(**d)


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
