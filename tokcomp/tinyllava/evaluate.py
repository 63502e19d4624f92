"""Answer easy-VQA questions with STOCK ``model.generate()`` (greedy, left-padded batches) and score them.

Plain functions of (model, processor, questions), so they work unchanged inside a compression session::

    with tokcomp.compress(model, spec):
        preds = answer(model, processor, questions)

Run as a script for the held-out accuracy and the no-image floor::

    python -m tokcomp.tinyllava.evaluate [--n 500] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch

from .data import KINDS, Question, is_correct, load_image, prompt

MAX_NEW_TOKENS = 4      # the longest answer (" te" "al" + end) is 3 tokens


def left_padded(processor, texts: list[str], images: list | None):
    """The processor's batch of ``texts`` (and ``images``), padded on the left as batched ``generate`` needs."""
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        return processor(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side


def _generate(model, processor, texts: list[str], images: list | None, max_new_tokens: int) -> list[str]:
    tok = processor.tokenizer
    inputs = left_padded(processor, texts, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def answer(model, processor, questions: Sequence[Question], batch_size: int = 16,
           max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """The generated answer text of every question (with its image), in order."""
    preds: list[str] = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        preds += _generate(model, processor, [prompt(q.text) for q in chunk],
                           [load_image(q.image_path) for q in chunk], max_new_tokens)
    return preds


def answer_without_image(model, processor, questions: Sequence[Question], batch_size: int = 16,
                         max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """The no-image floor: the same prompts without the image placeholder, so no image tokens at all."""
    preds: list[str] = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        preds += _generate(model, processor, [prompt(q.text, image=False) for q in chunk], None, max_new_tokens)
    return preds


def score(questions: Sequence[Question], predictions: Sequence[str]) -> list[bool]:
    """Per-question exact match (for paired statistics between two runs on the same questions)."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    return [is_correct(p, q.answer) for q, p in zip(questions, predictions)]


def accuracy(questions: Sequence[Question], predictions: Sequence[str]) -> dict:
    """``{"all": {"n", "correct", "accuracy"}, "yes/no": {...}, "shape": {...}, "color": {...}}``."""
    hits = score(questions, predictions)
    out = {}
    for kind in ("all",) + KINDS:
        sel = [h for q, h in zip(questions, hits) if kind == "all" or q.kind == kind]
        out[kind] = {"n": len(sel), "correct": sum(sel), "accuracy": sum(sel) / len(sel) if sel else float("nan")}
    return out


def format_accuracy(acc: dict) -> str:
    """One line: ``all 87.2 % (436/500) | yes/no ... | shape ... | color ...``."""
    return " | ".join(f"{k} {100 * v['accuracy']:.1f} % ({v['correct']}/{v['n']})" for k, v in acc.items())


def main(argv: list[str] | None = None) -> None:
    from .build import build_tiny_llava
    from .data import HELDOUT_SIZE, heldout_questions
    ap = argparse.ArgumentParser(description="held-out easy-VQA accuracy of the tiny LLaVA and its no-image floor")
    ap.add_argument("--n", type=int, default=HELDOUT_SIZE)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = build_tiny_llava()
    print(f"model ready in {time.time() - t0:.1f} s", flush=True)
    qs = heldout_questions(args.n)
    for name, fn in (("image", answer), ("no image", answer_without_image)):
        t0 = time.time()
        acc = accuracy(qs, fn(model, processor, qs, batch_size=args.batch_size))
        print(f"{name}: {format_accuracy(acc)}  [{time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
