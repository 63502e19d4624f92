"""Re-packing a prompt with fewer visual placeholders (model-agnostic tensor helpers).

When a unit-granularity vision compressor drops units, the LLM must see fewer placeholder tokens. The kept
tokens of each row are gathered in order and the rows are left re-padded to the longest one, so every other
per-token input (mask, type ids, positions) follows with the same index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def token_keep_mask(input_ids: Tensor, attention_mask: Tensor | None,
                    kept: dict[int, Tensor]) -> Tensor:
    """Which prompt tokens survive.

    Args:
        input_ids: LongTensor[B, L].
        attention_mask: [B, L] (1 = real token) or None (no padding).
        kept: ``{placeholder token id: BoolTensor[P]}``, the keep flag of every placeholder of that id in
            row-major order over the batch (the order ``masked_scatter`` fills them).
    Returns:
        BoolTensor[B, L]: real tokens that are not dropped placeholders (padding is dropped too).
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    for tok, flags in kept.items():
        where = input_ids == tok
        n = int(where.sum())
        if n != flags.numel():
            raise ValueError(f"{n} placeholder tokens {tok} in the prompt but {flags.numel()} visual tokens")
        keep[where] = keep[where] & flags.to(keep.device)
    return keep


@dataclass
class Repacked:
    """Index of a left re-padded batch.

    Attributes:
        index: LongTensor[B, L'] source column of each new column (anything at padding columns).
        valid: BoolTensor[B, L'] real (non-padding) columns.
        lengths: LongTensor[B] real tokens per row.
    """

    index: Tensor
    valid: Tensor
    lengths: Tensor

    def gather(self, x: Tensor, pad_value=0) -> Tensor:
        """Apply to a per-token tensor ``x [..., B, L]`` (batch and sequence are the last two dims):
        returns ``[..., B, L']`` with ``pad_value`` at padding columns."""
        idx = self.index.to(x.device).expand(*x.shape[:-2], *self.index.shape)
        out = x.gather(-1, idx)
        return out.masked_fill(~self.valid.to(x.device), pad_value)

    @property
    def needs_mask(self) -> bool:
        """True if some row is padded."""
        return not bool(self.valid.all())


def left_repack(keep: Tensor) -> Repacked:
    """Left re-padding index for the kept tokens ``keep: BoolTensor[B, L]`` (order within a row preserved)."""
    lengths = keep.sum(1)
    new_len = int(lengths.max()) if keep.numel() else 0
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices   # dropped first, kept last, stable
    index = order[:, keep.shape[1] - new_len:]
    valid = keep.gather(1, index)
    return Repacked(index=index, valid=valid, lengths=lengths)
