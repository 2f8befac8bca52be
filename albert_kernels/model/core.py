"""The encoder core: one layer loop, fused kernels only where they provably compute what calling
the modules would.

An encoder layer is described by its **parts** (:class:`LayerParts`): the submodules that hold its
weights (query, key, value, the attention output ``dense``, the attention LayerNorm, the FFN's
input and output products, the output LayerNorm) plus the numbers the kernels need (heads, head
dim, scale, dropout, GELU form). A small per-family adapter extracts them from the model's own
modules (:func:`albert_layer_parts` for ALBERT, ours and transformers' alike, which use the same
attribute names); :func:`run_layer` and :func:`run_layers` then run any encoder whose layers are
shared (ALBERT: one module applied at every depth) or not (BERT: one module per depth) the same
way.

The rule (:func:`is_plain`): a fused kernel reads a submodule's ``weight`` and ``bias`` directly
only if calling that submodule would compute exactly ``F.linear`` / ``F.layer_norm`` of them: its
type is exactly ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding``, it has no hooks (its own, or
torch's global module hooks), no instance-level ``forward``, no accelerate ``_hf_hook``, and its
weights are ordinary tensors that are not on the meta device. Every other submodule (a PEFT LoRA
wrapper, a hooked or parametrized module, a module whose weights accelerate's offload hooks load
on call) is **called** as a module at its place in the layer, and the rest of the layer stays
fused: e.g. with a LoRA ``ffn`` the layer runs ``ffn(a)``, GELU, then ``ffn_output`` and the fused
add + LayerNorm. One exception, where it provably computes the same: a PEFT LoRA wrapper whose
call is exactly ``base(x) + scaling * (x @ A^T) @ B^T`` (:func:`lora_adapters`), in an eager call
that records no autograd graph, runs as a plain product on ``W + scaling * B @ A``
(:class:`Merged`, made at most once per forward for a shared layer), so the FFN stays one fused
kernel.

No weight is cached between calls: every forward reads the parameters as they are then. A patched
BERT-family encoder keeps its layer parts (which modules, which of them plain) between calls while
:func:`module_state` is unchanged, a check of every module that costs less than extracting them
again. The packed weights of the cpp backend's small-M path are an explicit opt-in
(``albert_kernels.freeze``, :class:`Frozen`), never the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals

from ..backends import autocast
from .quantized import QuantizedLinear

_PLAIN_TYPES = (nn.Linear, nn.LayerNorm, nn.Embedding)
_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def global_hooks() -> bool:
    """True when torch's global module hooks (``nn.modules.module.register_module_forward_hook``
    and its siblings) are registered: they fire on every module call, so no module may be
    skipped."""
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def _transformers_capture_hook(hook) -> bool:
    """transformers 5's output-capturing hook (installed on its layer and attention modules by
    ``capture_outputs``): inactive unless a collector is active, and then the encoder records the
    same values itself (``outputs.Recorder``)."""
    return (getattr(hook, "__module__", "") == "transformers.utils.output_capturing"
            and getattr(hook, "__name__", "") == "output_capturing_hook")


def user_hooks(module: nn.Module, ignore_transformers_capture: bool = False) -> bool:
    """True if `module` has forward, forward-pre or backward hooks or a forward set on the
    instance. transformers' own output-capturing hooks count only without
    `ignore_transformers_capture`. (Global hooks: :func:`global_hooks`.)"""
    if "forward" in module.__dict__:
        return True
    if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    hooks = module._forward_hooks
    if not hooks:
        return False
    if not ignore_transformers_capture:
        return True
    return not all(_transformers_capture_hook(h) for h in hooks.values())


def has_hooks(module: nn.Module, ignore_transformers_capture: bool = False) -> bool:
    """True if calling `module` does more than its class's forward: :func:`user_hooks`, torch's
    global module hooks, or an accelerate hook (``_hf_hook``, set on the instance: device
    placement, offloading)."""
    return (global_hooks() or "_hf_hook" in module.__dict__
            or user_hooks(module, ignore_transformers_capture))


# Plain attributes the layer adapters read when they build the parts (``LayerParts`` keeps
# their values): a change to one must build the parts again. Attention: its head count and size,
# softmax scale, decoder / cross-attention flags, activation functions kept as plain attributes;
# LayerNorm: eps and shape (read at every call too, listed for the frozen copy's check); a
# dropout's probability.
_PARTS_ATTRIBUTES = ("num_attention_heads", "attention_head_size", "all_head_size", "n_heads",
                     "dim", "scaling", "is_decoder", "is_cross_attention", "is_causal",
                     "position_embedding_type", "intermediate_act_fn", "activation", "eps",
                     "normalized_shape", "approximate", "p")


def module_state(root: nn.Module) -> Optional[list]:
    """One pass over `root` and its submodules: None when one of them has hooks
    (:func:`user_hooks`, transformers' output capturing aside) or torch's global module hooks
    are set; else a key of what decides the layer parts: per module its identity, class and
    training flag, its parameters' identities, and the values of the plain attributes in
    :data:`_PARTS_ATTRIBUTES` it has (head counts, softmax scale, LayerNorm eps, dropout
    probability, ...). Equal keys (while the modules and parameters of the first are kept alive,
    so identities are not reused: :class:`StepsCache`) mean equal layer parts."""
    if global_hooks():
        return None
    key, stack = [], [root]
    append, extend, push, pop = key.append, key.extend, stack.extend, stack.pop
    while stack:
        m = pop()
        if m is None:
            continue
        if user_hooks(m, True):
            return None
        d = m.__dict__
        append(id(m))
        append(type(m))
        append(d["training"])
        for attr in _PARTS_ATTRIBUTES:
            if attr in d:
                append(d[attr])
        params = d["_parameters"]
        if params:
            extend(map(id, params.values()))
        push(d["_modules"].values())
    return key


class StepsCache:
    """An encoder's layer schedule (``steps``) kept between calls while :func:`module_state`
    returns the same ``key``; ``refs`` keeps the modules and parameters the key names alive.
    Copies and pickles as None."""

    __slots__ = ("key", "steps", "refs")

    def __init__(self, key: list, steps, root: nn.Module) -> None:
        self.key, self.steps = key, steps
        self.refs = [*root.modules(), *root.parameters()]

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_none, ())


def _plain_tensor(t: Optional[torch.Tensor]) -> bool:
    """An ordinary tensor or Parameter (not a subclass), not on the meta device."""
    return t is not None and type(t) in _PLAIN_TENSORS and not t.is_meta


def is_plain(module: Optional[nn.Module]) -> bool:
    """True if a fused kernel may read `module`'s weight and bias instead of calling it: exactly
    an ``nn.Linear`` (with a bias), ``nn.LayerNorm`` (affine, with a bias) or ``nn.Embedding``;
    no hooks of any kind (see :func:`has_hooks`); weight and bias plain tensors (not a tensor
    subclass, not on the meta device). Parametrized modules have another type and are not plain."""
    if module is None or type(module) not in _PLAIN_TYPES or has_hooks(module):
        return False
    params = module.__dict__["_parameters"]
    if not _plain_tensor(params.get("weight")):
        return False
    return type(module) is nn.Embedding or _plain_tensor(params.get("bias"))


def encoder_hooked(encoder: nn.Module) -> bool:
    """Hooks anywhere in `encoder` that would see the core's token-major tensors (transformers'
    output capturing aside), or torch's global module hooks: then transformers' own forward
    runs."""
    return global_hooks() or any(user_hooks(m, True) for m in encoder.modules())


def bare(module: nn.Module, expected_type: type, ignore_transformers_capture: bool = False) -> bool:
    """True if `module` is exactly of `expected_type` and calling it runs nothing but that
    class's forward (no hooks, see :func:`has_hooks`): then the core may run its computation
    without calling it."""
    return type(module) is expected_type and not has_hooks(module, ignore_transformers_capture)


def linear(module: nn.Module, x: torch.Tensor, plain: bool) -> torch.Tensor:
    """``module(x)``: ``F.linear`` on its weights when `plain` (:func:`is_plain`), else a call."""
    return F.linear(x, module.weight, module.bias) if plain else module(x)


# ------------------------------------------------------------------------------------- LoRA
_MERGE_DTYPES = (torch.float32, torch.float64)


def _bare_linear(module: nn.Module, bias: bool) -> bool:
    """Exactly an ``nn.Linear`` without hooks whose weight (and bias if `bias`, else none) are
    plain tensors off the meta device."""
    if not bare(module, nn.Linear):
        return False
    params = module.__dict__["_parameters"]
    if not _plain_tensor(params.get("weight")):
        return False
    return _plain_tensor(params.get("bias")) if bias else params.get("bias") is None


def lora_adapters(module: nn.Module) -> Optional[list]:
    """The adapters calling `module` adds to its base ``nn.Linear``, as ``(A, B, scaling)``
    (weights [r, in] and [out, r]: ``base(x) + scaling * (x @ A^T) @ B^T`` each), if `module` is
    a PEFT ``lora.Linear`` whose call computes exactly that and nothing else; else None.

    Exactly PEFT's ``peft.tuners.lora.layer.Linear`` (no subclass: quantized and other
    variants differ), no hooks on it or its parts, adapters enabled and not merged into the
    base weight, every active adapter present a vanilla one (no DoRA or other LoRA variant, no
    bias on ``lora_B``), its dropout an ``nn.Identity`` or an ``nn.Dropout`` that is inactive
    (eval mode or p = 0), base and adapter weights plain fp32 / fp64 tensors of one dtype."""
    cls = type(module)
    if cls.__name__ != "Linear" or cls.__module__ != "peft.tuners.lora.layer":
        return None
    if has_hooks(module) or module.disable_adapters or module.merged \
            or not is_plain(module.base_layer):
        return None
    dtype = module.base_layer.weight.dtype
    if dtype not in _MERGE_DTYPES:
        return None
    out = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue  # PEFT skips an active adapter this layer does not have
        if name in getattr(module, "lora_variant", {}) or \
                getattr(module, "use_dora", {}).get(name, False):
            return None
        a, b, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        if not (_bare_linear(a, False) and _bare_linear(b, False)):
            return None
        if a.weight.dtype != dtype or b.weight.dtype != dtype:
            return None
        if has_hooks(drop) or not (type(drop) is nn.Identity or (
                type(drop) is nn.Dropout and (not drop.training or drop.p == 0))):
            return None
        out.append((a.weight, b.weight, float(module.scaling[name])))
    return out


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


class Merged:
    """A LoRA wrapper's base weight with its adapters added, ``W + sum(scaling * B @ A)``, for
    calls that record no autograd graph, computed at most once per forward for a layer applied
    many times (ALBERT's shared layer) and recomputed when a tensor it was made from changes
    (another tensor, or a version bump: :meth:`valid`)."""

    __slots__ = ("weight", "bias", "sources")

    def __init__(self, base: nn.Linear, adapters: list) -> None:
        w = base.weight
        for a, b, scaling in adapters:
            w = torch.addmm(w, b, a, alpha=scaling)
        self.weight, self.bias = w, base.bias
        self.sources = self._sources(base, adapters)

    @staticmethod
    def _sources(base: nn.Linear, adapters: list) -> tuple:
        ts = [base.weight, base.bias] + [t for a, b, _ in adapters for t in (a, b)]
        return tuple((id(t), t.data_ptr(), _version(t)) for t in ts) + tuple(
            s for _, _, s in adapters)

    def valid(self, base: nn.Linear, adapters: list) -> bool:
        return self._sources(base, adapters) == self.sources


@dataclass(slots=True)
class LayerParts:
    """One encoder layer (post-LN, as ALBERT and BERT):
    ``a = norm1(h + dropout(dense(attention(query(h), key(h), value(h)))))``,
    ``out = norm2(a + ffn_dropout(ffn_out(act(ffn_in(a)))))``.

    The modules are the model's own; ``plain`` holds :func:`is_plain` of each, by field name,
    taken when the parts are extracted (once per forward). ``attention_module``: the attention
    submodule to call as a module instead of running the attention block here (it has hooks), or
    None. ``training``: the layer's mode (attention dropout). ``act``: GELU of the form
    ``approximate`` when ``activation`` is None, else ``activation`` (a module) is called.
    ``ffn_dropout``: a dropout module applied to the FFN's output before the residual add (BERT
    has one, ALBERT not), or None."""
    query: nn.Module
    key: nn.Module
    value: nn.Module
    dense: nn.Module
    norm1: nn.Module
    ffn_in: nn.Module
    ffn_out: nn.Module
    norm2: nn.Module
    output_dropout: Optional[nn.Module]
    num_heads: int
    head_dim: int
    scale: float
    attention_dropout_p: float
    approximate: str
    training: bool
    plain: dict
    attention_module: Optional[nn.Module] = None
    activation: Optional[nn.Module] = None
    ffn_dropout: Optional[nn.Module] = None
    merged: dict = field(default_factory=dict)

    @classmethod
    def make(cls, **fields) -> "LayerParts":
        plain = {name: is_plain(fields[name]) for name in
                 ("query", "key", "value", "dense", "norm1", "ffn_in", "ffn_out", "norm2")}
        return cls(plain=plain, **fields)

    def all_plain(self) -> bool:
        return (self.attention_module is None and self.activation is None
                and self.ffn_dropout is None and self.output_dropout is None
                and all(self.plain.values()))

    def weights(self, name: str) -> Optional[tuple]:
        """(weight, bias) of the product `name` ("query", ..., "ffn_out") that a fused kernel
        may use in place of calling the module: a plain module's own; for a LoRA wrapper
        (:func:`lora_adapters`) in an eager call that records no autograd graph, its :class:`Merged`
        weight (kept in ``merged`` for the other applications of this layer in this forward,
        while valid). None: call the module."""
        module = getattr(self, name)
        if self.plain[name]:
            return module.weight, module.bias
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        adapters = lora_adapters(module)
        if adapters is None:
            return None
        merged = self.merged.get(name)
        if merged is None or not merged.valid(module.base_layer, adapters):
            merged = self.merged[name] = Merged(module.base_layer, adapters)
        return merged.weight, merged.bias

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The product `name` of x: ``F.linear`` on :meth:`weights`, else a call of the module."""
        w = self.weights(name)
        return F.linear(x, *w) if w is not None else getattr(self, name)(x)


def add_norm(norm: nn.Module, plain: bool, x: torch.Tensor, residual: torch.Tensor,
             kernels) -> torch.Tensor:
    """``norm(x + residual)``: the backend's fused add + LayerNorm when `norm` is plain."""
    if plain:
        return kernels.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    return norm(x + residual)


def attention_block(p: LayerParts, h: torch.Tensor, plan) -> torch.Tensor:
    """``norm1(h + dropout(dense(attention(...))))`` for tokens h [N, hidden] with the plan's
    attention (``layers.AttentionPlan``)."""
    pl = p.plain
    heads = lambda t: t.view(t.shape[0], p.num_heads, p.head_dim)
    # Under autocast each F.linear would cast h to the autocast dtype again (autocast caches
    # parameter casts only): cast it once for the three products (the same values, and the
    # same autograd graph up to the shared cast).
    x = autocast.activation(h) if pl["query"] and pl["key"] and pl["value"] else h
    q = heads(p.linear("query", x))
    k = heads(p.linear("key", x))
    v = heads(p.linear("value", x))
    # attention dropout in training, inside the fused attention (Philox, every backend)
    dropout_p = p.attention_dropout_p if p.training else 0.0
    ctx = plan.attend(q, k, v, p.scale, dropout_p).reshape(h.shape[0], -1)
    out = p.linear("dense", ctx)
    if p.output_dropout is not None:
        out = p.output_dropout(out)
    return add_norm(p.norm1, pl["norm1"], out, h, plan.kernels)


def ffn_block(p: LayerParts, a: torch.Tensor, plan) -> torch.Tensor:
    """``norm2(a + ffn_dropout(ffn_out(act(ffn_in(a)))))``: one fused kernel when both products
    have weights a kernel may use (:meth:`LayerParts.weights`) and the activation is GELU, the
    fused product + GELU when only ``ffn_in`` has, else the calls (an ``activation`` module is
    always called). An int8 ``ffn_in`` (``quantized.QuantizedLinear``, no hooks) applies GELU
    in its own epilogue."""
    pl, kernels = p.plain, plan.kernels
    if p.activation is not None:
        f = p.linear("ffn_out", p.activation(p.linear("ffn_in", a)))
    else:
        w_in, w_out = p.weights("ffn_in"), p.weights("ffn_out")
        if w_in is not None and w_out is not None:
            f = kernels.gelu_ffn(a, *w_in, *w_out, p.approximate)
        else:
            if w_in is not None:
                x = kernels.linear_gelu(a, *w_in, p.approximate)
            elif bare(p.ffn_in, QuantizedLinear):
                x = p.ffn_in.linear_gelu(a, p.approximate)   # GELU in the int8 product's epilogue
            else:
                x = F.gelu(p.ffn_in(a), approximate=p.approximate)
            f = F.linear(x, *w_out) if w_out is not None else p.ffn_out(x)
    if p.ffn_dropout is not None:
        f = p.ffn_dropout(f)
    return add_norm(p.norm2, pl["norm2"], f, a, kernels)


def run_layer(p: LayerParts, h: torch.Tensor, plan) -> torch.Tensor:
    """One layer on tokens h [N, hidden] -> [N, hidden]."""
    if p.attention_module is not None:
        a = p.attention_module(h, plan)
    else:
        a = attention_block(p, h, plan)
    return ffn_block(p, a, plan)


@dataclass(slots=True)
class Step:
    """One application of a layer in the encoder's schedule. ``parts``: run by the core; None:
    ``module`` is called instead (``module(h, plan)``; a group with ``records_itself``:
    ``module(h, plan, recorder)``, it records its layers' outputs). ``key``: the layer's identity
    (a shared layer's steps share it; the frozen weights are found by it). ``group_end``: the last
    layer of a layer group (transformers 4 records hidden states per group)."""
    key: int
    parts: Optional[LayerParts]
    module: Optional[nn.Module] = None
    group_end: bool = True
    records_itself: bool = False


def run_layers(steps: Sequence[Step], h: torch.Tensor, plan, recorder=None,
               frozen=None) -> torch.Tensor:
    """The one layer loop: every step on tokens h [N, hidden]. `recorder` (``outputs.Recorder``,
    only when hidden states are asked for) records every layer's output; `frozen`: the cpp
    backend's frozen copy (``Frozen.run``), used for every step (only when
    :func:`frozen_for_call` returned it). Under autocast, parameter casts are made once for the
    whole loop (``autocast.cast_cache``), not once per layer application. LoRA weights merged
    for this call (:class:`Merged`) are dropped when the loop returns: layer parts may be kept
    between calls, and a merged weight must never outlive the forward that made it (a write
    through ``.data`` between calls is not recorded by any version counter)."""
    try:
        if torch.is_autocast_enabled(h.device.type):
            with autocast.cast_cache():
                return _run_steps(steps, h, plan, recorder, frozen)
        return _run_steps(steps, h, plan, recorder, frozen)
    finally:
        for step in steps:
            if step.parts is not None and step.parts.merged:
                step.parts.merged.clear()


def _run_steps(steps, h, plan, recorder, frozen):
    for step in steps:
        if frozen is not None:
            h = frozen.layer(step.key, h, plan)
        elif step.parts is not None:
            h = run_layer(step.parts, h, plan)
        elif step.records_itself:
            h = step.module(h, plan, recorder)
            continue
        else:
            h = step.module(h, plan)
        if recorder is not None:
            h = recorder.hidden(h, group_end=step.group_end)
    return h


# ------------------------------------------------------------------------------------ ALBERT
def attention_scale(att: nn.Module) -> float:
    """The softmax scale of an attention module: its ``scaling`` (transformers 5, ours), else
    ``attention_head_size ** -0.5`` (transformers 4 divides the scores by sqrt(head size))."""
    scaling = getattr(att, "scaling", None)
    return float(scaling) if scaling is not None else att.attention_head_size ** -0.5


def albert_layer_parts(layer: nn.Module, approximate: str,
                       attention_type: Optional[type] = None) -> LayerParts:
    """The parts of an ALBERT layer, ours (``layers.AlbertLayer``) or transformers'
    (``modeling_albert.AlbertLayer``): both name their submodules and attributes alike.
    `attention_type`: the attention class the core may run without calling it; an attention
    module of another type, or with hooks, is called (``attention_module``)."""
    att = layer.attention
    call = None if attention_type is None or bare(att, attention_type, True) else att
    return LayerParts.make(
        query=att.query, key=att.key, value=att.value, dense=att.dense, norm1=att.LayerNorm,
        ffn_in=layer.ffn, ffn_out=layer.ffn_output, norm2=layer.full_layer_layer_norm,
        output_dropout=(att.output_dropout if att.training or has_hooks(att.output_dropout)
                        else None),
        num_heads=att.num_attention_heads, head_dim=att.attention_head_size,
        scale=attention_scale(att),
        attention_dropout_p=att.attention_dropout.p, approximate=approximate,
        training=layer.training, attention_module=call)


def albert_steps(groups: Sequence[nn.Module], num_layers: int, num_groups: int,
                 approximate: str, types: tuple, call_hooked: bool) -> Optional[list]:
    """The :class:`Step` list of an ALBERT encoder: its layer groups applied ``num_layers``
    times, group ``int(i / (num_layers / num_groups))`` at depth i, each group's layers in order
    (a shared layer's parts are extracted once). `types`: (group, layer, attention) classes the
    core may run without calling them. A group, layer or attention module of another type or
    with hooks: with `call_hooked`, called as a module at its place (its hooks fire once per
    application, with the module's own arguments); without, None is returned (the caller then
    runs the model's own forward)."""
    group_type, layer_type, attention_type = types
    parts_of: dict = {}
    group_steps: dict = {}  # a group applied at several depths is laid out once
    steps = []
    for i in range(num_layers):
        group = groups[int(i / (num_layers / num_groups))]
        laid_out = group_steps.get(id(group))
        if laid_out is None:
            if not bare(group, group_type, True):
                if not call_hooked:
                    return None
                laid_out = [Step(id(group), None, group, records_itself=True)]
            else:
                laid_out, layers = [], group.albert_layers
                for j, layer in enumerate(layers):
                    key = id(layer)
                    if key not in parts_of:
                        parts = None
                        if bare(layer, layer_type, True):
                            parts = albert_layer_parts(layer, approximate, attention_type)
                        if (parts is None or parts.attention_module is not None) \
                                and not call_hooked:
                            return None
                        parts_of[key] = parts
                    laid_out.append(Step(key, parts_of[key], layer,
                                         group_end=j == len(layers) - 1))
            group_steps[id(group)] = laid_out
        steps += laid_out
    return steps


# ----------------------------------------------------------------------------- frozen weights
class Frozen:
    """The opt-in packed weights of one encoder (``albert_kernels.freeze``): ``run``, the
    backend's frozen copy (what ``Kernels.freeze_encoder`` returns: ``usable(x, plan)``,
    ``mapping_in(x)``, ``layer(key, h, plan)``; ``backends/cpp/frozen.py``), the modules it was
    made from, their :func:`weight_signature` and the :func:`layer_settings` it was packed with.
    Copies and pickles as None (a copy's parameters are new tensors)."""

    __slots__ = ("run", "modules", "signature", "settings")

    def __init__(self, run, modules: tuple, signature: tuple, settings: tuple) -> None:
        self.run, self.modules, self.signature = run, modules, signature
        self.settings = settings

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_none, ())


def _none() -> None:
    return None


def _distinct_layers(steps: Sequence[Step]):
    """(key, parts) of each distinct layer of `steps` (a shared layer once), in order."""
    seen = set()
    for step in steps:
        if step.key not in seen:
            seen.add(step.key)
            yield step.key, step.parts


def frozen_modules(mapping: Optional[nn.Module], steps: Sequence[Step]) -> tuple:
    """The modules a frozen copy reads, in a fixed order: the input mapping (None for an encoder
    without one, e.g. BERT's), then per distinct layer (by key) its eight weight-holding parts.
    Every step must have parts."""
    out = [mapping]
    for _, p in _distinct_layers(steps):
        out += [p.query, p.key, p.value, p.dense, p.norm1, p.ffn_in, p.ffn_out, p.norm2]
    return tuple(out)


def weight_signature(modules: Sequence[nn.Module]) -> tuple:
    """(module identity, then each parameter's identity, data_ptr and version) for `modules`:
    what a frozen copy was made from. An inference tensor has no version counter (-1)."""
    out = []
    for m in modules:
        out.append(id(m))
        if m is None:
            continue
        for p in m.__dict__["_parameters"].values():
            if p is not None:
                out.append((id(p), p.data_ptr(), -1 if p.is_inference() else p._version))
    return tuple(out)


def layer_settings(steps: Sequence[Step]) -> tuple:
    """Per distinct layer, the numbers a frozen copy bakes in besides the weights: head count and
    size, softmax scale, GELU form, and both LayerNorms' eps (read from the modules now)."""
    return tuple((key, p.num_heads, p.head_dim, p.scale, p.approximate,
                  getattr(p.norm1, "eps", None), getattr(p.norm2, "eps", None))
                 for key, p in _distinct_layers(steps) if p is not None)


def frozen_for_call(encoder: nn.Module, mapping: Optional[nn.Module], steps: Sequence[Step],
                    x: torch.Tensor, plan):
    """The encoder's frozen copy (``Frozen.run``) if this call may run on it, else None: it was
    frozen, the input mapping (None: the encoder has none) and every part are still plain (a hook or wrapper added since is honoured by running the
    modules), the call needs no autograd graph and is eval-mode inference the backend's frozen
    path takes (``run.usable``). RuntimeError if the weights were detectably changed since
    ``freeze`` (a new tensor, an in-place update that bumps the version, another module) or a
    setting it baked in changed (:func:`layer_settings`)."""
    state = encoder.__dict__.get("_frozen")
    if state is None or encoder.training or torch.jit.is_tracing():
        return None
    if (mapping is not None and not is_plain(mapping)) or any(
            s.parts is None or not s.parts.all_plain() for s in steps):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in encoder.parameters())):
        return None
    if not state.run.usable(x, plan):
        return None
    if frozen_modules(mapping, steps) != state.modules or \
            weight_signature(state.modules) != state.signature:
        raise RuntimeError(
            "the encoder's weights changed since albert_kernels.freeze(model): call freeze(model) "
            "again after changing frozen weights, or albert_kernels.unfreeze(model)")
    if layer_settings(steps) != state.settings:
        raise RuntimeError(
            "a layer setting the frozen copy was packed with changed since "
            "albert_kernels.freeze(model) (a LayerNorm's eps, the attention's head count or "
            "softmax scale, the GELU form): call freeze(model) again, or "
            "albert_kernels.unfreeze(model)")
    return state.run


def freeze_steps(encoder: nn.Module, mapping: Optional[nn.Module], steps: Optional[Sequence[Step]],
                 kernels, names: dict) -> None:
    """Pack an encoder's weights for the backend's frozen path (``albert_kernels.freeze``) and
    keep them on `encoder` (``_frozen``): `mapping`, its input ``nn.Linear`` or None; `steps`,
    its layer schedule (None: a layer the core cannot run). A shared layer is packed once, each
    unshared layer once. `names`: module id -> name, for the errors. ValueError naming the first
    module the frozen path cannot compute exactly: one that is not plain (:func:`is_plain`),
    called as a module (hooks, another class), an active dropout, or an activation that is not
    GELU (erf or tanh form, as ``F.gelu``)."""
    name = lambda m: f"{names.get(id(m), type(m).__name__)} ({type(m).__name__})"
    problem = None
    if mapping is not None and not is_plain(mapping):
        problem = f"{name(mapping)} is not a plain module"
    elif steps is None:
        problem = (f"a layer of {name(encoder)} is not its model's own layer class (or is "
                   "configured for cross-attention)")
    layers = {}
    for step in steps or ():
        if problem is not None:
            break
        p = step.parts
        if p is None or p.attention_module is not None:
            problem = f"{name(step.module if p is None else p.attention_module)} has hooks"
        elif p.activation is not None:
            problem = (f"{name(p.activation)} is not GELU as F.gelu computes it (the frozen "
                       "kernel has erf GELU, hidden_act 'gelu', and tanh GELU, "
                       "'gelu_pytorch_tanh'), so freezing would change the model's numbers")
        elif p.output_dropout is not None or p.ffn_dropout is not None:
            problem = (f"{name(p.output_dropout or p.ffn_dropout)} is a dropout that is active "
                       "or has hooks")
        else:
            culprit = next((getattr(p, f) for f, ok in p.plain.items() if not ok), None)
            if culprit is not None:
                problem = f"{name(culprit)} is not a plain module"
        layers[step.key] = p
    if problem is not None:
        raise ValueError(
            f"freeze: {problem}: the frozen path would not compute what calling the modules "
            "computes (it needs plain nn.Linear / nn.LayerNorm modules with their weights, no "
            "hooks, wrappers or offloading, and GELU). Merge adapters (PEFT: merge_and_unload()) "
            "or remove the hooks first, or run unfrozen")
    modules = frozen_modules(mapping, steps)
    run = kernels.freeze_encoder(mapping, layers)
    encoder._frozen = Frozen(run, modules, weight_signature(modules), layer_settings(steps))
