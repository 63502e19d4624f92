"""tokcomp inside lmms-eval: ``--model tokcomp --model_args 'pretrained=PATH,compress="SPEC"'``.

lmms-eval finds this package through the ``lmms_eval.models`` entry point (:func:`manifests`), so a stock
lmms-eval runs any tokcomp pair on any checkpoint a tokcomp VLM adapter serves (Qwen2-VL, Qwen2.5-VL, InternVL3-hf,
LLaVA), single process or data parallel (``accelerate launch --num_processes N -m lmms_eval`` / ``torchrun``).

Modules:
    model    the lmms-eval model classes (chat and simple interfaces): load, compress, generate, record
    loading  checkpoint + processor loading without torchvision, the parallelism check, the spec check
    records  the per-document tokcomp record, its de-duplicated gathering across ranks, the summary
    seeding  per-document seeds (the same result on any number of ranks)
    demo     ``python -m tokcomp.lmms.demo DIR``: a tiny offline checkpoint and local task to try the command on

Install (lmms-eval without its torchvision / CUDA-torch requirements): see docs/evaluation.md.
Importing this package imports neither torch nor lmms-eval.
"""
from __future__ import annotations

#: the lmms-eval release this integration is tested against (its evaluator, request and manifest formats)
TESTED_LMMS_EVAL = "0.7.3"

MODEL_ID = "tokcomp"


def manifests():
    """The ``lmms_eval.models`` entry point: one manifest, ``--model tokcomp``.

    The chat class is what lmms-eval picks by default (messages built by the task, images in order); the simple
    class serves ``--force_simple`` (a context string plus ``doc_to_visual``)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return [ModelManifest(model_id=MODEL_ID,
                          chat_class_path="tokcomp.lmms.model.TokcompChat",
                          simple_class_path="tokcomp.lmms.model.TokcompSimple")]
