"""CUDA graphs for a padding-free encoder, shared by the 'cuda' and 'triton' backends: one short
request is not launch-bound on a GPU.

An ALBERT-base forward launches a few hundred kernels (12 layers of about 10 each, plus the
embeddings); for one short request each runs for microseconds, so the GPU waits on the host's
launches. A CUDA graph (``torch.cuda.CUDAGraph``) replays the whole captured sequence with one
launch, but it needs static shapes and device addresses, while the packed encoder's shapes depend
on the data: the token count T, the number of sequences B, ``cu_seqlens`` and the int
``max_seqlen``. Here they are **bucketed** (device-independent; :func:`choose_bucket`,
:func:`fill_bucketed_inputs`):

- **tokens**: T rounds up to the ladder 16, 24, 32, 48, 64, 96, 128, ... (``2^k`` and
  ``1.5 * 2^k``; at most a third of the rows are dummies beyond 16). The dummy tokens (ids
  ``[pad_token_id, token type 0, position 0]``) are appended after the real ones and form
  sequences of their own, each at most ``max_seqlen`` long: no real token attends to them and
  they attend to no real token; their outputs are dropped.
- **max_seqlen** rounds up to a power of two (at least 16, at most the token bucket): the kernels
  accept any ``max_seqlen`` at least the longest sequence (docs/api.md, ``varlen_attention``).
- **sequences**: the real and dummy sequences plus at least one more (so that an exact fit
  shares the bucket of the lengths just below it), rounded up to a power of two by empty
  sequences (the end offset repeated in ``cu_seqlens``; every backend's varlen kernel gives a
  zero-length sequence no rows).
- **query-only tokens** (a left-padded first position, ``model.layers.AttentionPlan.cu_extra``):
  when the batch has any, every sequence of the bucket gets one query-only slot (``cu_extra`` is
  then ``0, 1, ..., S``, static): the rows that have such a token put it there, the others hold
  a dummy whose output is dropped.

:class:`CudaGraphRunner` captures what the model gives it to run (the embeddings and the encoder
layers of the packed tokens) once per bucket (static input and output buffers, warm-up on a side
stream, one private memory pool shared by all buckets of a model, as PyTorch's CUDA-graph
documentation prescribes) and replays them; with ``capture=False`` it runs the same bucketed
inputs eagerly, on any device and backend: that is how the CPU tests prove the bucketing
(tests/test_cuda_graphs.py). It knows no model: the model hands it the packed batch, its
``AttentionPlan`` (a dataclass; the bucket's plan is a copy with the bucket's fields) and a
function running the embeddings and the layers.

The backends that can capture export :func:`graph_encoder`; ``Kernels.graph_encoder``
(``dispatch.py``) is the capability behind ``AlbertPreTrainedModel.enable_cuda_graphs``
(docs/api.md, "CUDA graphs").
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import BackendUnavailable

MIN_TOKENS = 16        # the smallest token bucket, and the smallest max_seqlen bucket
WARMUP_CALLS = 3       # eager calls on a side stream before a capture (PyTorch's docs use 3)
GRAPH_BACKENDS = ("cuda", "triton")  # the backends whose modules export graph_encoder


def bucket_tokens(n: int) -> int:
    """The token bucket of n tokens: the smallest of 16, 24, 32, 48, 64, 96, ... (2^k and
    1.5 * 2^k, k >= 4) that is >= n."""
    if n <= MIN_TOKENS:
        return MIN_TOKENS
    p = 1 << (n - 1).bit_length()          # the power of two >= n
    return p * 3 // 4 if n <= p * 3 // 4 else p


def bucket_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


@dataclass(frozen=True)
class Bucket:
    """The static shape one graph is captured for.

    tokens: packed rows the layers run on (real + dummy); sequences: ``len(cu_seqlens) - 1``;
    max_seqlen: the int passed to the varlen kernels; dummy_sequences: how many sequences the
    dummy tokens form (each at most max_seqlen long), the rest up to ``sequences`` being empty;
    query_only: one query-only row per sequence after the ``tokens`` rows (rows = tokens +
    sequences) or none (rows = tokens)."""
    tokens: int
    sequences: int
    max_seqlen: int
    query_only: bool

    @property
    def rows(self) -> int:
        return self.tokens + (self.sequences if self.query_only else 0)


def choose_bucket(n_tokens: int, n_sequences: int, max_seqlen: int, query_only: bool) -> Bucket:
    """The bucket of a packed batch: n_tokens real tokens in n_sequences sequences (zero-length
    ones included), the longest max_seqlen long; query_only: the batch has query-only tokens.
    ValueError if the counts are inconsistent."""
    if n_tokens < 0 or n_sequences < 0 or max_seqlen < 0 or max_seqlen > n_tokens:
        raise ValueError(f"choose_bucket: need 0 <= max_seqlen <= n_tokens and n_sequences >= 0, "
                         f"got n_tokens={n_tokens}, n_sequences={n_sequences}, "
                         f"max_seqlen={max_seqlen}")
    tokens = bucket_tokens(n_tokens)
    max_b = min(bucket_pow2(max_seqlen, MIN_TOKENS), tokens)
    dummies = tokens - n_tokens
    # at least one sequence slot after the real ones, so that an exact fit (no dummy) shares
    # the bucket of the lengths just below it
    sequences = bucket_pow2(n_sequences + max(1, math.ceil(dummies / max_b)))
    return Bucket(tokens, sequences, max_b, query_only)


def dummy_row(pad_token_id: Optional[int], device) -> torch.Tensor:
    """int64 [3]: (input id, token type, position) of a dummy token (input id pad_token_id, 0 if
    None)."""
    pad = pad_token_id if pad_token_id is not None else 0
    return torch.tensor([pad, 0, 0], dtype=torch.long, device=device)


def fill_bucketed_inputs(ids: torch.Tensor, cu_seqlens: torch.Tensor, tokens: torch.Tensor,
                         plan: AttentionPlan, bucket: Bucket, dummy: torch.Tensor) -> torch.Tensor:
    """Write a packed batch into the bucket's inputs (in place: a graph's static buffers, or fresh
    tensors), without reading the device back.

    ids: int64 [bucket.rows, 3], receives the real tokens' (input id, token type, position), then
    dummies, then (query_only) one slot per sequence. cu_seqlens: int32 [bucket.sequences + 1],
    receives the real sequences' bounds, the dummy sequences' and the repeated end offset.
    tokens: [T + E, 3] and plan: from ``layers.pack_tokens`` (packed: T = plan.n_real real
    tokens, then E query-only ones with plan.cu_extra). dummy: int64 [3] (:func:`dummy_row`).
    Returns the slot (int64 [E], the row of each query-only token) for :func:`gather_outputs`."""
    t, b = plan.n_real, plan.cu_seqlens.numel() - 1
    ids[:t].copy_(tokens[:t])
    ids[t:].copy_(dummy)
    cu_seqlens[:b + 1].copy_(plan.cu_seqlens)
    tail = torch.arange(1, bucket.sequences - b + 1, device=cu_seqlens.device, dtype=torch.int32)
    cu_seqlens[b + 1:].copy_((tail * bucket.max_seqlen + t).clamp_(max=bucket.tokens))
    if plan.cu_extra is None:
        return tokens.new_empty(0)
    n_extra = tokens.shape[0] - t
    # the row of query-only token j: cu_extra[row] <= j < cu_extra[row + 1]
    slots = torch.searchsorted(plan.cu_extra[1:], torch.arange(n_extra, device=tokens.device,
                                                               dtype=plan.cu_extra.dtype),
                               right=True)
    ids[bucket.tokens:].index_copy_(0, slots, tokens[t:])
    return slots


def bucket_plan(plan, cu_seqlens: torch.Tensor, bucket: Bucket):
    """The plan the layers run a bucket with: a copy of the batch's packed ``AttentionPlan``
    (a dataclass; its kernels kept) with the bucket's cu_seqlens (int32 [bucket.sequences + 1]),
    max_seqlen, token count and query-only slots."""
    cu_extra = None
    if bucket.query_only:
        cu_extra = torch.arange(bucket.sequences + 1, dtype=torch.int32, device=cu_seqlens.device)
    return dataclasses.replace(plan, cu_seqlens=cu_seqlens, max_seqlen=bucket.max_seqlen,
                               n_real=bucket.tokens, cu_extra=cu_extra)


def gather_outputs(out: torch.Tensor, n_real: int, bucket: Bucket,
                   slots: torch.Tensor) -> torch.Tensor:
    """The rows of a bucket's output [bucket.rows, hidden] that belong to the batch, as a new
    tensor [T + E, hidden] in ``pack_tokens``' order (real tokens, then query-only ones)."""
    if not bucket.query_only:
        return out[:n_real].clone()
    return torch.cat([out[:n_real], out.index_select(0, slots + bucket.tokens)])


def _autocast_key(device_type: str):
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def check_max_tokens(max_tokens) -> None:
    """ValueError unless max_tokens (the largest token bucket) is a positive int."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")


def check_model(model, kernels, capture: bool = True) -> None:
    """RuntimeError unless `model` (the nn.Module whose parameters the graphs read) can run
    bucketed on `kernels` (its resolved ``Kernels``): eval mode; for capture, parameters on a
    CUDA device, and BackendUnavailable (a RuntimeError) naming the backends with CUDA graphs
    unless `kernels`' backend exports :func:`graph_encoder`."""
    if model.training:
        raise RuntimeError("CUDA graphs are for inference: call model.eval() first (in "
                           "training, attention dropout draws from the RNG at every call, "
                           "which a graph would replay unchanged), or disable_cuda_graphs()")
    if not capture:
        return
    param = next(model.parameters())
    if param.device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need the model on a CUDA device; its parameters are "
                           f"on {param.device} (model.cuda() first)")
    if getattr(kernels.module, "graph_encoder", None) is None:
        names = " or ".join(repr(n) for n in GRAPH_BACKENDS)
        raise BackendUnavailable(
            f"CUDA graphs need the {names} backend, got {kernels.name!r} (the reference backend "
            "reads cu_seqlens back to the host, which a graph capture cannot do)")


@dataclass
class _Graph:
    ids: torch.Tensor
    cu_seqlens: torch.Tensor
    out: torch.Tensor
    graph: "torch.cuda.CUDAGraph"


Run = Callable[[torch.Tensor, object], torch.Tensor]


class CudaGraphRunner:
    """Runs a model's embeddings and encoder on bucketed static shapes (module docstring): with
    ``capture=True`` as one CUDA graph per bucket, captured at the bucket's first use and
    replayed after; with ``capture=False`` eagerly (any device and backend: the CPU proof of the
    bucketing).

    max_tokens: the largest token bucket captured; a batch whose bucket is larger runs eagerly.
    ValueError for a max_tokens that is not a positive int. Made by :func:`graph_encoder`
    (``Kernels.graph_encoder``) for ``AlbertPreTrainedModel.enable_cuda_graphs``;
    ``AlbertModel.forward`` calls :meth:`encode` on the packed fast path. Inference only: it
    raises RuntimeError in training mode (the dropout RNG would be baked into a graph) and with
    autograd recording. The graphs follow the parameters: a move, a cast, a new parameter tensor
    or another backend drops them and the next call captures anew; values changed in place
    (``load_state_dict``, an optimizer step) are read by the next replay.
    """

    def __init__(self, max_tokens: int = 2048, capture: bool = True):
        check_max_tokens(max_tokens)
        self.max_tokens = max_tokens
        self.capture = capture
        self.graphs: dict = {}          # (Bucket, autocast dtype or None) -> _Graph
        self.bucket_calls: Counter = Counter()   # Bucket -> calls that ran in it
        self.last_bucket: Optional[Bucket] = None  # the bucket of the last call that ran bucketed
        self._pool = None
        self._signature = None
        self._dummy: dict = {}          # (device, pad_token_id) -> dummy_row

    def __getstate__(self):  # graphs and the pool belong to the process: copies capture anew
        return {"max_tokens": self.max_tokens, "capture": self.capture}

    def __setstate__(self, state) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (f"CudaGraphRunner(max_tokens={self.max_tokens}, capture={self.capture}, "
                f"{len(self.graphs)} graphs)")

    def reset(self) -> None:
        """Drop every captured graph and the memory pool (the next call captures anew)."""
        self.graphs.clear()
        self._pool = None
        self._signature = None

    def _check_call(self, model, kernels, device_type: str) -> None:
        check_model(model, kernels, self.capture)
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            raise RuntimeError("CUDA graphs are for inference: run the model under "
                               "torch.inference_mode() or torch.no_grad() (a replay records no "
                               "autograd graph)")
        if self.capture and torch.is_autocast_enabled(device_type) and \
                torch.is_autocast_cache_enabled():
            raise RuntimeError("CUDA graphs under torch.autocast need its cast cache off: "
                               "torch.autocast('cuda', dtype, cache_enabled=False) (a cached cast "
                               "would be freed while a graph still reads it), or cast the model")

    # ------------------------------------------------------------------------------------- run
    def encode(self, model, tokens: torch.Tensor, plan, run: Run,
               pad_token_id: Optional[int]) -> Optional[torch.Tensor]:
        """The encoder's output [T + E, hidden] for a packed batch, or None when the batch is to
        run eagerly (no token, or a bucket above max_tokens).

        model: the nn.Module whose parameters ``run`` reads (its mode and parameters are
        checked); tokens int64 [T + E, 3] and plan (a packed ``AttentionPlan``, its kernels the
        backend to run): from ``model.layers.pack_tokens``; run(ids [rows, 3], plan) -> [rows,
        hidden]: the embeddings of (input id, token type, position) rows and the encoder, what
        a graph captures; pad_token_id: the dummy tokens' input id. Raises RuntimeError as the
        class docstring says (BackendUnavailable for a backend without CUDA graphs)."""
        n_real = plan.n_real
        if n_real == 0 or plan.cu_seqlens is None or torch.compiler.is_compiling():
            return None
        bucket = choose_bucket(n_real, plan.cu_seqlens.numel() - 1, plan.max_seqlen,
                               plan.cu_extra is not None)
        if bucket.tokens > self.max_tokens:
            return None
        self._check_call(model, plan.kernels, tokens.device.type)
        self.bucket_calls[bucket] += 1
        self.last_bucket = bucket
        dummy = self._dummy.get((tokens.device, pad_token_id))
        if dummy is None:
            dummy = self._dummy[(tokens.device, pad_token_id)] = dummy_row(pad_token_id,
                                                                           tokens.device)
        if not self.capture:
            ids = tokens.new_empty(bucket.rows, 3)
            cu = plan.cu_seqlens.new_empty(bucket.sequences + 1)
            slots = fill_bucketed_inputs(ids, cu, tokens, plan, bucket, dummy)
            out = run(ids, bucket_plan(plan, cu, bucket))
            return gather_outputs(out, n_real, bucket, slots)
        self._follow_parameters(model, plan.kernels)
        key = (bucket, _autocast_key(tokens.device.type))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(run, plan, bucket, dummy)
        slots = fill_bucketed_inputs(graph.ids, graph.cu_seqlens, tokens, plan, bucket, dummy)
        graph.graph.replay()
        return gather_outputs(graph.out, n_real, bucket, slots)

    def _follow_parameters(self, model, kernels) -> None:
        """Drop the graphs when they would read stale memory or kernels: another backend, a new
        parameter tensor (a move, a cast, an assignment)."""
        signature = (kernels.name, tuple(p.data_ptr() for p in model.parameters()))
        if signature != self._signature:
            self.reset()
            self._signature = signature

    def _capture(self, run: Run, plan, bucket: Bucket, dummy: torch.Tensor) -> _Graph:
        device = dummy.device
        # normal tensors (not inference tensors), so that any later call may copy into them
        with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            ids = dummy.expand(bucket.rows, 3).clone()
            # a valid layout for the warm-up: every token a dummy, in max_seqlen-long sequences
            ends = torch.arange(bucket.sequences + 1, device=device, dtype=torch.int32)
            cu = (ends * bucket.max_seqlen).clamp_(max=bucket.tokens)
            static_plan = bucket_plan(plan, cu, bucket)
            try:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # caches, autotuning, lazy init: not captured
                    for _ in range(WARMUP_CALLS):
                        run(ids, static_plan)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    out = run(ids, static_plan)
            except Exception as e:
                raise RuntimeError(f"CUDA graph capture failed for {bucket} on backend "
                                   f"{plan.kernels.name!r}: {type(e).__name__}: {e}") from e
        return _Graph(ids, cu, out, graph)


def graph_encoder(max_tokens: int = 2048) -> CudaGraphRunner:
    """The CUDA-graph capability the 'cuda' and 'triton' backends export
    (``Kernels.graph_encoder``): a capturing :class:`CudaGraphRunner`. ValueError for a
    max_tokens that is not a positive int."""
    return CudaGraphRunner(max_tokens)


__all__ = ["Bucket", "CudaGraphRunner", "GRAPH_BACKENDS", "bucket_plan", "bucket_pow2",
           "bucket_tokens", "check_max_tokens", "check_model", "choose_bucket", "dummy_row",
           "fill_bucketed_inputs", "gather_outputs", "graph_encoder"]
