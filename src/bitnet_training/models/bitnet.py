"""`BitNetLM`: the decoder-only LM of BitNet b1.58 2B4T, as `transformers` implements it.

Architecture (`transformers` model type `bitnet`, `BitNetForCausalLM`): token embedding,
then per layer

    h = x + o_proj(attn_sub_norm(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))))
        with n = input_layernorm(x)
    y = h + down_proj(ffn_sub_norm(relu(gate_proj(m))^2 * up_proj(m)))
        with m = post_attention_layernorm(h)

then a final RMSNorm and a full-precision `lm_head`. Grouped-query attention, rotary
positions, no biases. The model builds plain `nn.Linear` projections: quantization is a
transform (`quantize_model` turns them into `BitLinear`; `BitNetLM.bitnet(...)` builds and
quantizes in one call); embeddings and head stay full precision. Parameter names equal
`transformers`' (`model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`), so a
state_dict loads one to one into `BitNetForCausalLM`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitNetError, ConfigError
from ..nn.convert import quantize_model
from ..nn.norm import RMSNorm
from ..quant.config import QATConfig
from .config import ModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CausalLMOutput:
    """loss: mean next-token cross-entropy (None without labels); logits: (batch, seq, vocab);
    past_key_values: per layer (k, v), each (batch, kv_heads, seq_so_far, head_dim)."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    past_key_values: KVCache | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and BitNet's `attn_sub_norm`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        # BitNet 2B4T: normalise the attention output before o_proj quantizes it.
        self.attn_sub_norm = RMSNorm(q_dim, eps=cfg.rms_norm_eps)
        self.dropout = cfg.attention_dropout

    def forward(self, x, cos, sin, past=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        s = k.shape[2]
        # A query at position p sees keys 0..p: plain causal when there is no past, all keys
        # for a single new token, an offset triangle for several new tokens after a past.
        mask, causal = None, t > 1 and s == t
        if t > 1 and s > t:
            mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            enable_gqa=self.n_kv != self.n_heads,
        )
        o = o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(self.attn_sub_norm(o)), (k, v)


class MLP(nn.Module):
    """Gated FFN, act(gate(x)) * up(x), with BitNet's `ffn_sub_norm` before `down_proj`;
    act is squared ReLU (2B4T, `hidden_act: relu2`) or SiLU (`silu`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, eps=cfg.rms_norm_eps)
        self.silu = cfg.hidden_act == "silu"

    def forward(self, x):
        g = self.gate_proj(x)
        g = F.silu(g) if self.silu else F.relu(g).square()
        return self.down_proj(self.ffn_sub_norm(g * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.residual_dropout = nn.Dropout(cfg.residual_dropout)

    def forward(self, x, cos, sin, past=None, use_cache=False):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + self.residual_dropout(a)
        # The cache (views of k and v) only when asked: a wrapper that hooks the outputs
        # (FSDP2) warns about views, and training never needs them.
        out = x + self.residual_dropout(self.mlp(self.post_attention_layernorm(x)))
        return out, present if use_cache else None


class BitNetModel(nn.Module):
    """The decoder stack (the `model.` prefix of the parameter names): embed, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin for `positions` (seq,), shaped (1, 1, seq, head_dim), computed in fp32."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        x = self.embed_tokens(input_ids)
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        pos = torch.arange(past_len, past_len + input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(pos, x.dtype)
        presents = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            x, present = layer(
                x, cos, sin, past_key_values[i] if past_key_values else None, use_cache
            )
            if use_cache:
                presents.append(present)
        return self.norm(x), presents


class BitNetLM(nn.Module):
    """The BitNet b1.58 2B4T decoder LM, built full precision (plain `nn.Linear`).

    Args:
        config: a `ModelConfig` or a preset name (`"tiny"`, `"small"`, `"2b4t"`).

    `BitNetLM.bitnet(config, qat)` builds it and applies `quantize_model` (BitNet b1.58).

    `forward(input_ids (batch, seq), labels=None)` returns a `CausalLMOutput`; with `labels`
    (usually `input_ids`; -100 is ignored) its `loss` is the mean next-token cross-entropy.
    """

    def __init__(self, config: ModelConfig | str = "tiny"):
        super().__init__()
        cfg = ModelConfig.preset(config) if isinstance(config, str) else config
        self.config = cfg
        self.model = BitNetModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @classmethod
    def bitnet(cls, config: ModelConfig | str = "tiny", qat: QATConfig | None = None) -> BitNetLM:
        """A `BitNetLM` with every projection quantized by `quantize_model(model, qat)`
        (default `QATConfig()`: BitNet b1.58, ternary weights and 8-bit activations)."""
        model = cls(config)
        quantize_model(model, qat or QATConfig())
        return model

    def _init_weights(self, m: nn.Module) -> None:
        # As transformers' PreTrainedModel: N(0, initializer_range) for linears and embeddings.
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        if input_ids.dim() != 2:
            raise BitNetError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_len + input_ids.shape[1] > self.config.max_position_embeddings:
            raise BitNetError(
                f"sequence length {past_len + input_ids.shape[1]} exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        h, presents = self.model(input_ids, past_key_values, use_cache)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            # Next-token prediction: position i predicts labels[i + 1]; computed in fp32 at
            # least (a float64 model keeps float64).
            wide = torch.promote_types(logits.dtype, torch.float32)
            loss = F.cross_entropy(
                logits[:, :-1].to(wide).reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutput(loss, logits, presents)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        vocab_limit: int | None = None,
        past_key_values: KVCache | None = None,
    ) -> torch.Tensor:
        """Continue `input_ids` (batch, prompt) by up to `max_new_tokens` tokens.

        Greedy unless `do_sample`; sampling divides logits by `temperature` and keeps the
        `top_k` most likely tokens. With `use_cache` each step feeds one token and reuses
        the keys and values of the past (same tokens as without, much less work). A sequence
        that emits `eos_token_id` is padded with it until all are done. `vocab_limit` keeps
        generation to ids below it (a vocabulary padded beyond the tokenizer's, like the
        `tiny` preset's 320 rows for 259 byte tokens). `past_key_values` (per layer (k, v),
        each (batch, kv_heads, past, head_dim)) is a cache the prompt continues, e.g. a learned
        prefix: the prompt's positions start after it. Returns (batch, prompt + generated).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError("max_new_tokens", max_new_tokens, "a non-negative integer")
        if do_sample and not temperature > 0:
            raise ConfigError("temperature", temperature, "a positive number when sampling")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ConfigError("top_k", top_k, "a positive integer or None")
        start = past_key_values[0][0].shape[2] if past_key_values else 0
        total = start + input_ids.shape[1] + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise BitNetError(
                (f"past ({start}) + " if start else "")
                + f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        seq, past, first = input_ids, past_key_values, True
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            # The first step feeds the whole prompt after the given cache; with `use_cache`
            # later steps feed one token, without it every step re-reads the prompt after it.
            feed = seq if first or not use_cache else seq[:, -1:]
            out = self(feed, past_key_values=past, use_cache=use_cache)
            past, first = (out.past_key_values if use_cache else past_key_values), False
            logits = out.logits[:, -1].float()
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            if do_sample:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done[:, None], eos_token_id)
                done = done | (nxt[:, 0] == eos_token_id)
            seq = torch.cat((seq, nxt), dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return seq
