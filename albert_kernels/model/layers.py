"""ALBERT's building blocks, run by the encoder core (``core.py``) on the resolved backend's
kernels. Module and parameter names are transformers' own, so that state-dict keys match
``modeling_albert.py`` exactly, and the core reads ours and transformers' modules alike.

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
from . import core
from .outputs import Recorder, attention_probs


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

    The backend is resolved (``backends/dispatch.py`` ``resolve``) where the computation runs:
    in ``forward``, for the device of the inputs and the dtype of the parameters
    (:meth:`kernels_for`), from a cache keyed on (device type, dtype), so that a model built on
    the meta device and given real weights afterwards (``load_state_dict(assign=True)``,
    accelerate's ``set_module_tensor_to_device``) runs where its weights are. When the module is
    built, moved or cast (``_apply``: ``.to()``, ``.cuda()``, ``.half()``, ...), switched, copied
    or unpickled, the backend is checked for the parameters' device and dtype and the cache is
    refilled, so that ``forward`` looks nothing up in the usual case (which is what lets
    ``torch.compile(model, fullgraph=True)`` trace it): an unknown backend name, or a dtype or
    head dim the backend does not support, raises at once (BackendUnavailable, TypeError,
    ValueError); a backend that cannot run where the parameters are now (``backend="cuda"``
    while the model is still on the CPU) is no error until ``forward``.
    """

    _kernels_by: Optional[dict] = None

    def _head_dim(self) -> int:
        return self.config.head_dim

    def _use_backend(self, backend: Optional[str], strict: bool = True) -> None:
        param = next(self.parameters(), None)
        cache, unknown = {}, backend is not None and backend not in backend_names()
        if param is None or param.is_meta:
            if strict and unknown:
                resolve(backend, "cpu", torch.float32)  # raises BackendUnavailable: unknown name
        else:  # checked now; the first forward resolves where the weights are then
            try:
                cache[(param.device.type, param.dtype)] = resolve(backend, param.device,
                                                                  param.dtype, self._head_dim())
            except (BackendUnavailable, TypeError, ValueError) as e:
                if strict and (unknown or not isinstance(e, BackendUnavailable)):
                    raise  # a failed switch changes nothing
        self.backend, self._kernels_by = backend, cache

    def kernels_for(self, device: torch.device, dtype: torch.dtype) -> Kernels:
        """The backend's kernels for tensors of `dtype` on `device` (cached per device type and
        dtype). BackendUnavailable saying why if the backend cannot run there; TypeError /
        ValueError for a dtype or head dim it does not support."""
        cache = self._kernels_by
        if cache is None:
            cache = self._kernels_by = {}
        key = (device.type, dtype)
        kernels = cache.get(key)
        if kernels is None:
            try:
                kernels = resolve(self.backend, device, dtype, self._head_dim())
            except BackendUnavailable as e:
                raise BackendUnavailable(f"this model cannot run on backend {self.backend!r} on "
                                         f"{device.type} with {dtype}: {e}") from e
            cache[key] = kernels
        return kernels

    @property
    def kernels(self) -> Kernels:
        """The backend resolved for the parameters' device and dtype; BackendUnavailable saying
        why if it cannot run there (parameters on the meta device included)."""
        param = next(self.parameters(), None)
        if param is None:
            raise BackendUnavailable("the module has no parameters to run kernels on")
        return self.kernels_for(param.device, param.dtype)

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the kernels run in: the parameters' (a meta parameter has one too)."""
        param = next(self.parameters(), None)
        return torch.get_default_dtype() if param is None else param.dtype

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._use_backend(self.backend)
        return module

    def __getstate__(self):
        state = dict(self.__dict__)  # a loaded backend module cannot be copied or pickled
        state.pop("_kernels_by", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._use_backend(self.backend, strict=False)


class CoreEncoder:
    """Mixin for an ALBERT encoder (``embedding_hidden_mapping_in``, ``albert_layer_groups``) run
    by the core: ours (:class:`AlbertTransformer`) and the one ``patch_hf`` installs. Subclasses
    give :meth:`_core_types` and :meth:`_core_config` ((num_hidden_layers, num_hidden_groups,
    GELU approximate))."""

    def _core_types(self) -> tuple:
        raise NotImplementedError

    def _core_config(self) -> tuple:
        raise NotImplementedError

    def _core_steps(self, call_hooked: bool):
        layers, groups, approximate = self._core_config()
        return core.albert_steps(self.albert_layer_groups, layers, groups, approximate,
                                 self._core_types(), call_hooked)

    def _run_core(self, x: torch.Tensor, plan: "AttentionPlan", steps,
                  recorder: Optional[Recorder] = None) -> torch.Tensor:
        """x [N, embedding_size] -> [N, hidden]: the input mapping, then :func:`core.run_layers`
        (on the frozen weights when ``core.frozen_for_call`` allows). `recorder` (only when hidden
        states are asked for) receives the first layer's input and every layer's output, as
        transformers' hooks on its AlbertLayer record them; the computation continues from what it
        returns, so the recorded hidden states are on the path to the output."""
        mapping = self.embedding_hidden_mapping_in
        frozen = core.frozen_for_call(self, mapping, steps, x, plan)
        if frozen is not None:
            h = frozen.mapping_in(x)
        else:
            h = core.linear(mapping, x, core.is_plain(mapping))
        if recorder is not None:
            h = recorder.hidden(h)
        return core.run_layers(steps, h, plan, recorder, frozen)

    def _freeze(self, kernels: Kernels, names: dict) -> None:
        """Pack this encoder's weights for the backend's frozen path (``albert_kernels.freeze``,
        ``core.freeze_steps``). ValueError naming the first module it cannot run frozen."""
        core.freeze_steps(self, self.embedding_hidden_mapping_in,
                          self._core_steps(call_hooked=True), kernels, names)

    def _unfreeze(self) -> None:
        self.__dict__.pop("_frozen", None)


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
    """Self-attention + output product + add & LayerNorm (``core.attention_block``). Attribute
    names follow transformers' ``AlbertAttention``, so the core reads both alike."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.scaling = self.attention_head_size ** -0.5
        hidden = config.hidden_size
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        # p only: attention dropout runs inside the fused attention (Philox, every backend)
        self.attention_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.approximate = config.gelu_approximate

    def forward(self, h: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """h [N, hidden] -> [N, hidden]."""
        parts = core.albert_layer_parts(_AttentionOnly(self), self.approximate)
        return core.attention_block(parts, h, plan)


class _AttentionOnly:
    """An attention module seen as a layer whose FFN is never run (core.albert_layer_parts)."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention, self.training = attention, attention.training
        self.ffn = self.ffn_output = self.full_layer_layer_norm = None


class AlbertLayer(nn.Module):
    """Post-LN: h = LN(h + attn(h)); h = LN(h + ffn_output(gelu(ffn(h)))) (``core.run_layer``)."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.approximate = config.gelu_approximate
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = AlbertAttention(config)
        self.ffn = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_output = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """h [N, hidden] -> [N, hidden]."""
        parts = core.albert_layer_parts(self, self.approximate, AlbertAttention)
        return core.run_layer(parts, h, plan)


class AlbertLayerGroup(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.albert_layers = nn.ModuleList(AlbertLayer(config) for _ in range(config.inner_group_num))

    def forward(self, h: torch.Tensor, plan: AttentionPlan,
                recorder: Optional[Recorder] = None) -> torch.Tensor:
        """h [N, hidden] -> [N, hidden] through the group's layers (``core.run_layers``);
        `recorder` records each layer's output."""
        steps = _group_steps(self)
        return core.run_layers(steps, h, plan, recorder)


def _group_steps(group: AlbertLayerGroup) -> list:
    layers = group.albert_layers
    out = []
    for j, layer in enumerate(layers):
        parts = None
        if core.bare(layer, AlbertLayer):
            parts = core.albert_layer_parts(layer, layer.approximate, AlbertAttention)
        out.append(core.Step(id(layer), parts, layer, group_end=j == len(layers) - 1))
    return out


class AlbertTransformer(CoreEncoder, nn.Module):
    """embedding_size -> hidden_size, then the shared layer groups applied num_hidden_layers
    times, by the core (``core.py``): fused where the modules are plain, calls where they are
    not (a group, layer or attention module with hooks is called at its place, so its hooks fire
    once per application with (h, plan) as arguments)."""

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = config
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList(
            AlbertLayerGroup(config) for _ in range(config.num_hidden_groups))

    def _core_types(self) -> tuple:
        return AlbertLayerGroup, AlbertLayer, AlbertAttention

    def _core_config(self) -> tuple:
        c = self.config
        return c.num_hidden_layers, c.num_hidden_groups, c.gelu_approximate

    def forward(self, x: torch.Tensor, plan: AttentionPlan,
                recorder: Optional[Recorder] = None) -> torch.Tensor:
        """x [N, embedding_size] -> [N, hidden] (see ``CoreEncoder._run_core``)."""
        return self._run_core(x, plan, self._core_steps(call_hooked=True), recorder)


def _encoders(model: nn.Module) -> list:
    """(encoder, owner that resolves its kernels) for every encoder run by the core in `model`
    that can be frozen (it has ``_freeze``): ours and patched transformers ALBERT encoders
    (:class:`CoreEncoder`) and patched BERT-family encoders (``hf_family``)."""
    out, seen = [], set()
    for module in model.modules():
        if not isinstance(module, ResolvesKernels):
            continue
        encoder = module if hasattr(module, "_freeze") else getattr(module, "encoder", None)
        if hasattr(encoder, "_freeze") and id(encoder) not in seen:
            seen.add(id(encoder))
            out.append((encoder, module))
    return out


def freeze(model: nn.Module) -> nn.Module:
    """Opt in to the frozen-weight path: every encoder in `model` run by the core packs its
    weights now, and its eval-mode CPU float32 calls that need no autograd graph run on that
    packed copy (the cpp backend's small-M kernels, ``backends/cpp/frozen.py``, one extension
    call per layer; faster for short inputs). `model`: an albert_kernels model, or a transformers
    ALBERT, BERT, RoBERTa, XLM-RoBERTa, ELECTRA or DistilBERT model after ``patch_hf`` (also
    inside a SentenceTransformer or a PEFT model). ALBERT's shared layer is packed once; the
    BERT family's layers are unshared, one packed copy each (it adds about the encoder layers'
    weight size: ~340 MB for BERT-base, ~43 MB for all-MiniLM-L6-v2).

    The weights are frozen from here: call ``freeze(model)`` again after changing them (or
    :func:`unfreeze`). A change torch records (a new parameter tensor, an optimizer step,
    ``load_state_dict``, an in-place op outside ``torch.inference_mode``) makes such a call raise
    RuntimeError; a write through ``.data`` or under ``inference_mode`` is not recorded by torch
    and is NOT detected: the frozen copy then answers with the old weights. A hook or wrapper
    added after freezing is honoured (those calls run unfrozen, on the modules). Training-mode
    calls, calls with autograd, autocast, other dtypes or devices never use the copy.

    Returns model. ValueError if a weight is not float32 on the CPU, or a module is not plain
    (``core.is_plain``: e.g. an unmerged LoRA adapter, a hook, offloading), or a layer's
    activation is not GELU as ``F.gelu`` computes it (erf: hidden_act "gelu"; tanh:
    "gelu_pytorch_tanh"; for ALBERT, whose own code runs "gelu_new" as tanh GELU, also that),
    naming it; BackendUnavailable if the backend has no frozen path (only 'cpp' has one);
    TypeError if `model` holds no such encoder (a model not patched, or left unpatched by
    ``patch_hf``: a decoder).
    """
    encoders = _encoders(model)
    if not encoders:
        raise TypeError(f"freeze expects an albert_kernels model or a transformers ALBERT, BERT, "
                        f"RoBERTa, XLM-RoBERTa, ELECTRA or DistilBERT model after patch_hf, got "
                        f"{type(model).__name__} (call albert_kernels.patch_hf(model) first)")
    names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
    for encoder, owner in encoders:
        for name, p in encoder.named_parameters():
            if p.device.type != "cpu" or p.dtype != torch.float32:
                raise ValueError(f"freeze: the frozen path runs float32 CPU weights; "
                                 f"{names[id(encoder)]}.{name} is {p.dtype} on {p.device}")
        encoder._freeze(owner.kernels, names)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Drop the frozen copies :func:`freeze` made: every call runs on the modules again.
    Returns model."""
    for encoder, _ in _encoders(model):
        encoder._unfreeze()
    return model
