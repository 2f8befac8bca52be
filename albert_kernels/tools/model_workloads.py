"""Model benchmark workloads: ALBERT forward (or a training step) on a padded batch, ours against
transformers (eager, sdpa, torch.compile) on the same weights and inputs, and the GEMM floor;
optionally with dropout (hidden and attention, every contender) and under ``torch.autocast``."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..model import AlbertConfig, AlbertForPreTraining, AlbertModel
from ..model.config import PRESETS
from ..model.layers import freeze
from .accuracy import OutputCheck
from .timing import GEMM_CEILING_MAX
from .workloads import Rebuild, Workload, ours_backends, padding_mask, realistic_lengths

GEMM_FLOOR = "GEMM floor (encoder GEMMs on real tokens)"


def model_inputs(cfg: AlbertConfig, batch: int, seqlen: int, padding: str, device):
    """[ids, attention_mask, MLM labels, SOP labels] of one padded batch, and its real tokens."""
    lengths = realistic_lengths(batch, seqlen, padding)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, cfg.vocab_size, (batch, seqlen), generator=gen)
    mask = padding_mask(lengths, seqlen, "cpu").long()
    ids = ids * mask  # pad id 0 at padded positions
    labels = torch.where((torch.rand(ids.shape, generator=gen) < 0.15) & (mask == 1), ids, -100)
    sop = torch.randint(0, 2, (batch,), generator=gen)
    return [t.to(device) for t in (ids, mask, labels, sop)], int(lengths.sum())


def _transformers():
    """transformers with its ALBERT modules loaded (None if not installed). Loading them here, not
    lazily at the first model, puts their import in every process that builds these workloads,
    the memory baseline's included."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.AlbertModel, transformers.AlbertForPreTraining   # noqa: B018 (lazy imports)
    return transformers


def _hf_model(transformers, cfg: AlbertConfig, impl: str, mode: str, dtype, device):
    """A transformers model with our config. Seed 0: every attention implementation gets the same
    weights (transformers initialises them in the same order whatever `impl`)."""
    cls = transformers.AlbertForPreTraining if mode == "train" else transformers.AlbertModel
    torch.manual_seed(0)
    model = cls(cfg.to_hf(attn_implementation=impl))
    return model.to(device=device, dtype=dtype).train(mode == "train")


def _ours_model(cfg: AlbertConfig, mode: str, backend: str, hf_sdpa, dtype, device):
    """Our model on `backend`: with transformers' weights when there is a transformers model."""
    cls = AlbertForPreTraining if mode == "train" else AlbertModel
    if hf_sdpa is not None:
        model = cls.from_hf(hf_sdpa, backend=backend)
    else:
        torch.manual_seed(0)
        model = cls(cfg, backend=backend)
    model = model.to(device=device, dtype=dtype).train(mode == "train")
    weight = next(model.parameters())
    if mode != "train" and backend == "cpp" and weight.device.type == "cpu" and \
            weight.dtype == torch.float32:
        freeze(model)  # inference on the frozen weights, as ``bench --latency`` and the README
    return model


AUTOCAST_DTYPES = ("bfloat16", "float16")


def _autocast(device, dtype: Optional[torch.dtype]):
    """A fresh ``torch.autocast`` context for `device`'s type in `dtype`, or a no-op (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _step(model, batch, mode: str, hf: bool, autocast: Optional[torch.dtype] = None,
          device="cpu"):
    """One call: inference forward, or forward + backward of the MLM + SOP loss (the whole call,
    backward included, under ``torch.autocast(device type, autocast)`` when `autocast` is a
    dtype). Returns the model's output (the checks read it; timing ignores it)."""
    ids, mask, labels, sop = batch
    if mode == "forward":
        def run():
            with torch.inference_mode(), _autocast(device, autocast):
                return model(ids, attention_mask=mask) if hf else model(ids, mask)
        return run

    def train():
        model.zero_grad(set_to_none=True)
        with _autocast(device, autocast):
            out = model(ids, attention_mask=mask, labels=labels, sentence_order_label=sop) if hf \
                else model(ids, mask, labels=labels, sentence_order_label=sop)
            out.loss.backward()
        return out
    return train


def gemm_floor(cfg: AlbertConfig, tokens: int, mode: str, dtype, device, group: str) -> Workload:
    """The encoder's matrix products alone on the real tokens (the floor: they can't be skipped).

    Counts the embedding projection and, per layer application, Q, K, V, the attention output,
    ffn and ffn_output (forward; plus both gradient GEMMs of each in training). The attention
    score products add ~2% at L=128 and are left out; so is the MLM head.
    """
    E, H, I = cfg.embedding_size, cfg.hidden_size, cfg.intermediate_size
    mk = lambda *shape: (torch.randn(*shape, device=device) * 0.02).to(dtype)
    acts = {n: mk(tokens, n) for n in (E, H, I)}          # layer inputs, by width
    grads = {n: mk(tokens, n) for n in (H, I)}            # upstream gradients, by width
    layer = [(H, H)] * 4 + [(I, H), (H, I)]               # (out, in): Q, K, V, dense, ffn, ffn_output
    seq = [(H, E)] + layer * (cfg.num_hidden_layers * cfg.inner_group_num)
    weights = {shape: mk(*shape) for shape in set(seq)}

    def run():
        with torch.inference_mode():
            for out_f, in_f in seq:
                w = weights[(out_f, in_f)]
                F.linear(acts[in_f], w)
                if mode == "train":
                    torch.matmul(grads[out_f], w)                 # grad of the input
                    torch.matmul(grads[out_f].t(), acts[in_f])    # grad of the weight
    return Workload(group, GEMM_FLOOR, run, tokens, "tokens/s", ceiling=True,
                    ceiling_max=GEMM_CEILING_MAX)


def model_workloads(preset: str, batch: int, seqlen: int, padding: str, mode: str,
                    dtype: Union[torch.dtype, str], device, compile_baseline: bool = True,
                    only: Optional[Sequence[str]] = None, dropout: float = 0.0,
                    autocast: Optional[str] = None) -> list[Workload]:
    """One batch through ALBERT `preset` (inference forward, or an MLM + SOP training step): the
    GEMM floor, transformers eager and sdpa (the baseline) and torch.compile of it, ours on each
    backend, and in forward mode torch.compile of ours; same inputs and weights for all.

    dtype: a torch dtype or its name ("float32"): the parameters'. only: build just the workloads
    with these names (in this order); an empty list builds the inputs and nothing else. Every
    workload returned carries the `Rebuild` that builds it alone in a fresh process.

    Forward workloads (not the GEMM floor) carry a `check` (tools/accuracy.py OutputCheck): the
    float64 transformers output on the same weights and inputs their error is measured against.

    dropout: probability in [0, 1) set as both ``hidden_dropout_prob`` and
    ``attention_probs_dropout_prob`` of every contender's config (transformers' and ours; the v2
    presets have 0). It acts in train mode only (forward mode is inference). autocast: None or
    "bfloat16" / "float16": every contender's call (forward, or the whole training step) runs
    under ``torch.autocast(device type, that dtype)``, and the GEMM floor runs its products in
    that dtype. Both are named in the group. ValueError for a value outside these.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if mode not in ("forward", "train"):
        raise ValueError(f"mode must be 'forward' or 'train', got {mode!r}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must be a torch dtype or its name, e.g. 'float32', got {dtype!r}")
        dtype = getattr(torch, dtype)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None or one of {AUTOCAST_DTYPES}, got {autocast!r}")
    cfg = AlbertConfig.preset(preset, hidden_dropout_prob=float(dropout),
                              attention_probs_dropout_prob=float(dropout))
    batch_tensors, tokens = model_inputs(cfg, batch, seqlen, padding, device)
    group = (f"ALBERT-{preset} {mode} B{batch} L{seqlen} padding={padding} "
             f"{str(dtype).replace('torch.', '')}" + (f" dropout={dropout:g}" if dropout else "")
             + (f" autocast={autocast}" if autocast else "") + f" ({tokens} real tokens)")
    builders = _builders(cfg, batch_tensors, tokens, group, mode, dtype, device, compile_baseline,
                         getattr(torch, autocast) if autocast else None)
    names = list(builders) if only is None else list(only)
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"only must name workloads of {list(builders)}, got {unknown}")
    rebuild = dict(preset=preset, batch=batch, seqlen=seqlen, padding=padding, mode=mode,
                   dtype=str(dtype).replace("torch.", ""), device=str(device),
                   compile_baseline=compile_baseline, dropout=dropout, autocast=autocast)
    check = None
    if mode == "forward" and _transformers() is not None:
        check = OutputCheck(lambda: _gold_output(cfg, batch_tensors, device),
                            batch_tensors[1], getattr(torch, autocast) if autocast else dtype)
    out = []
    for name in names:
        w = builders[name]()
        w.rebuild = Rebuild(f"{__name__}:model_workloads", rebuild)
        if not w.ceiling:
            w.check = check
        out.append(w)
    return out


def _gold_output(cfg: AlbertConfig, batch_tensors, device) -> torch.Tensor:
    """last_hidden_state of transformers' AlbertModel in float64 (eager attention), built as the
    contenders' (seed 0, float32) then upcast: the same weights, before any rounding to a lower
    dtype."""
    model = _hf_model(_transformers(), cfg, "eager", "forward", torch.float64, device)
    ids, mask = batch_tensors[:2]
    with torch.inference_mode():
        return model(ids, attention_mask=mask).last_hidden_state


def _builders(cfg: AlbertConfig, batch_tensors, tokens: int, group: str, mode: str, dtype, device,
              compile_baseline: bool, autocast: Optional[torch.dtype] = None
              ) -> dict[str, Callable[[], Workload]]:
    """Workload name -> function that builds it. A model is built when a workload first needs it
    (ours copies transformers sdpa's weights) and shared by the workloads built after. Every
    model call runs under ``torch.autocast`` in `autocast` (None: not); the GEMM floor then
    multiplies in that dtype."""
    transformers = _transformers()
    models: dict[str, torch.nn.Module] = {}

    def hf(impl: str):
        if impl not in models:
            models[impl] = _hf_model(transformers, cfg, impl, mode, dtype, device)
        return models[impl]

    def ours(backend: str):
        key = f"ours ({backend})"
        if key not in models:
            source = hf("sdpa") if transformers else None
            models[key] = _ours_model(cfg, mode, backend, source, dtype, device)
        return models[key]

    def workload(name: str, model, is_hf: bool, baseline: bool = False):
        return lambda: Workload(group, name, _step(model(), batch_tensors, mode, is_hf, autocast,
                                                   device), tokens, "tokens/s", baseline=baseline)

    compiled = lambda make: lambda: torch.compile(make(), dynamic=False)
    out = {GEMM_FLOOR: lambda: gemm_floor(cfg, tokens, mode, autocast or dtype, device, group)}
    if transformers:
        out["transformers eager"] = workload("transformers eager", lambda: hf("eager"), True)
        out["transformers sdpa"] = workload("transformers sdpa", lambda: hf("sdpa"), True,
                                            baseline=True)
        if compile_baseline:
            name = "torch.compile(transformers sdpa)"
            out[name] = workload(name, compiled(lambda: hf("sdpa")), True)
    backends = ["reference"] + ours_backends(device)
    for be in backends:
        out[f"ours ({be})"] = workload(f"ours ({be})", lambda be=be: ours(be), False,
                                       baseline=not transformers and be == "reference")
    if compile_baseline and mode == "forward":
        # torch.compile of ours: one graph on the padded layout (static shapes), so it computes
        # on padding; its first call (compile time) is reported as first_call_s.
        name = f"torch.compile(ours ({backends[-1]}))"
        out[name] = workload(name, compiled(lambda: ours(backends[-1])), False)
    return out
