"""Paged attention (plain torch path, the same on CPU and GPU).

The KV cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim].
Each step writes the new tokens' K/V into their slots, then every query attends
to its sequence's cached context read through the block table."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they attend to; built by the model runner."""
    slot_mapping: torch.Tensor      # [T] flat slot (block * block_size + offset) per token; -1 writes nowhere
    block_tables: torch.Tensor      # [N, max_blocks] per sequence, padded with 0
    context_lens: torch.Tensor      # [N] tokens in cache after this step (0 = a padded row)
    query_lens: list[int]           # [N] new tokens per sequence (host copy)
    context_lens_host: list[int]    # [N] host copy of context_lens
    decode_rows: torch.Tensor       # indices of sequences with one new token
    decode_tokens: torch.Tensor     # token index of each decode row in the flat batch
    prefill_rows: list[int]         # sequences with several new tokens
    triton: bool = False            # CUDA kernels (engine/triton_attention.py) instead of the torch path
    query_starts: torch.Tensor | None = None   # [N] int32, triton path
    query_lens_dev: torch.Tensor | None = None  # [N] int32, triton path
    max_query_len: int = 1
    # triton prefill kernel (engine/step_inputs.py): block tables row after row at the width
    # table_width[0] gives, and the tiles of block_m query rows to compute
    tables: torch.Tensor | None = None
    table_width: torch.Tensor | None = None
    work: torch.Tensor | None = None
    block_m: int = 64
    query_starts_host: list[int] | None = None  # [N] torch path: where each sequence's tokens start


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                meta: AttentionMetadata) -> torch.Tensor:
        # q [T, H, D], k/v [T, Hkv, D]; triton path: k/v None when already in the cache (fused RoPE + store)
        if meta.triton:
            from pdserve.engine import triton_attention as ta
            if k is not None:
                ta.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            if meta.max_query_len == 1:
                return ta.paged_decode(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale)
            return ta.paged_prefill(q, self.k_cache, self.v_cache, meta.tables, meta.table_width, meta.work,
                                    meta.query_starts, meta.query_lens_dev, meta.context_lens, meta.block_m,
                                    self.scale)
        nb, bs = self.k_cache.shape[:2]
        self.k_cache.view(nb * bs, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k
        self.v_cache.view(nb * bs, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v
        out = torch.empty_like(q)
        if meta.decode_rows.numel():
            out[meta.decode_tokens] = self._decode(q[meta.decode_tokens], meta)
        for row in meta.prefill_rows:
            s, ql = meta.query_starts_host[row], meta.query_lens[row]
            out[s:s + ql] = self._prefill(q[s:s + ql], meta.block_tables[row], meta.context_lens_host[row])
        return out

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tables = meta.block_tables[meta.decode_rows]
        lens = meta.context_lens[meta.decode_rows]
        b = tables.shape[0]
        k = self.k_cache[tables].view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_cache[tables].view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                           scale=self.scale, enable_gqa=True)
        return o.squeeze(2)

    def _prefill(self, q: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
        bs = self.k_cache.shape[1]
        blocks = table[:-(-ctx // bs)]
        k = self.k_cache[blocks].view(-1, self.num_kv_heads, self.head_dim)[:ctx].transpose(0, 1)
        v = self.v_cache[blocks].view(-1, self.num_kv_heads, self.head_dim)[:ctx].transpose(0, 1)
        ql = q.shape[0]
        qh = q.transpose(0, 1).unsqueeze(0)
        if ql == ctx:
            o = F.scaled_dot_product_attention(qh, k.unsqueeze(0), v.unsqueeze(0), is_causal=True,
                                               scale=self.scale, enable_gqa=True)
        else:
            qpos = torch.arange(ctx - ql, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qh, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                               scale=self.scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)
