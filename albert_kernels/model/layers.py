"""ALBERT's building blocks on the op layer. Module and parameter names are transformers' own, so
that state-dict keys match ``modeling_albert.py`` exactly.

Every layer works on token-major tensors [N, hidden]: N is the number of real tokens (packed, no
padding) on the fast path. How tokens attend to each other is carried by an :class:`AttentionPlan`.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import pad, unpad
from .config import AlbertConfig


@dataclass
class AttentionPlan:
    """Who attends to whom. Packed (the fast path): cu_seqlens/max_seqlen over [T] tokens.
    Padded: tokens are a [batch, seqlen] grid with a key padding mask (or None: no padding)."""
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    batch: int = 0
    seqlen: int = 0
    key_padding_mask: Optional[torch.Tensor] = None

    def attend(self, be: ModuleType, q, k, v, scale: float) -> torch.Tensor:
        """q, k, v [N, heads, head_dim] -> context [N, heads, head_dim]."""
        if self.cu_seqlens is not None:
            return be.varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen, scale)
        grid = lambda t: t.view(self.batch, self.seqlen, *t.shape[1:]).transpose(1, 2)
        ctx = be.attention(grid(q), grid(k), grid(v), self.key_padding_mask, scale)
        return ctx.transpose(1, 2).reshape(q.shape)


def pack_tokens(grid: torch.Tensor, key_mask: Optional[torch.Tensor], padded: bool):
    """Lay a [B, L, ...] batch out as tokens for the layers: the one place that removes padding.

    Returns (tokens [N, ...], plan, unpack): packed real tokens with cu_seqlens (the fast path;
    without a mask, B sequences of L tokens), or, with `padded` (torch.compile: static shapes),
    every position with the key padding mask. ``unpack(h)`` puts [N, ...] back on the [B, L]
    grid with zero rows at padded positions.
    """
    batch, seqlen = grid.shape[:2]
    indices = None
    if padded:
        plan = AttentionPlan(batch=batch, seqlen=seqlen, key_padding_mask=key_mask)
        tokens = grid.reshape(batch * seqlen, *grid.shape[2:])
    elif key_mask is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=grid.device)
        plan = AttentionPlan(cu_seqlens=cu, max_seqlen=seqlen)
        tokens = grid.reshape(batch * seqlen, *grid.shape[2:])
    else:
        tokens, indices, cu, max_seqlen = unpad(grid, key_mask)
        plan = AttentionPlan(cu_seqlens=cu, max_seqlen=max_seqlen)

    def unpack(h: torch.Tensor) -> torch.Tensor:
        if indices is not None:
            return pad(h, indices, batch, seqlen)
        out = h.view(batch, seqlen, *h.shape[1:])
        return out if key_mask is None else out * key_mask[..., None].to(out.dtype)
    return tokens, plan, unpack


class AlbertEmbeddings(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids) -> torch.Tensor:
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.LayerNorm(x))


class AlbertAttention(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.eps = config.layer_norm_eps
        self.attention_dropout_p = config.attention_probs_dropout_prob
        hidden = config.hidden_size
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, plan: AttentionPlan, be: ModuleType) -> torch.Tensor:
        if self.training and self.attention_dropout_p > 0:
            raise ValueError("attention_probs_dropout_prob > 0 in training is not supported by the "
                             "fused attention kernels; set it to 0 (the ALBERT v2 configs use 0)")
        heads = lambda t: t.view(t.shape[0], self.num_heads, self.head_dim)
        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        ctx = plan.attend(be, q, k, v, self.scale).reshape(h.shape)
        out = self.output_dropout(self.dense(ctx))
        return be.add_layer_norm(out, h, self.LayerNorm.weight, self.LayerNorm.bias, self.eps)


class AlbertLayer(nn.Module):
    """Post-LN: h = LN(h + attn(h)); h = LN(h + ffn_output(gelu(ffn(h))))."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.eps, self.approximate = config.layer_norm_eps, config.gelu_approximate
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = AlbertAttention(config)
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h: torch.Tensor, plan: AttentionPlan, be: ModuleType) -> torch.Tensor:
        a = self.attention(h, plan, be)
        f = be.gelu_ffn(a, self.ffn.weight, self.ffn.bias, self.ffn_output.weight,
                        self.ffn_output.bias, self.approximate)
        ln = self.full_layer_layer_norm
        return be.add_layer_norm(f, a, ln.weight, ln.bias, self.eps)


class AlbertLayerGroup(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.albert_layers = nn.ModuleList(AlbertLayer(config) for _ in range(config.inner_group_num))

    def forward(self, h, plan: AttentionPlan, be: ModuleType):
        for layer in self.albert_layers:
            h = layer(h, plan, be)
        return h


class AlbertTransformer(nn.Module):
    """embedding_size -> hidden_size, then the shared layer groups applied num_hidden_layers times."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList(
            AlbertLayerGroup(config) for _ in range(config.num_hidden_groups))

    def forward(self, x: torch.Tensor, plan: AttentionPlan, be: ModuleType) -> torch.Tensor:
        h = self.embedding_hidden_mapping_in(x)
        for i in range(self.config.num_hidden_layers):
            h = self.albert_layer_groups[self.config.group_of_layer(i)](h, plan, be)
        return h
