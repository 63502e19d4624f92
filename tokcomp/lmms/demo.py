"""A tiny offline checkpoint and a local lmms-eval task, to try ``--model tokcomp`` without any download.

    python -m tokcomp.lmms.demo DIR [--model tiny-qwen2-vl] [--docs 6]

writes ``DIR/<model>/`` (a checkpoint folder: random weights, tiny vocabulary, the stock processor class) and
``DIR/tasks/`` (``tokcomp_demo.yaml``, ``utils.py`` and ``data/``: procedural images of several sizes and a
question each), then prints the lmms-eval command. The task's target for each document is the *unmodified*
model's greedy answer, computed here with plain transformers (``generate()`` on the processor's prompt, no tokcomp),
so its ``exact_match`` reads as agreement with the unmodified model: ``compress=none`` scores 1.0.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

TASK = "tokcomp_demo"
QUESTIONS = ("what is in this picture?", "describe the image in detail", "what is in this picture?",
             "describe the image", "the quick brown fox jumps over the lazy dog", "what is in this picture?")
#: (height, width) of the demo images: different visual-token counts per document
SIZES = ((56, 56), (84, 112), (112, 84), (140, 140), (56, 168), (168, 112), (112, 112), (84, 84))
MAX_NEW_TOKENS = 8

_UTILS = '''\
"""doc_to_* functions of the tokcomp_demo task (written by python -m tokcomp.lmms.demo)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}
'''


def _yaml(data: Path) -> str:
    return textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: {data}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {MAX_NEW_TOKENS}
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 0.1
        """)


def unmodified_answer(model, processor, image, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's greedy answer to one image + question, with plain transformers (no tokcomp anywhere)."""
    import torch
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def build(root: str | Path, model: str = "tiny-qwen2-vl", docs: int = 6) -> dict[str, Path]:
    """Write the checkpoint and the task under ``root``; returns ``{"model": ..., "tasks": ..., "data": ...}``."""
    from datasets import Dataset, DatasetDict, Image

    from tokcomp.testing import build_model, procedural_image
    from tokcomp.testing.checkpoints import save_checkpoint
    root = Path(root).resolve()
    ckpt = save_checkpoint(model, root / model)
    vlm = build_model(model)
    rows = {"image": [], "question": [], "answer": [], "id": []}
    for i in range(docs):
        h, w = SIZES[i % len(SIZES)]
        img = procedural_image(h, w, kind=("shapes", "gradient", "checker", "noise")[i % 4], seed=i)
        q = QUESTIONS[i % len(QUESTIONS)]
        rows["image"].append(img)
        rows["question"].append(q)
        rows["answer"].append(unmodified_answer(vlm.model, vlm.processor, img, q))
        rows["id"].append(i)
    tasks = root / "tasks"
    data = tasks / "data"
    DatasetDict({"test": Dataset.from_dict(rows).cast_column("image", Image())}).save_to_disk(str(data))
    (tasks / "utils.py").write_text(_UTILS)
    (tasks / f"{TASK}.yaml").write_text(_yaml(data))
    return {"model": ckpt, "tasks": tasks, "data": data}


def command(paths: dict[str, Path], spec: str, out: str | Path) -> str:
    """The lmms-eval command line for the demo (one process)."""
    return (f"python -m lmms_eval --model tokcomp \\\n"
            f"    --model_args 'pretrained={paths['model']},compress=\"{spec}\"' \\\n"
            f"    --tasks {TASK} --include_path {paths['tasks']} --batch_size 1 \\\n"
            f"    --log_samples --output_path {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokcomp.lmms.demo", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="where to write the checkpoint and the task")
    p.add_argument("--model", default="tiny-qwen2-vl",
                   help="tiny-qwen2-vl | tiny-qwen2.5-vl | tiny-internvl | tiny-llava")
    p.add_argument("--docs", type=int, default=6, help="documents in the task")
    a = p.parse_args(argv)
    from tokcomp.testing import MODEL_PRESETS
    if a.model not in MODEL_PRESETS or not a.model.startswith("tiny-"):
        print(f"python -m tokcomp.lmms.demo: --model {a.model!r} is not a tiny preset "
              f"({', '.join(k for k in MODEL_PRESETS if k.startswith('tiny-'))})", file=sys.stderr)
        return 2
    if a.docs < 1:
        print("python -m tokcomp.lmms.demo: --docs must be at least 1", file=sys.stderr)
        return 2
    paths = build(a.dir, a.model, a.docs)
    print(f"checkpoint: {paths['model']}\ntask:       {paths['tasks']}/{TASK}.yaml ({a.docs} documents)\n")
    print(command(paths, "ipcv(keep_ratio=0.35)+dart(keep_ratio=0.35)", Path(a.dir).resolve() / "results"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
