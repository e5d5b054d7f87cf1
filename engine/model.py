"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) with tensor-parallel layers.

Differences between the families are config flags: QKV bias (Qwen2, or Llama's
attention_bias), per-head q/k RMSNorm (Qwen3), explicit head_dim, tied embeddings."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pdserve.engine import parallel
from pdserve.engine.attention import AttentionMetadata, PagedAttention
from pdserve.engine.layers import (ColumnParallelLinear, ParallelLMHead, RMSNorm, RotaryEmbedding,
                           RowParallelLinear, VocabParallelEmbedding)
from pdserve.engine.rope import rope_parameters

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class ModelSpec:
    """The few numbers the model needs, read once from a transformers config."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, cfg) -> "ModelSpec":
        mt = cfg.model_type
        if mt not in SUPPORTED:
            raise ValueError(f"model type {mt!r} is not supported (supported: {sorted(SUPPORTED)})")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {cfg.hidden_act!r} is not supported (silu only)")
        heads = cfg.num_attention_heads
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            model_type=mt, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers,
            num_heads=heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            qkv_bias=(mt == "qwen2") or attn_bias,
            o_bias=attn_bias and mt in ("llama", "qwen3"),
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=(mt == "qwen3"),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def check_tp(self, tp: int) -> None:
        if self.num_heads % tp:
            raise ValueError(f"TP size {tp} does not divide the {self.num_heads} attention heads")
        kv = self.num_kv_heads
        if kv % tp and tp % kv:
            raise ValueError(f"TP size {tp} and {kv} KV heads: one must divide the other")
        if self.intermediate_size % tp:
            raise ValueError(f"TP size {tp} does not divide intermediate size {self.intermediate_size}")

    def kv_heads_per_rank(self, tp: int) -> int:
        return max(1, self.num_kv_heads // tp)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding):
        super().__init__()
        tp = parallel.world()
        self.heads = spec.num_heads // tp
        self.kv_heads = spec.kv_heads_per_rank(tp)
        replicas = max(1, tp // spec.num_kv_heads)
        d = self.head_dim = spec.head_dim
        self.qkv_proj = ColumnParallelLinear(spec.hidden_size, [
            ("q", self.heads * d, spec.num_heads * d, 1),
            ("k", self.kv_heads * d, spec.num_kv_heads * d, replicas),
            ("v", self.kv_heads * d, spec.num_kv_heads * d, replicas),
        ], bias=spec.qkv_bias)
        self.o_proj = RowParallelLinear(spec.num_heads * d, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.rotary = rotary
        self.attn = PagedAttention(self.heads, self.kv_heads, d, d ** -0.5)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        d = self.head_dim
        qkv = self.qkv_proj(x)
        if meta.triton and not self.qk_norm:  # one kernel: RoPE of q and k, k and v into the cache
            q = self.rotary.rope_store_kv(qkv, self.heads, self.kv_heads, positions, self.attn.k_cache,
                                          self.attn.v_cache, meta.slot_mapping)
            return self.o_proj(self.attn(q, None, None, meta).reshape(-1, self.heads * d))
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k, v = q.view(-1, self.heads, d), k.view(-1, self.kv_heads, d), v.view(-1, self.kv_heads, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta).reshape(-1, self.heads * d))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        per_rank = spec.intermediate_size // parallel.world()
        self.inter = per_rank
        full = spec.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(spec.hidden_size, [("gate", per_rank, full, 1),
                                                                    ("up", per_rank, full, 1)], spec.mlp_bias)
        self.down_proj = RowParallelLinear(full, spec.hidden_size, spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cuda:
            from pdserve.engine.triton_ops import silu_and_mul
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(spec, rotary)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the previous sublayer's output, residual the stream before it (None at layer 0);
        each norm adds the two first (fused on GPU)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    """Decoder stack + LM head. forward() returns hidden states; compute_logits() the
    logits of chosen rows (rank 0 only, None on other ranks)."""

    # checkpoint name fragment -> (our parameter name fragment, shard id)
    packed = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
              "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}

    def __init__(self, spec: ModelSpec, hf_config, max_positions: int):
        super().__init__()
        spec.check_tp(parallel.world())
        self.spec = spec
        inv_freq, scaling = rope_parameters(hf_config, spec.head_dim)
        rotary = RotaryEmbedding(inv_freq, scaling, max_positions)
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, rotary) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)
