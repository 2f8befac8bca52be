"""How a batch's attention mask (and packed ``position_ids``) becomes the layout the layers run on.

Three kinds of batch, told apart once per forward by :func:`mask_layout`:

- **padding** (a [B, L] 0/1 or bool mask, or a [B, 1, L, L] mask whose query rows are all the
  same, as transformers builds from a [B, L] mask): every row is one sequence of its real tokens.
  Padded positions are no tokens, except a padded **first** position (left padding), which
  transformers computes as a query over the row's real keys and the pooler reads: it is carried
  as a *query-only* token (it attends to its row's real keys; no real token attends to it), with
  ``varlen_attention``'s separate ``cu_seqlens_q`` / ``cu_seqlens_k``.
- **packed rows**: several sequences in one row, given by ``position_ids`` that restart at 0
  right after a real token of the same row (as transformers' ``DataCollatorWithFlattening``
  produces; transformers' flash-attention path reads them the same way, while its eager/sdpa
  paths would let the sequences see each other; left-padding position ids, whose 0 follows a
  pad, are no packing)
  or by a block-diagonal [B, 1, L, L] mask. Each block is a sequence of its own (varlen
  ``cu_seqlens`` over all of them); positions in no block are no tokens (zero rows).
- anything else (a 4D mask that is neither): ``ValueError`` naming ``attention_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MaskLayout:
    """key_mask: bool [B, L], True = a real token (None: every position is one).
    segments: int64 [B, L], the sequence each position belongs to, numbered from 0 within its row,
    -1 = no token (None: one sequence per row)."""
    key_mask: Optional[torch.Tensor] = None
    segments: Optional[torch.Tensor] = None

    def allowed(self, batch: int, seqlen: int, device) -> Optional[torch.Tensor]:
        """bool [B, 1, L, L], True where query i may attend to key j (the padded-grid form), or
        None when every position may attend to every position."""
        if self.segments is not None:
            seg = self.segments
            return ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0))[:, None]
        if self.key_mask is not None:
            return self.key_mask[:, None, None, :].expand(batch, 1, seqlen, seqlen)
        return None


_SUPPORTED = ("a [B, L] 0/1 or bool padding mask, a [B, 1, L, L] padding mask (every query row "
              "the same, as transformers builds from a [B, L] mask) or a block-diagonal [B, 1, L, "
              "L] mask of packed sequences")


def _allowed_4d(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool (True = attend) or additive float (0 = attend, <= finfo.min / 2 or -inf =
    masked) -> bool [B, L, L]."""
    mask = mask[:, 0]
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(f"a 4D attention_mask must be bool or additive float, got {mask.dtype}")
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if not torch.compiler.is_compiling() and bool(((mask != 0) & ~masked).any()):
        raise ValueError("an additive 4D attention_mask must hold only 0 (attend) and a large "
                         "negative value or -inf (masked); biases are not supported")
    return ~masked


def segments_from_allowed(allowed: torch.Tensor) -> Optional[torch.Tensor]:
    """bool [B, L, L] -> segments int64 [B, L] if it is block-diagonal (contiguous blocks, each
    position attending exactly to its own block; positions in no block attend to nothing and
    nothing attends to them), else None."""
    batch, seqlen, _ = allowed.shape
    member = torch.diagonal(allowed, dim1=1, dim2=2)                          # [B, L]
    prev_same = torch.zeros_like(member)
    prev_same[:, 1:] = torch.diagonal(allowed, offset=-1, dim1=1, dim2=2) & member[:, :-1]
    start = member & ~prev_same
    seg = torch.cumsum(start.long(), dim=1) - 1
    seg = torch.where(member, seg, torch.full_like(seg, -1))
    expected = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    return seg if torch.equal(expected, allowed) else None


def segments_from_position_ids(position_ids: torch.Tensor,
                               key_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """int [B, L] position ids -> segments int64 [B, L] when they mark packed sequences, else
    None. Padded positions (key_mask False) are no tokens (-1).

    A sequence restarts where a real token has position id 0 right after a real token of the
    same row, as packed rows are laid out. Position ids of left-padded rows (``cumsum(mask) - 1``
    with the pads clamped to 0, or pads set to 1 or anything else) have their 0 after a pad, so
    they are no packing: such a batch is read as a padding batch. In a packed row, the row's
    first real token starts its first sequence whatever its position id."""
    if position_ids.shape[1] < 2:
        return None
    real = torch.ones_like(position_ids, dtype=torch.bool) if key_mask is None else key_mask
    restart = (position_ids[:, 1:] == 0) & real[:, 1:] & real[:, :-1]       # [B, L - 1]
    if not bool(restart.any()):
        return None
    first = real & (torch.cumsum(real.long(), dim=1) == 1)
    start = first.clone()
    start[:, 1:] |= restart
    seg = torch.cumsum(start.long(), dim=1) - 1
    return torch.where(real & (seg >= 0), seg, torch.full_like(seg, -1))


def mask_layout(mask, batch: int, seqlen: int,
                position_ids: Optional[torch.Tensor] = None) -> MaskLayout:
    """The one place an attention mask (with ``position_ids``) becomes the layout, for
    AlbertModel and the encoder ``patch_hf`` installs alike.

    mask: None; [B, L] bool or 0/1 numbers (1 = real token); or [B, 1, L, L] bool (True = attend)
    or additive float (0 = attend, a large negative value or -inf = masked). position_ids: int
    [B, L] or None; a 0 right after a real token of the same row marks packed sequences
    (:func:`segments_from_position_ids`; ignored when `mask` is 4D or under torch.compile). Raises ValueError naming attention_mask for any other mask, and
    (eagerly: the checks read the mask on the host) for a [B, L] mask with values other than 0
    and 1 and a 4D mask that is neither a padding mask nor block-diagonal. Under torch.compile a
    4D mask is taken as a padding mask (its first query row) and checked on the device.
    """
    if mask is None:
        key_mask = None
    elif not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor: {_SUPPORTED}; got a "
                         f"{type(mask).__name__} (with transformers, use attn_implementation "
                         "'eager' or 'sdpa')")
    elif mask.dim() == 4:
        if tuple(mask.shape) != (batch, 1, seqlen, seqlen) and not (
                mask.shape[0] == batch and mask.shape[1] == 1 and mask.shape[2] in (1, seqlen)
                and mask.shape[3] == seqlen):
            raise ValueError(f"attention_mask must be {_SUPPORTED}; got {list(mask.shape)} for "
                             f"B={batch}, L={seqlen}")
        allowed = _allowed_4d(mask)
        first = allowed[:, :1, :]
        if torch.compiler.is_compiling():
            torch._assert_async((allowed == first).all(), "attention_mask: a 4D mask must be a "
                                "padding mask under torch.compile")
            return MaskLayout(key_mask=allowed[:, 0, :])
        if bool((allowed == first).all()):
            return MaskLayout(key_mask=allowed[:, 0, :])
        segments = segments_from_allowed(allowed)
        if segments is None:
            raise ValueError(f"attention_mask must be {_SUPPORTED}; this 4D mask is neither "
                             "(albert_kernels attends by key padding or by packed sequences)")
        return MaskLayout(key_mask=segments >= 0, segments=segments)
    elif tuple(mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask must be [B, L] = [{batch}, {seqlen}] like the input "
                         f"(or {_SUPPORTED}), got {list(mask.shape)}")
    elif mask.dtype == torch.bool:
        key_mask = mask
    else:
        if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1 (1 = real token)")
        key_mask = mask != 0
    if position_ids is not None and not torch.compiler.is_compiling():
        segments = segments_from_position_ids(position_ids, key_mask)
        if segments is not None:
            return MaskLayout(key_mask=segments >= 0, segments=segments)
    return MaskLayout(key_mask=key_mask)


def packed_sequences(layout: MaskLayout, batch: int, seqlen: int, device):
    """Real-token positions and sequence bounds of a layout, for the packed fast path.

    Returns (indices int64 [T] into the flattened B*L positions or None when every position is a
    token, cu_seqlens int32 [S+1], max_seqlen int, extra). ``extra`` is None or (positions int64
    [E], cu_extra int32 [B+1]): the query-only tokens, i.e. the flattened position of each row's
    padded first position (left padding, rows with at least one real token) in row order, and
    their prefix count per row (the ``cu_seqlens_q`` beside ``cu_seqlens`` as ``cu_seqlens_k``).
    Reads the device a few times (the token positions, the sequence count of packed rows, the
    longest length, the left-padded rows), never per layer.
    """
    key_mask, segments = layout.key_mask, layout.segments
    if key_mask is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return None, cu, seqlen, None
    indices = torch.nonzero(key_mask.reshape(-1), as_tuple=False).reshape(-1)
    if segments is None:
        lengths = key_mask.sum(dim=1, dtype=torch.int32)
    else:
        per_row = segments.max(dim=1).values + 1                            # [B]
        base = torch.cumsum(per_row, 0) - per_row
        gseg = (segments + base[:, None]).reshape(-1)[indices]
        lengths = torch.bincount(gseg, minlength=int(per_row.sum())).to(torch.int32)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lengths, 0, dtype=torch.int32)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    extra = None
    if segments is None and seqlen > 0:
        lead = ~key_mask[:, 0] & key_mask.any(dim=1)
        rows = torch.nonzero(lead, as_tuple=False).reshape(-1)
        if rows.numel():
            cu_extra = torch.zeros(batch + 1, dtype=torch.int32, device=device)
            cu_extra[1:] = torch.cumsum(lead, 0, dtype=torch.int32)
            extra = (rows * seqlen, cu_extra)
    return indices, cu, max_seqlen, extra
