"""Shared by tests/test_patch_hf_family.py, tests/test_freeze_family.py and tests/test_int8.py:
the small padded batch their encoders are checked on."""
import torch


def padded_batch(vocab: int, seqlen: int, padding: str = "right", batch: int = 3,
                 pad_id: int = 1) -> tuple:
    """(input_ids [batch, seqlen] with pad_id at padded positions, attention_mask [batch,
    seqlen] long): token ids from a generator seeded 0 in [2, vocab); padding "right" (row 0
    keeps 6 tokens, row 1 keeps 9), "left" (row 0 pads 5, row 1 pads 2) or anything else for
    none; rows past the second are never padded."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (batch, seqlen), generator=gen)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if padding == "right":
        mask[0, 6:] = 0
        if batch > 1:
            mask[1, 9:] = 0
    elif padding == "left":
        mask[0, :5] = 0
        if batch > 1:
            mask[1, :2] = 0
    return ids.masked_fill(mask == 0, pad_id), mask
