"""ALBERT's building blocks on the op layer. Module and parameter names are transformers' own, so
that state-dict keys match ``modeling_albert.py`` exactly.

Every layer works on token-major tensors [N, hidden]: N is the number of real tokens (packed, no
padding) on the fast path. How tokens attend to each other is carried by an :class:`AttentionPlan`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import backend_names
from ..backends.dispatch import Kernels, resolve
from ..errors import BackendUnavailable
from .config import AlbertConfig
from .layout import MaskLayout, mask_layout, packed_sequences
from .outputs import Recorder, attention_probs
from .packed import PackCache, packed_encoder


@dataclass
class AttentionPlan:
    """How one forward runs: the resolved backend ``kernels`` every layer calls, and who attends
    to whom. Packed (the fast path): cu_seqlens/max_seqlen over the first ``n_real`` tokens; the
    tokens after them (if ``cu_extra``, int32 [B+1], is set) are query-only: row b's attend to row
    b's real keys (``cu_seqlens_q=cu_extra``, ``cu_seqlens_k=cu_seqlens``) and no token attends to
    them (left padding's first position, see ``layout.py``). Padded: tokens are a [batch,
    seqlen] grid with a key padding mask (or None: no padding); with ``probs`` (a list), plain
    PyTorch attention forms the probabilities (``allowed``: bool [B, 1, L, L]) and appends them."""
    kernels: Kernels
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    batch: int = 0
    seqlen: int = 0
    key_padding_mask: Optional[torch.Tensor] = None
    n_real: int = 0
    cu_extra: Optional[torch.Tensor] = None
    allowed: Optional[torch.Tensor] = None
    probs: Optional[list] = None

    def attend(self, q, k, v, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
        """q, k, v [N, heads, head_dim] -> context [N, heads, head_dim]; dropout_p on the
        attention probabilities (0 in eval: the caller decides)."""
        drop = (dropout_p,) if dropout_p > 0 else ()  # backends without dropout keep working
        if self.cu_seqlens is not None:
            cu, n, varlen = self.cu_seqlens, self.max_seqlen, self.kernels.varlen_attention
            if self.cu_extra is None:  # self-attention: keys are the queries
                return varlen(q, k, v, cu, cu, n, n, scale, *drop)
            t = self.n_real
            real = varlen(q[:t], k[:t], v[:t], cu, cu, n, n, scale, *drop)
            extra = varlen(q[t:], k[:t], v[:t], self.cu_extra, cu, 1, n, scale, *drop)
            return torch.cat([real, extra])
        grid = lambda t: t.view(self.batch, self.seqlen, *t.shape[1:]).transpose(1, 2)
        if self.probs is not None:
            ctx, probs = attention_probs(grid(q), grid(k), grid(v), self.allowed, scale, dropout_p)
            self.probs.append(probs)
        else:
            ctx = self.kernels.attention(grid(q), grid(k), grid(v), self.key_padding_mask, scale,
                                         *drop)
        return ctx.transpose(1, 2).reshape(q.shape)


def key_mask_from_attention_mask(mask, batch: int, seqlen: int) -> Optional[torch.Tensor]:
    """The bool [B, L] key mask (True = real token) of a padding mask, or None (no mask): the
    padding case of :func:`layout.mask_layout`, the one place a mask becomes a layout (see it for
    the masks accepted and the errors). ValueError naming attention_mask for a mask of packed
    sequences (use ``mask_layout``)."""
    layout = mask_layout(mask, batch, seqlen)
    if layout.segments is not None:
        raise ValueError("attention_mask: a block-diagonal mask of packed sequences has no single "
                         "key mask (layout.mask_layout gives its segments)")
    return layout.key_mask


class Unpacker:
    """Between the layers' tokens [N, ...] and the [B, L, ...] grid of a batch (made by
    :func:`pack_tokens`).

    ``unpack(h)`` (calling it) puts tokens on the grid: real tokens and a left-padded first
    position hold their values, other padded positions zero rows. ``tokens(grid, h)`` takes the
    tokens back from such a grid, so that a computation continued from them has the grid on its
    path: hidden states returned to the caller are then ancestors of the outputs, and
    ``.retain_grad()`` on them receives gradients, as on transformers' own. ``h`` (the tokens the
    grid was made from) gives the padded layout's positions that the grid zeroes, so the
    continued values are exactly ``h``'s.

    Packed layout: ``indices`` int64 [N] into the flattened B*L positions (None: every position
    is a token, in order). Padded layout (``padded``): N = B*L and ``keep`` bool [B, L] or None
    (every position kept).
    """

    def __init__(self, batch: int, seqlen: int, padded: bool,
                 indices: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None):
        self.batch, self.seqlen, self.padded = batch, seqlen, padded
        self.indices, self.keep = indices, keep

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        batch, seqlen, rest = self.batch, self.seqlen, h.shape[1:]
        if self.padded:
            out = h.view(batch, seqlen, *rest)
            return out if self.keep is None else out * self.keep[..., None].to(out.dtype)
        if self.indices is None:
            return h.view(batch, seqlen, *rest)
        out = h.new_zeros(batch * seqlen, *rest).index_put((self.indices,), h)
        return out.view(batch, seqlen, *rest)

    def tokens(self, grid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The tokens [N, ...] of `grid` [B, L, ...] (made by ``self(h)``), computed from `grid`;
        their values equal `h`'s."""
        flat = grid.reshape(self.batch * self.seqlen, *grid.shape[2:])
        if self.padded:
            if self.keep is None:
                return flat
            keep = self.keep.reshape(-1, *(1,) * (h.dim() - 1))
            return torch.where(keep, flat, h)   # zeroed positions: h's values, off the grid
        return flat if self.indices is None else flat.index_select(0, self.indices)


def pack_tokens(grid: torch.Tensor, layout: MaskLayout, padded: bool, kernels: Kernels,
                probs: Optional[list] = None):
    """Lay a [B, L, ...] batch out as tokens for the layers: the one place that removes padding.

    layout: from :func:`layout.mask_layout`. Returns (tokens [N, ...], plan, unpack): packed real
    tokens with cu_seqlens (the fast path; without a mask, B sequences of L tokens; packed rows:
    one sequence per block), plus a left-padded row's first position as a query-only token; or,
    with `padded` (torch.compile: static shapes) or `probs` (a list receiving attention
    probabilities), every position of the grid. The plan carries `kernels`. ``unpack``, an
    :class:`Unpacker`, puts [N, ...] back on the [B, L] grid (``unpack(h)``: real tokens and a
    left-padded first position hold their values, other padded positions zero rows) and takes
    tokens back from it (``unpack.tokens``). Packed, the device is read once or twice here
    (lengths, left-padded rows); never per layer.
    """
    batch, seqlen = grid.shape[:2]
    key_mask = layout.key_mask
    if probs is not None or (padded and layout.segments is None):
        allowed = layout.allowed(batch, seqlen, grid.device) if probs is not None else None
        plan = AttentionPlan(kernels, batch=batch, seqlen=seqlen, key_padding_mask=key_mask,
                             allowed=allowed, probs=probs)
        keep = key_mask
        if key_mask is not None and layout.segments is None and seqlen > 0:
            keep = key_mask.clone()  # a left-padded first position is computed and kept
            keep[:, 0] = key_mask.any(dim=1)
        unpack = Unpacker(batch, seqlen, padded=True, keep=keep)
        return grid.reshape(batch * seqlen, *grid.shape[2:]), plan, unpack
    indices, cu, max_seqlen, extra = packed_sequences(layout, batch, seqlen, grid.device)
    flat = grid.reshape(batch * seqlen, *grid.shape[2:])
    tokens = flat if indices is None else flat.index_select(0, indices)
    plan = AttentionPlan(kernels, cu_seqlens=cu, max_seqlen=max_seqlen, n_real=tokens.shape[0])
    if extra is not None:
        positions, plan.cu_extra = extra
        tokens = torch.cat([tokens, flat.index_select(0, positions)])
        indices = torch.cat([indices, positions])
    return tokens, plan, Unpacker(batch, seqlen, padded=False, indices=indices)


class ResolvesKernels:
    """Mixin for the modules that pick a backend (``self.backend``: a name, or None for the best)
    and run its kernels: the ALBERT models and the encoder ``patch_hf`` installs.

    The backend is resolved (``backends/dispatch.py`` ``resolve``) for the parameters' device and
    dtype and ``self.config.head_dim`` when the module is built (``_use_backend`` at the end of
    ``__init__``), moved or cast (``_apply``: ``.to()``, ``.cuda()``, ``.half()``, ...), switched,
    copied or unpickled; never in ``forward``, which reads :attr:`kernels`. A backend that cannot
    run where the parameters are now (``backend="cuda"`` while the model is still on the CPU) is
    no error until ``forward``; an unknown backend name, or a dtype or head dim the backend does
    not support, raises at once (BackendUnavailable, TypeError, ValueError).
    """

    _kernels: Optional[Kernels] = None
    _kernels_error: Optional[Exception] = None

    def _use_backend(self, backend: Optional[str], strict: bool = True) -> None:
        param = next(self.parameters(), None)
        try:
            if param is None:
                raise BackendUnavailable("the module has no parameters to run kernels on")
            kernels, error = resolve(backend, param.device, param.dtype, self.config.head_dim), None
        except (BackendUnavailable, TypeError, ValueError) as e:
            unknown = backend is not None and backend not in backend_names()
            if strict and (unknown or not isinstance(e, BackendUnavailable)):
                raise
            kernels, error = None, e
        self.backend, self._kernels, self._kernels_error = backend, kernels, error

    @property
    def kernels(self) -> Kernels:
        """The resolved backend; BackendUnavailable saying why if it cannot run where the
        parameters are."""
        if self._kernels is None:
            raise BackendUnavailable(f"this model cannot run on backend {self.backend!r} where its "
                                     f"parameters are: {self._kernels_error}")
        return self._kernels

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._use_backend(self.backend)
        return module

    def __getstate__(self):
        state = dict(self.__dict__)  # a loaded backend module cannot be copied or pickled
        state.pop("_kernels", None)
        state.pop("_kernels_error", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._use_backend(self.backend, strict=False)


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

    def forward(self, h: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        heads = lambda t: t.view(t.shape[0], self.num_heads, self.head_dim)
        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        # attention dropout in training, inside the fused attention (Philox, every backend)
        dropout_p = self.attention_dropout_p if self.training else 0.0
        ctx = plan.attend(q, k, v, self.scale, dropout_p).reshape(h.shape)
        out = self.output_dropout(self.dense(ctx))
        return plan.kernels.add_layer_norm(out, h, self.LayerNorm.weight, self.LayerNorm.bias, self.eps)


class AlbertLayer(nn.Module):
    """Post-LN: h = LN(h + attn(h)); h = LN(h + ffn_output(gelu(ffn(h))))."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.eps, self.approximate = config.layer_norm_eps, config.gelu_approximate
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = AlbertAttention(config)
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        a = self.attention(h, plan)
        f = plan.kernels.gelu_ffn(a, self.ffn.weight, self.ffn.bias, self.ffn_output.weight,
                        self.ffn_output.bias, self.approximate)
        ln = self.full_layer_layer_norm
        return plan.kernels.add_layer_norm(f, a, ln.weight, ln.bias, self.eps)


class AlbertLayerGroup(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.albert_layers = nn.ModuleList(AlbertLayer(config) for _ in range(config.inner_group_num))

    def forward(self, h, plan: AttentionPlan):
        for layer in self.albert_layers:
            h = layer(h, plan)
        return h


class AlbertTransformer(nn.Module):
    """embedding_size -> hidden_size, then the shared layer groups applied num_hidden_layers times."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList(
            AlbertLayerGroup(config) for _ in range(config.num_hidden_groups))
        self._pack_cache = PackCache()  # the small-M inference path's packed weights (packed.py)

    def forward(self, x: torch.Tensor, plan: AttentionPlan,
                recorder: Optional[Recorder] = None) -> torch.Tensor:
        """x [N, embedding_size] -> [N, hidden]. `recorder` (only when hidden states are asked
        for) receives the first layer's input and every layer's output, as transformers' hooks
        on its AlbertLayer record them; the computation continues from what it returns, so the
        recorded hidden states are on the path to the output (their gradients are the output's)."""
        packed = packed_encoder(self, x, plan.kernels)  # None unless cpp fp32 inference, few tokens
        if packed is not None:
            h, run = packed.mapping_in(x), packed.layer
        else:
            h, run = self.embedding_hidden_mapping_in(x), None
        if recorder is None:
            for i in range(self.config.num_hidden_layers):
                group = self.albert_layer_groups[self.config.group_of_layer(i)]
                if run is None:
                    h = group(h, plan)
                else:
                    for layer in group.albert_layers:
                        h = run(layer, h, plan)
            return h
        h = recorder.hidden(h)
        for i in range(self.config.num_hidden_layers):
            layers = self.albert_layer_groups[self.config.group_of_layer(i)].albert_layers
            for j, layer in enumerate(layers):
                h = layer(h, plan) if run is None else run(layer, h, plan)
                h = recorder.hidden(h, group_end=j == len(layers) - 1)
        return h
