"""One sequence per image for training: the image tokens once, then every question/answer segment of that image.

Each segment attends to the image tokens and causally to itself only (a 4-D boolean mask), and its position ids
restart where the image ends, so every segment sees exactly what it would see as its own sequence
``<image tokens> <prompt> <answer> <end>``: one LM forward serves all ~10 questions of an image instead of ten
forwards over the same 256 image tokens. :func:`packed_logits` and the test ``tests/tinyllava`` check that the
logits equal those of separate sequences.

Layout (``I`` image tokens, segments ``s = prompt + answer + end``)::

    positions:  0 .. I-1 | I .. I+len(s1)-1 | I .. I+len(s2)-1 | ...
    mask[q, k]: k <= q inside the image; image -> every segment; k <= q inside one segment; nothing across segments
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packed:
    """A packed sequence of one image and its questions (``L = num_image + sum(len(segment))``).

    ``text_ids``: LongTensor[L - num_image], the segments' token ids after the image;
    ``mask``: BoolTensor[1, 1, L, L], True where a query (row) may attend to a key (column);
    ``position_ids``: LongTensor[1, L];
    ``pred_index``: LongTensor[T], positions whose next-token logits are scored;
    ``targets``: LongTensor[T], the token each of those positions must predict;
    ``segment_of_target``: LongTensor[T], which segment (question) each target belongs to.
    """
    num_image: int
    text_ids: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    pred_index: torch.Tensor
    targets: torch.Tensor
    segment_of_target: torch.Tensor


def pack(num_image: int, segments: list[tuple[list[int], list[int]]]) -> Packed:
    """Pack ``segments`` = [(prompt ids, answer ids incl. the end token), ...] after ``num_image`` image tokens.
    The targets are the answer ids; the position before each answer token predicts it."""
    lengths = [len(p) + len(a) for p, a in segments]
    total = num_image + sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:num_image, :num_image] = torch.ones(num_image, num_image, dtype=torch.bool).tril()
    position_ids = torch.empty(total, dtype=torch.long)
    position_ids[:num_image] = torch.arange(num_image)
    text_ids, pred, targets, seg_of = [], [], [], []
    start = num_image
    for s, ((prompt_ids, answer_ids), n) in enumerate(zip(segments, lengths)):
        if not prompt_ids or not answer_ids:
            raise ValueError(f"segment {s}: empty prompt or answer ids")
        end = start + n
        mask[start:end, :num_image] = True
        mask[start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
        position_ids[start:end] = torch.arange(num_image, num_image + n)
        text_ids += list(prompt_ids) + list(answer_ids)
        first = start + len(prompt_ids)                 # position of the first answer token
        pred += list(range(first - 1, first - 1 + len(answer_ids)))
        targets += list(answer_ids)
        seg_of += [s] * len(answer_ids)
        start = end
    return Packed(num_image=num_image, text_ids=torch.tensor(text_ids, dtype=torch.long), mask=mask[None, None],
                  position_ids=position_ids[None], pred_index=torch.tensor(pred, dtype=torch.long),
                  targets=torch.tensor(targets, dtype=torch.long), segment_of_target=torch.tensor(seg_of))


def packed_logits(model, image_embeds: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Next-token logits at ``packed.pred_index`` of a LLaVA model's language model and head.

    ``image_embeds``: [num_image, text width] (the projector's output for one image) -> logits [T, vocab].
    Only the scored positions go through ``lm_head`` (the 49k-row head over all positions would cost 12 % more).
    """
    lm = model.model.language_model
    text = lm.embed_tokens(packed.text_ids.to(image_embeds.device))
    embeds = torch.cat([image_embeds.to(text.dtype), text], dim=0)[None]
    hidden = lm(inputs_embeds=embeds, attention_mask=packed.mask.to(embeds.device),
                position_ids=packed.position_ids.to(embeds.device), use_cache=False).last_hidden_state
    return model.lm_head(hidden[0, packed.pred_index.to(embeds.device)])
