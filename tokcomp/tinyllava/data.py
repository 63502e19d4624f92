"""easy-VQA for the tiny LLaVA: questions, the fixed held-out set, the prompt, answer normalisation.

easy-VQA (PyPI ``easy-vqa==1.0``, MIT): 64 x 64 images of one coloured shape (circle, rectangle, triangle; 8
colours) on a light background; train 4,000 images / 38,575 questions, test 1,000 images / 9,673 questions; 13
one-word answers. Question kinds: ``yes/no`` (74 %, half of them negated: "is there not a red shape?"),
``shape`` ("what shape is in the image?") and ``color`` ("what color is the triangle?").

Prompt (the image placeholder is expanded to 256 ``<image>`` tokens by the processor)::

    <image>\\nQuestion: {question}\\nAnswer:

and the model answers `` {answer}<|im_end|>`` (trained so). The no-image floor uses the same prompt without the
placeholder. A prediction is correct when the first word of the generated text, lower-cased with punctuation
removed, equals the answer.

Held-out set: :func:`heldout_questions` draws from the TEST split only, with a fixed seed: the 1,000 test images
are shuffled, the first 500 give one question each (every question over a distinct image). The other 500 test
images (:func:`monitor_questions`) serve for accuracy checks during training, so the held-out set is never looked
at before the final evaluation.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from . import wheels

PROMPT = "{image}\nQuestion: {question}\nAnswer:"
IMAGE_PLACEHOLDER = "<image>"
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
#: easy-VQA's own open-question templates (used to add training questions, see :func:`extra_questions`)
COLOR_TEMPLATES = ("what color is the shape?", "what color is the {shape}?", "what is the color of the shape?",
                   "what is the color of the {shape}?")
SHAPE_TEMPLATES = ("what shape is in the image?", "what shape does the image contain?", "what shape is present?",
                   "what is the {color} shape?")
KINDS = ("yes/no", "shape", "color")
HELDOUT_SEED = 0
HELDOUT_SIZE = 500


@dataclass(frozen=True)
class Question:
    """One easy-VQA question: its text, answer, image id and image file, and the split it comes from."""
    text: str
    answer: str
    image_id: int
    image_path: str
    split: str

    @property
    def kind(self) -> str:
        """``"yes/no"``, ``"shape"`` or ``"color"`` (read from the answer)."""
        if self.answer in ("yes", "no"):
            return "yes/no"
        return "shape" if self.answer in SHAPES else "color"


def is_negated(question: str) -> bool:
    """True for negated yes/no questions ("is there not a ...", "is no ... present", "does ... not contain")."""
    return " not " in f" {question} " or question.startswith("is no ")


def image_attributes(questions: list[Question]) -> tuple[str | None, str | None]:
    """(colour, shape) of the one shape in an image, read from its questions' answers (None where they do not
    tell): open answers, the attribute named in an open question, and yes/no questions answered positively."""
    color = shape = None
    for q in questions:
        words = set(re.findall(r"[a-z]+", q.text))
        named_color = next((c for c in COLORS if c in words), None)
        named_shape = next((s for s in SHAPES if s in words), None)
        if q.kind == "color":
            color, shape = q.answer, shape or named_shape
        elif q.kind == "shape":
            shape, color = q.answer, color or named_color
        elif (q.answer == "yes") != is_negated(q.text):      # the named attribute is present
            color, shape = color or named_color, shape or named_shape
    return color, shape


def extra_questions(questions: list[Question], rng: random.Random) -> list[Question]:
    """One more open colour and one more open shape question about the image of ``questions`` (templates of
    easy-VQA itself, drawn with ``rng``), where its questions tell the colour / shape. Open questions carry the
    most information per token; the original data has only ~1.3 of them per image."""
    color, shape = image_attributes(questions)
    first = questions[0]
    out = []
    if color is not None:
        templates = [t for t in COLOR_TEMPLATES if shape is not None or "{shape}" not in t]
        out.append(Question(rng.choice(templates).format(shape=shape), color, first.image_id, first.image_path,
                            first.split))
    if shape is not None:
        templates = [t for t in SHAPE_TEMPLATES if color is not None or "{color}" not in t]
        out.append(Question(rng.choice(templates).format(color=color), shape, first.image_id, first.image_path,
                            first.split))
    return out


def answers() -> list[str]:
    """The 13 possible answers."""
    return [a.strip() for a in (wheels.easy_vqa_dir() / "answers.txt").read_text().splitlines() if a.strip()]


def load_split(split: str) -> list[Question]:
    """All questions of ``split`` (``"train"`` or ``"test"``) in the file's order."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split {split!r}: use 'train' or 'test'")
    root = wheels.easy_vqa_dir() / split
    rows = json.loads((root / "questions.json").read_text())
    return [Question(text=q, answer=a, image_id=int(i), image_path=str(root / "images" / f"{i}.png"), split=split)
            for q, a, i in rows]


def by_image(questions: list[Question]) -> dict[int, list[Question]]:
    """Questions grouped by image id, each group in the input order; groups ordered by image id."""
    groups: dict[int, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.image_id, []).append(q)
    return dict(sorted(groups.items()))


def _split_test_images(seed: int) -> tuple[list[int], list[int]]:
    """The test image ids shuffled with ``seed``, cut into (held-out images, monitor images) halves."""
    ids = sorted(by_image(load_split("test")))
    random.Random(seed).shuffle(ids)
    half = len(ids) // 2
    return ids[:half], ids[half:]


def _one_per_image(image_ids: list[int], n: int, seed: int) -> list[Question]:
    """``n`` test questions over ``image_ids`` in order, one per image (a second round if ``n`` exceeds them)."""
    groups = by_image(load_split("test"))
    rng = random.Random(seed)
    picks = {i: rng.sample(groups[i], len(groups[i])) for i in image_ids}
    out: list[Question] = []
    rnd = 0
    while len(out) < n:
        before = len(out)
        out += [picks[i][rnd] for i in image_ids if rnd < len(picks[i])][: n - len(out)]
        if len(out) == before:
            raise ValueError(f"only {len(out)} test questions over {len(image_ids)} images, {n} asked")
        rnd += 1
    return out


def heldout_questions(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[Question]:
    """The fixed held-out evaluation set: ``n`` test-split questions, one per image over 500 distinct images
    (chosen with ``seed``); deterministic across runs and machines."""
    return _one_per_image(_split_test_images(seed)[0], n, seed)


def monitor_questions(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[Question]:
    """Questions for accuracy checks during training: test-split images disjoint from :func:`heldout_questions`."""
    return _one_per_image(_split_test_images(seed)[1], n, seed + 1)


def prompt(question: str, image: bool = True) -> str:
    """The prompt text of one question; ``image=False`` drops the image placeholder (the no-image floor)."""
    return PROMPT.format(image=IMAGE_PLACEHOLDER if image else "", question=question)


def target(answer: str) -> str:
    """The text the model is trained to produce after the prompt (the tokenizer's end token follows)."""
    return " " + answer


def normalize(text: str) -> str:
    """First word of a generated answer, lower-cased, letters only (``" Yes.\\n..."`` -> ``"yes"``)."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match of the normalised prediction with the answer."""
    return normalize(prediction) == answer


def load_image(path: str | Path):
    """An easy-VQA image as an RGB PIL image."""
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")
