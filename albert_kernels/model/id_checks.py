"""Range checks of the ids the embedding tables are indexed with (input_ids, token_type_ids,
position_ids), so that an id outside a table is a clear error instead of torch's bare
``IndexError: index out of range in self`` (CPU) or a device-side assert (CUDA).

- CPU, eager: each id tensor's min and max are read (one reduction; no device to wait for) and an
  id outside ``[0, rows)`` raises ValueError naming the argument, the offending value and the
  valid range.
- CUDA, eager, by default: no host synchronisation is added. ``torch._assert_async`` queues a
  device-side check of the same condition before the embedding lookup; an out-of-range id then
  fails at the next synchronisation with a CUDA assertion, the same failure torch's embedding
  gives but never a silent wrong result. Because such an assertion leaves the CUDA context
  unusable, set ``model.check_ids = True`` on the AlbertModel (``model.albert.check_ids`` for a
  model with a head) while developing: the CUDA check then reads min/max back to the host (one
  synchronisation per forward) and raises the same ValueError as on the CPU.
- Under torch.compile nothing is read back (the graph stays whole): the device-side assertion
  is traced instead.
"""
from __future__ import annotations

from typing import Optional

import torch

# What each table is indexed by, for the error message.
TABLES = {"input_ids": "vocab_size", "token_type_ids": "type_vocab_size",
          "position_ids": "max_position_embeddings"}


def check_id_ranges(config, on_host: bool = False, **ids: Optional[torch.Tensor]) -> None:
    """ids: input_ids / token_type_ids / position_ids = an integer tensor or None, checked
    against config's vocab_size / type_vocab_size / max_position_embeddings.

    Raises ValueError (see the module docstring for when the check runs on the host)."""
    for name, t in ids.items():
        if t is None or t.numel() == 0:
            continue
        size = getattr(config, TABLES[name])
        host = t.device.type == "cpu" or on_host
        if host and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(t))
            if low < 0 or high >= size:
                bad = low if low < 0 else high
                raise ValueError(f"{name} holds {bad}, outside the embedding table: valid ids "
                                 f"are 0 ... {size - 1} (config.{TABLES[name]} = {size})")
        else:
            torch._assert_async(((t >= 0) & (t < size)).all(),
                                f"{name} outside [0, {size}) (config.{TABLES[name]})")
