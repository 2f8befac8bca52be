"""Hidden states and attention probabilities, as transformers returns them, built only when asked.

transformers 5 collects them with forward hooks on its ``AlbertLayer`` (hidden states: the first
layer's input, then every layer's output) and ``AlbertAttention`` (the probabilities), into the
collector its ``capture_outputs`` decorator activates for the call; the collector already holds
the caller's choice (argument over config, an index or a list of indices selecting hidden
states). The encoder ``patch_hf`` installs has no such modules, so it appends the same values to
that collector itself (:func:`transformers_collector`). transformers 4 passes the flags to the
encoder, which returns the tuples (one hidden state per layer-group call there).

Hidden states are token-major inside our encoder ([N, hidden]); each one recorded is put back on
the [B, L] grid, so its values on real positions are transformers'; padded positions hold zeros.
The next layer then reads its tokens from that grid (only when hidden states are asked for), so
every returned hidden state is an ancestor of the outputs: ``.retain_grad()`` on it gets the
gradient, as on transformers' own. The attention probabilities returned are the very tensors
the context is computed from.
Attention probabilities are formed only by :func:`attention_probs` on the padded grid: a call that
asks for them runs every layer there, not on the fused kernels, and says so once.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F


# transformers 5's context variable holding the active output collector; None on transformers 4.
# Looked up once, eagerly (patch_hf calls find_transformers_collector): an import inside a forward
# that torch.compile traces is a graph break, and on transformers 4 a failing one.
_COLLECTOR_VAR: list = []


def find_transformers_collector() -> None:
    """Look up (once) where transformers keeps the active output collector, if it has one."""
    if not _COLLECTOR_VAR:
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:
            _active_collector = None
        _COLLECTOR_VAR.append(_active_collector)


def transformers_collector() -> Optional[dict]:
    """The output collector transformers 5's ``capture_outputs`` has active for this call, or None
    (transformers 4, or no capture asked)."""
    if not _COLLECTOR_VAR:
        find_transformers_collector()
    var = _COLLECTOR_VAR[0]
    collector = var.get() if var is not None else None
    return collector if collector else None


class Recorder:
    """Collects what one forward was asked for.

    hidden_states: None (not asked) or a list that receives each recorded hidden state (or None
    where `selection`, a set of indices, leaves it out). attentions: None or a list receiving
    [B, H, L, L] probabilities per layer. `unpack` (``layers.Unpacker``) puts [N, hidden] tokens
    on the [B, L] grid and takes them back;
    `per_group`: record after each layer-group call (transformers 4) instead of each layer.
    """

    def __init__(self, hidden_states: Optional[list] = None, attentions: Optional[list] = None,
                 selection: Optional[set] = None, per_group: bool = False):
        self.hidden_states, self.attentions = hidden_states, attentions
        self.selection, self.per_group = selection, per_group
        self.unpack: Optional[Callable] = None

    @classmethod
    def from_collector(cls, collector: Optional[dict]) -> Optional["Recorder"]:
        if not collector or not ({"hidden_states", "attentions"} & set(collector)):
            return None
        return cls(collector.get("hidden_states"), collector.get("attentions"),
                   collector.get("_hidden_states_layers"))

    def hidden(self, h: torch.Tensor, group_end: bool = True) -> torch.Tensor:
        """Record hidden state `h` [N, hidden] (if this recorder takes hidden states) and return
        the tokens to continue from: recorded, the [B, L, hidden] grid handed to the caller is
        put on the path to the outputs (``unpack.tokens``: the same values, computed from the
        grid), so ``.retain_grad()`` on it gets the gradient, as transformers' hidden states do;
        else `h` itself."""
        if self.hidden_states is None or (self.per_group and not group_end):
            return h
        index = len(self.hidden_states)
        if self.selection is not None and index not in self.selection:
            self.hidden_states.append(None)
            return h
        grid = self.unpack(h)
        self.hidden_states.append(grid)
        return self.unpack.tokens(grid, h)


def warn_not_fused(where: str) -> None:
    """Attention probabilities were asked for, so the call runs the padded, matrix-forming
    attention instead of the fused kernels. A UserWarning from one place: Python's default
    warning filter shows it once per process (``warnings.simplefilter`` can silence it)."""
    warnings.warn(f"{where}: output_attentions=True forms the attention matrix, so this call "
                  "is not fused: every layer runs plain PyTorch attention on the padded grid "
                  "(as transformers' eager attention). Calls without it use the fused kernels.",
                  UserWarning, stacklevel=2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: Optional[torch.Tensor], scale: float, dropout_p: float):
    """transformers' eager attention: q, k, v [B, H, L, D]; allowed bool [B, 1, L, L] (True =
    attend) or None; masked scores set to the dtype's lowest value before the softmax (a row with
    nothing allowed is then uniform, as transformers' additive mask makes it); dropout on the
    probabilities as ``nn.Dropout`` when dropout_p > 0. Returns (context [B, H, L, D],
    probabilities [B, H, L, L] after dropout, as transformers returns them)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    dropped = F.dropout(probs, p=dropout_p, training=True) if dropout_p > 0 else probs
    return torch.matmul(dropped.to(v.dtype), v), dropped
