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
from ..ops import unpad
from .config import AlbertConfig


@dataclass
class AttentionPlan:
    """How one forward runs: the resolved backend ``kernels`` every layer calls, and who attends
    to whom. Packed (the fast path): cu_seqlens/max_seqlen over [T] tokens. Padded: tokens are a
    [batch, seqlen] grid with a key padding mask (or None: no padding)."""
    kernels: Kernels
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    batch: int = 0
    seqlen: int = 0
    key_padding_mask: Optional[torch.Tensor] = None

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        """q, k, v [N, heads, head_dim] -> context [N, heads, head_dim]."""
        if self.cu_seqlens is not None:
            cu, n = self.cu_seqlens, self.max_seqlen  # self-attention: keys are the queries
            return self.kernels.varlen_attention(q, k, v, cu, cu, n, n, scale)
        grid = lambda t: t.view(self.batch, self.seqlen, *t.shape[1:]).transpose(1, 2)
        ctx = self.kernels.attention(grid(q), grid(k), grid(v), self.key_padding_mask, scale)
        return ctx.transpose(1, 2).reshape(q.shape)


def key_mask_from_attention_mask(mask, batch: int, seqlen: int) -> Optional[torch.Tensor]:
    """The one place an attention mask becomes the bool [B, L] key mask (True = real token), for
    AlbertModel and the encoder ``patch_hf`` installs alike.

    mask: None (no padding); [B, L] bool or 0/1 numbers (1 = real token, as transformers takes
    it from the user); or the [B, 1, Lq, L] padding mask transformers passes to its encoder, bool
    (True = attend) or additive float (0 = attend, a large negative value = masked).
    Raises ValueError naming attention_mask for any other type or shape, and (eagerly: the check
    reads the mask on the host, so not under torch.compile) for a [B, L] mask with values other
    than 0 and 1.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a padding mask tensor, got a "
                         f"{type(mask).__name__} (with transformers, use attn_implementation "
                         "'eager' or 'sdpa')")
    additive = False
    if mask.dim() == 4:
        if mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[-1] != seqlen:
            raise ValueError(f"a 4D attention_mask must be a [B, 1, Lq, L] = [{batch}, 1, Lq, "
                             f"{seqlen}] padding mask, got {list(mask.shape)}")
        mask = mask[:, 0, 0, :]  # a padding mask masks keys: every query row is the same
        additive = mask.is_floating_point()
    elif tuple(mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask must be [B, L] = [{batch}, {seqlen}] like the input, "
                         f"got {list(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if additive:
        return mask == 0
    if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1 (1 = real token)")
    return mask != 0


def pack_tokens(grid: torch.Tensor, key_mask: Optional[torch.Tensor], padded: bool,
                kernels: Kernels):
    """Lay a [B, L, ...] batch out as tokens for the layers: the one place that removes padding.

    key_mask: bool [B, L] (True = real token) from :func:`key_mask_from_attention_mask`, or None.
    Returns (tokens [N, ...], plan, unpack): packed real tokens with cu_seqlens (the fast path;
    without a mask, B sequences of L tokens), or, with `padded` (torch.compile: static shapes),
    every position with the key padding mask; the plan carries `kernels`. ``unpack(h)`` puts
    [N, ...] back on the [B, L] grid with zero rows at padded positions. The packed path reads
    the longest length back to the host once (``unpad``); nothing after it does.
    """
    batch, seqlen = grid.shape[:2]
    indices = None
    if padded:
        plan = AttentionPlan(kernels, batch=batch, seqlen=seqlen, key_padding_mask=key_mask)
        tokens = grid.reshape(batch * seqlen, *grid.shape[2:])
    elif key_mask is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=grid.device)
        plan = AttentionPlan(kernels, cu_seqlens=cu, max_seqlen=seqlen)
        tokens = grid.reshape(batch * seqlen, *grid.shape[2:])
    else:
        tokens, indices, cu, max_seqlen = unpad(grid, key_mask)
        plan = AttentionPlan(kernels, cu_seqlens=cu, max_seqlen=max_seqlen)

    def unpack(h: torch.Tensor) -> torch.Tensor:
        if indices is not None:  # ak.pad without its index checks (a host read): unpad made them
            out = h.new_zeros(batch * seqlen, *h.shape[1:]).index_put((indices,), h)
            return out.view(batch, seqlen, *h.shape[1:])
        out = h.view(batch, seqlen, *h.shape[1:])
        return out if key_mask is None else out * key_mask[..., None].to(out.dtype)
    return tokens, plan, unpack


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
        if self.training and self.attention_dropout_p > 0:
            raise ValueError("attention_probs_dropout_prob > 0 in training is not supported by the "
                             "fused attention kernels; set it to 0 (the ALBERT v2 configs use 0)")
        heads = lambda t: t.view(t.shape[0], self.num_heads, self.head_dim)
        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        ctx = plan.attend(q, k, v, self.scale).reshape(h.shape)
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

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        h = self.embedding_hidden_mapping_in(x)
        for i in range(self.config.num_hidden_layers):
            h = self.albert_layer_groups[self.config.group_of_layer(i)](h, plan)
        return h
