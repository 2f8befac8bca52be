"""``attn_implementation="albert_kernels"``: our fused attention behind transformers' own plug point.

transformers (5.x) models call attention through ``ALL_ATTENTION_FUNCTIONS`` with the signature
``(module, query, key, value, attention_mask, scaling, dropout, **kwargs) -> (attn_output,
attn_weights)``: query/key/value ``[B, H, L, D]``, attn_output ``[B, L, H, D]``. The mask they pass
is built by the function registered under the same name in ``ALL_MASK_ATTENTION_FUNCTIONS``.
:func:`register_hf_attention` registers both.

The mask function (:func:`albert_kernels_mask`) returns masks with torch SDPA's meaning (bool
``[B, 1, Lq, Lk]``, True = attend), so any code that reads them sees a correct mask, but shaped so
the attention function can tell, without reading the device, what our kernels can run:

- a padding mask (the common encoder case) is the 2D mask expanded without a copy (stride 0 over
  the queries): every query row is the same key padding mask -> ``ak.attention`` with
  ``key_padding_mask``;
- no padding -> ``None`` -> ``ak.attention`` without a mask;
- anything else (packed rows from ``position_ids``, causal, sliding windows, cross-attention) is
  transformers' own SDPA mask. A block-diagonal one (packed rows, every token real) is recognised
  once per forward and carries its ``cu_seqlens`` -> ``ak.varlen_attention``.

The attention function runs our kernels exactly where they compute what SDPA computes, and hands
everything else to transformers' own functions, so a number is never wrong:

- ``cu_seq_lens_q``/``cu_seq_lens_k`` keyword arguments (flash-attention style, e.g.
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) -> ``ak.varlen_attention`` on the
  flattened tokens, as transformers' flash-attention path reads them;
- ``output_attentions=True`` -> the model's own eager attention (the probabilities are returned);
- causal attention, grouped-query heads, query and key lengths that differ, position biases,
  sinks, sliding windows, and any 4D mask we did not build (a user's additive or bool mask) ->
  transformers' SDPA attention, the same numbers as ``attn_implementation="sdpa"``;
- ``head_mask`` -> ``ValueError`` (transformers 5 has none; its SDPA path cannot apply one either).
"""
from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch

from ..backends import resolve
from ..ops import attention, varlen_attention

DEFAULT_NAME = "albert_kernels"
# The attribute a packed-rows mask carries from the mask function to the attention function:
# (cu_seqlens int32 [S+1] over the B * L flattened tokens, max_seqlen int).
_VARLEN_ATTR = "_albert_kernels_varlen"
_SDPA_ONLY_KWARGS = ("position_bias", "s_aux", "softcap", "sliding_window")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REGISTERED: dict = {}


def register_hf_attention(name: str = DEFAULT_NAME, *, backend: Optional[str] = None) -> str:
    """Register our attention with transformers under `name`, for ``attn_implementation=name``.

    Registers the attention function in transformers' ``AttentionInterface`` and the mask
    function in its ``AttentionMaskInterface`` (global, for every model). Afterwards
    ``AutoModel.from_pretrained(path, attn_implementation=name)``,
    ``model.set_attn_implementation(name)`` and
    ``SentenceTransformer(path, model_kwargs={"attn_implementation": name})`` run ``ak.attention``
    / ``ak.varlen_attention`` inside any model that dispatches through
    ``ALL_ATTENTION_FUNCTIONS`` (see the module docstring for what falls back).

    name: str, default "albert_kernels"; must not be one of transformers' own implementations.
    backend: None (the best backend for the tensors' device; if it does not take their dtype or
    head dim, that call falls back to transformers' SDPA with a warning) or a backend name
    ("cpp", "reference", "cuda", "triton"), which must then run the call (its errors are raised).
    Calling it again with the same name re-registers (the new backend wins). Returns `name`.
    Raises TypeError / ValueError naming the argument; ImportError without transformers 5.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if any(c in name for c in "/:|") or any(w in name for w in ("sdpa", "flash", "flex", "eager")):
        raise ValueError(f"name must not contain '/', ':', '|', 'sdpa', 'flash', 'flex' or 'eager' "
                         f"(transformers gives those meanings of its own), got {name!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend is not None:
        from ..backends import registry
        if backend not in registry.backend_names():
            raise ValueError(f"backend {backend!r} is not a registered backend; known: "
                             f"{', '.join(registry.backend_names())}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # transformers 4.x has neither, or no transformers at all
        raise ImportError("register_hf_attention needs transformers >= 5 (AttentionInterface and "
                          f"AttentionMaskInterface): {exc}") from exc
    if name in _transformers_own(AttentionInterface, AttentionMaskInterface):
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations")

    def albert_kernels_attention(module, query, key, value, attention_mask, scaling=None,
                                 dropout=0.0, **kwargs):
        return hf_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                    dropout=dropout, backend=backend, **kwargs)

    albert_kernels_attention.__qualname__ = albert_kernels_attention.__name__
    AttentionInterface.register(name, albert_kernels_attention)
    AttentionMaskInterface.register(name, albert_kernels_mask)
    _REGISTERED[name] = backend
    return name


def _transformers_own(attention_interface, mask_interface) -> set:
    own = set(attention_interface._global_mapping) | set(mask_interface._global_mapping)
    return own - set(_REGISTERED)


# ----------------------------------------------------------------------------------------------
# The mask function


def albert_kernels_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                        mask_function=None, attention_mask: Optional[torch.Tensor] = None,
                        local_size: Optional[int] = None, **kwargs) -> Optional[torch.Tensor]:
    """transformers' mask-interface call (the arguments of ``masking_utils.sdpa_mask``).

    Returns None (no mask), or a bool ``[batch_size, 1, q_length, kv_length]`` mask with SDPA's
    meaning: for a plain bidirectional padding mask, the 2D ``attention_mask [B, kv_length]``
    expanded with stride 0 over heads and queries (no copy); otherwise transformers' own
    ``sdpa_mask``, which, when it is block-diagonal over contiguous runs of real tokens (packed
    rows), carries their ``cu_seqlens`` for the attention function.
    """
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask
    plain = (mask_function is bidirectional_mask_function and local_size is None
             and _is_zero(q_offset) and _is_zero(kv_offset) and q_length == kv_length
             and (attention_mask is None or (attention_mask.dim() == 2
                                             and attention_mask.shape[-1] == kv_length)))
    if plain:
        if attention_mask is None:
            return None
        keys = attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()
        return keys[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function
        mask_function = causal_mask_function
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size, **kwargs)
    if mask is not None and q_length == kv_length and not _tracing():
        layout = packed_rows_layout(mask)
        if layout is not None:
            setattr(mask, _VARLEN_ATTR, layout)
    return mask


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def packed_rows_layout(mask: torch.Tensor) -> Optional[tuple]:
    """If bool `mask` [B, 1, L, L] lets each token attend exactly to the tokens of its own run of
    consecutive positions (every token real; packed rows), the runs as varlen sequences over the
    B * L flattened tokens: (cu_seqlens int32 [S+1] on mask's device, max_seqlen int); else None.
    Reads the device once (one comparison of the whole mask)."""
    if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4
            or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3] or mask.shape[2] == 0):
        return None
    grid = mask[:, 0]
    batch, length = grid.shape[0], grid.shape[1]
    device = mask.device
    starts = torch.ones(batch, length, dtype=torch.bool, device=device)
    if length > 1:
        pos = torch.arange(1, length, device=device)
        starts[:, 1:] = ~grid[:, pos, pos - 1]   # token i does not see token i-1: a new run
    run = starts.cumsum(-1)
    if not torch.equal(grid, run[:, :, None] == run[:, None, :]):
        return None
    first = torch.nonzero(starts.reshape(-1)).reshape(-1)
    total = torch.tensor([batch * length], device=device, dtype=first.dtype)
    cu_seqlens = torch.cat([first, total]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens, max_seqlen


# ----------------------------------------------------------------------------------------------
# The attention function


def hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                         scaling: Optional[float] = None, dropout: float = 0.0,
                         backend: Optional[str] = None, **kwargs):
    """transformers' attention-interface call on our kernels (see the module docstring).

    query, key, value: [B, H, L, D] (one float dtype); attention_mask: None, a mask from
    :func:`albert_kernels_mask`, or any 4D mask transformers would pass to SDPA. Returns
    (attn_output [B, L, H, D], attn_weights: None, or [B, H, L, L] with output_attentions).
    Raises ValueError for head_mask, for cu_seq_lens keyword arguments beside a mask that is not
    the packed-rows mask of the same sequences, and for output_attentions (argument, else the
    module's config) with cu_seq_lens but no such mask.
    """
    if kwargs.get("head_mask") is not None:
        raise ValueError("head_mask is not supported by attn_implementation='albert_kernels' "
                         "(use attn_implementation='eager')")
    flash_kwargs = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        if flash_kwargs and getattr(attention_mask, _VARLEN_ATTR, None) is None:
            raise ValueError("output_attentions=True with cu_seq_lens_q/cu_seq_lens_k: the "
                             "probabilities need the sequences as an attention_mask (pass "
                             "position_ids, or no cu_seq_lens)")
        return _eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if flash_kwargs:
        return _flash_kwargs_varlen(query, key, value, attention_mask, scaling, dropout, backend,
                                    kwargs)
    kind = _fused_kind(module, query, key, value, attention_mask, kwargs)
    if kind is None or not _backend_runs(backend, query):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kind == "varlen":
        cu_seqlens, max_seqlen = getattr(attention_mask, _VARLEN_ATTR)
        return _varlen(query, key, value, cu_seqlens, max_seqlen, cu_seqlens, max_seqlen, scaling,
                       dropout, backend, check_inputs=False), None
    key_padding_mask = None
    if kind == "padding":
        batch, length = query.shape[0], key.shape[2]
        key_padding_mask = attention_mask[:, 0, 0, :].expand(batch, length).contiguous()
    out = attention(query, key, value, key_padding_mask=key_padding_mask, scale=scaling,
                    dropout_p=dropout, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def _fused_kind(module, query, key, value, attention_mask, kwargs) -> Optional[str]:
    """"none" / "padding" / "varlen" when our kernels compute exactly what transformers' SDPA
    attention would with these arguments; None when the call must go to SDPA."""
    if query.dtype not in _FLOAT_DTYPES or query.dim() != 4:
        return None
    if key.shape != query.shape or value.shape != query.shape:   # GQA, cross-attention, caches
        return None
    if any(kwargs.get(name) is not None for name in _SDPA_ONLY_KWARGS):
        return None
    if attention_mask is None:
        # SDPA is causal when there is no mask and the module says so (missing means causal).
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        return None if (is_causal and query.shape[2] > 1) else "none"
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return None
    if getattr(attention_mask, _VARLEN_ATTR, None) is not None:
        batch, _, length, _ = query.shape
        if tuple(attention_mask.shape) == (batch, 1, length, length):
            return "varlen"
        return None
    if _is_key_padding(attention_mask, query):
        return "padding"
    return None


def _is_key_padding(mask: torch.Tensor, query: torch.Tensor) -> bool:
    """A bool [B or 1, 1 or H, Lq or 1, L] mask whose rows are one per batch entry by layout
    (stride 0 or size 1 over heads and queries): a key padding mask, whatever built it."""
    batch, heads, length, _ = query.shape
    if mask.dtype != torch.bool or mask.shape[-1] != length or mask.shape[0] not in (1, batch):
        return False
    for dim, full in ((1, heads), (2, length)):
        size, stride = mask.shape[dim], mask.stride(dim)
        if not (size == 1 or (size == full and stride == 0)):
            return False
    return True


_WARNED: set = set()


def _backend_runs(backend: Optional[str], query: torch.Tensor) -> bool:
    """Whether the backend takes query's device, dtype and head dim. An explicit backend that
    cannot raises; backend=None falls back to SDPA with a warning (once per reason)."""
    try:
        resolve(backend, query.device, query.dtype, query.shape[-1])
    except (TypeError, ValueError) as exc:
        if backend is not None:
            raise
        reason = str(exc)
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"attn_implementation='albert_kernels': {reason}; this attention runs "
                          "transformers' SDPA instead", stacklevel=3)
        return False
    return True


def _varlen(query, key, value, cu_seqlens_q, max_seqlen_q, cu_seqlens_k, max_seqlen_k, scaling,
            dropout, backend, check_inputs):
    """[B, H, L, D] tensors flattened to B * L tokens, varlen attention, back to [B, L, H, D]."""
    batch, heads, length, head_dim = query.shape
    klen = key.shape[2]
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * klen, heads, head_dim)
    v = value.transpose(1, 2).reshape(batch * klen, heads, value.shape[-1])
    out = varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, cu_seqlens_k=cu_seqlens_k,
                           max_seqlen_k=max_seqlen_k, scale=scaling, dropout_p=dropout,
                           backend=backend, check_inputs=check_inputs)
    return out.reshape(batch, length, heads, out.shape[-1])


def _flash_kwargs_varlen(query, key, value, attention_mask, scaling, dropout, backend, kwargs):
    """cu_seq_lens_q / cu_seq_lens_k (and max_length_q / max_length_k) given: the sequences they
    describe over the flattened B * L tokens, as transformers' flash-attention path reads them.
    A mask beside them must be None or the packed-rows mask of the same sequences."""
    cu_q = kwargs.get("cu_seq_lens_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    cu_q = cu_k if cu_q is None else cu_q
    cu_k = cu_q if cu_k is None else cu_k
    for name, t in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1D integer tensor, got {t!r}")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"cu_seq_lens_q with albert_kernels attention needs as many key heads as "
                         f"query heads, got {key.shape[1]} and {query.shape[1]}")
    same_sequences = cu_k is cu_q
    cu_q = cu_q.to(device=query.device, dtype=torch.int32)
    cu_k = cu_q if same_sequences else cu_k.to(device=query.device, dtype=torch.int32)
    if attention_mask is not None:
        layout = getattr(attention_mask, _VARLEN_ATTR, None)
        same = layout is not None and torch.equal(cu_q, cu_k) and torch.equal(layout[0], cu_q)
        if not same:
            raise ValueError("attention_mask: with cu_seq_lens_q/cu_seq_lens_k the sequences are "
                             "theirs; a mask that says otherwise (padding or any other 4D mask) "
                             "cannot be honoured by attn_implementation='albert_kernels'")
    max_q = kwargs.get("max_length_q")
    max_k = kwargs.get("max_length_k")
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if max_q is None else int(max_q)
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if max_k is None else int(max_k)
    return _varlen(query, key, value, cu_q, max_q, cu_k, max_k, scaling, dropout, backend,
                   check_inputs=True), None


def _eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """output_attentions=True: the model's own eager attention (its module's
    ``eager_attention_forward``, or plain softmax attention when it has none), with a bool mask
    turned into eager's additive one."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    mask = attention_mask
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        param = next(module.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else query.dtype
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        mask = torch.where(mask, zero, torch.finfo(dtype).min)
    if fn is None:
        fn = _plain_eager
    return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _plain_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
