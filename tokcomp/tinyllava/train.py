"""Train the tiny LLaVA's projector on easy-VQA: deterministic, CPU, one thread; ViT and LM frozen.

    python -m tokcomp.tinyllava.train --out DIR [--images 4000] [--epochs 1] [--lr 1e-3] ...

writes ``DIR/projector.safetensors``, ``DIR/projector.sha256`` and ``DIR/train.log``; copy the three into
``tokcomp/tinyllava/`` to commit a new projector. How it works:

* the ViT features of every image are computed once and cached (:mod:`.features`, ``$TOKCOMP_CACHE/features``);
* one step = one image: its 256 projected tokens followed by ALL its questions packed into one sequence
  (:mod:`.packing`), so one LM forward/backward serves ~10 questions;
* each image also gets one open colour and one open shape question from easy-VQA's own templates, where its
  questions tell the answers (:func:`.data.extra_questions`; ``--extra-questions 0`` turns it off): open questions
  carry the most information per token and cost ~4 % of a step each;
* loss = cross-entropy on the answer tokens and the end token, weighted per question kind (``--color-weight``
  oversamples the open colour questions at no cost);
* AdamW on the projector only, linear warm-up then cosine decay to zero; the LM runs under bf16 autocast on the
  CPU (``--autocast none`` for fp32; about 2x slower) while the projector, its gradients and the loss stay fp32;
* fixed seeds and a fixed data order (image order shuffled per epoch with ``seed + epoch``); CPU kernels differ
  between CPU types, so a rerun on another machine gives a close, not bit-identical, projector;
* ``--init FILE`` continues from a trained projector (a second stage with its own schedule);
* accuracy checks use test-split images disjoint from the held-out set (:func:`.data.monitor_questions`), scored
  by the first answer token of a teacher-forced packed forward in fp32 (= greedy ``generate``'s first token).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import data
from .build import NUM_IMAGE_TOKENS, TEXT_WIDTH, VISION_WIDTH, assemble, cache_root, read_projector, sha256_file
from .features import feature_cache
from .packing import Packed, pack, packed_logits


@dataclass
class TrainConfig:
    """Every knob of a run (all logged)."""
    out: str
    images: int = 4000                 # train images used (a seeded subset of the 4,000)
    epochs: int = 1
    lr: float = 1e-3
    warmup: int = 100                  # steps
    clip: float = 20.0                 # gradient-norm clipping (typical norms 4-9; 0: off)
    images_per_step: int = 1           # gradient accumulation over images
    color_weight: float = 3.0          # loss weight of open colour questions (others 1)
    seed: int = 0
    autocast: str = "bf16"             # "bf16" or "none"
    init_rms: float = 0.13             # the projector's initial output RMS (SmolLM2's embeddings: ~0.13)
    extra_questions: int = 1           # add one open colour and one open shape question per image (0: off)
    init: str = ""                     # start from this projector file instead of a random init (a second stage)
    monitor_images: int = 100          # test images (disjoint from the held-out set) for accuracy checks
    eval_every: int = 1000             # steps
    log_every: int = 50                # steps
    final_eval: int = 500              # held-out questions answered with generate() at the end (0: skip)
    feature_dir: str = field(default_factory=lambda: str(cache_root() / "features"))


_PROJECTOR_SHAPES = {"linear_1.weight": (TEXT_WIDTH, VISION_WIDTH), "linear_1.bias": (TEXT_WIDTH,),
                     "linear_2.weight": (TEXT_WIDTH, TEXT_WIDTH), "linear_2.bias": (TEXT_WIDTH,)}


# ------------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------------
def init_projector(sample: torch.Tensor, init_rms: float, seed: int) -> dict[str, torch.Tensor]:
    """Seeded projector tensors: ``nn.Linear``'s uniform init (zero biases), ``linear_2`` scaled so that the output
    on ``sample`` ([n, 384] features) has RMS ``init_rms`` (the scale of the LM's own token embeddings)."""
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.rand(TEXT_WIDTH, VISION_WIDTH, generator=g) * 2 - 1) / math.sqrt(VISION_WIDTH)
    w2 = (torch.rand(TEXT_WIDTH, TEXT_WIDTH, generator=g) * 2 - 1) / math.sqrt(TEXT_WIDTH)
    out = F.gelu(sample @ w1.T) @ w2.T
    w2 = w2 * (init_rms / float(out.pow(2).mean().sqrt()))
    return {"linear_1.weight": w1, "linear_1.bias": torch.zeros(TEXT_WIDTH),
            "linear_2.weight": w2, "linear_2.bias": torch.zeros(TEXT_WIDTH)}


def image_pack(tokenizer, questions: list[data.Question]) -> Packed:
    """The packed training sequence of one image's questions (answer + end token are the targets)."""
    segs = [(tokenizer(data.prompt(q.text, image=False)).input_ids,
             tokenizer(data.target(q.answer)).input_ids + [tokenizer.eos_token_id]) for q in questions]
    return pack(NUM_IMAGE_TOKENS, segs)


def target_weights(packed: Packed, questions: list[data.Question], color_weight: float) -> torch.Tensor:
    """Loss weight of every target token: ``color_weight`` for open colour questions, 1 otherwise."""
    per_q = torch.tensor([color_weight if q.kind == "color" else 1.0 for q in questions])
    return per_q[packed.segment_of_target]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps to ``peak``, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def monitor(model, tokenizer, groups: dict[int, list[data.Question]], feats: dict[int, torch.Tensor]) -> dict:
    """First-answer-token accuracy (fp32, teacher-forced packed forward) per kind on ``groups``' questions."""
    hits: dict[str, list[bool]] = {"all": [], "yes/no": [], "negated": [], "shape": [], "color": []}
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        for image_id, qs in groups.items():
            packed = image_pack(tokenizer, qs)
            logits = packed_logits(model, projector(feats[image_id]), packed)
            firsts = [int((packed.segment_of_target == s).nonzero()[0]) for s in range(len(qs))]
            for q, i in zip(qs, firsts):
                ok = int(logits[i].argmax()) == int(packed.targets[i])
                hits["all"].append(ok)
                hits[q.kind].append(ok)
                if q.kind == "yes/no" and data.is_negated(q.text):
                    hits["negated"].append(ok)
    return {k: (sum(v) / len(v) if v else float("nan"), len(v)) for k, v in hits.items()}


def _fmt(acc: dict) -> str:
    return " | ".join(f"{k} {100 * a:.1f} % (n={n})" for k, (a, n) in acc.items())


# ------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], object, object]:
    """Run the training described by ``cfg``; returns the trained projector tensors (``linear_{1,2}.*``) and the
    trained (model, processor)."""
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    placeholder = {k: torch.zeros(v) for k, v in _PROJECTOR_SHAPES.items()}  # replaced once features exist
    model, processor = assemble(placeholder)
    tok = processor.tokenizer
    log(f"assembled the model in {time.time() - t_start:.0f} s")

    fdir = Path(cfg.feature_dir)
    train_q = data.by_image(data.load_split("train"))
    test_groups = data.by_image(data.load_split("test"))
    train_feats = feature_cache(fdir / "easyvqa-train-dinov2s-224.pt", model, processor,
                                {i: qs[0].image_path for i, qs in train_q.items()}, log=log)
    test_feats = feature_cache(fdir / "easyvqa-test-dinov2s-224.pt", model, processor,
                               {i: qs[0].image_path for i, qs in test_groups.items()}, log=log)

    image_ids = sorted(train_q)
    random.Random(cfg.seed).shuffle(image_ids)
    image_ids = image_ids[:cfg.images]
    if cfg.init:
        start = read_projector(cfg.init)
        log(f"initial projector: {cfg.init} (sha256 {sha256_file(cfg.init)})")
    else:
        start = init_projector(torch.cat([train_feats[i] for i in image_ids[:8]]), cfg.init_rms, cfg.seed)
    model.model.multi_modal_projector.load_state_dict(start)
    monitor_ids = sorted({q.image_id for q in data.monitor_questions()})[:cfg.monitor_images]
    monitor_groups = {i: test_groups[i] for i in monitor_ids}

    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    params = list(projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    rng = random.Random(cfg.seed)
    train_q = {i: train_q[i] + (data.extra_questions(train_q[i], rng) if cfg.extra_questions else [])
               for i in image_ids}
    packs = {i: image_pack(tok, train_q[i]) for i in image_ids}
    weights = {i: target_weights(packs[i], train_q[i], cfg.color_weight) for i in image_ids}
    steps_per_epoch = math.ceil(len(image_ids) / cfg.images_per_step)
    total = steps_per_epoch * cfg.epochs
    log(f"training: {len(image_ids)} images x {cfg.epochs} epochs, {sum(len(train_q[i]) for i in image_ids)} "
        f"questions per epoch, {total} steps; before training: "
        f"{_fmt(monitor(model, tok, monitor_groups, test_feats))}")

    step, ema, clipped, t0 = 0, None, 0, time.time()
    use_bf16 = cfg.autocast == "bf16"
    for epoch in range(cfg.epochs):
        order = list(image_ids)
        random.Random(cfg.seed + 1 + epoch).shuffle(order)
        for s in range(steps_per_epoch):
            batch = order[s * cfg.images_per_step:(s + 1) * cfg.images_per_step]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for i in batch:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    logits = packed_logits(model, projector(train_feats[i]), packs[i])
                ce = F.cross_entropy(logits.float(), packs[i].targets, reduction="none")
                loss = (ce * weights[i]).sum() / weights[i].sum() / len(batch)
                loss.backward()
                loss_sum += float(loss.detach())
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")))
            clipped += norm > cfg.clip > 0
            opt.step()
            step += 1
            ema = loss_sum if ema is None else 0.98 * ema + 0.02 * loss_sum
            if step % cfg.log_every == 0 or step == total:
                log(f"step {step}/{total} epoch {epoch} loss {loss_sum:.4f} ema {ema:.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} grad norm {norm:.3f} (clipped so far: {clipped}) "
                    f"{time.time() - t0:.0f} s")
            if step % cfg.eval_every == 0 or step == total:
                log(f"monitor at step {step}: {_fmt(monitor(model, tok, monitor_groups, test_feats))}")
    log(f"training took {time.time() - t0:.0f} s ({(time.time() - t0) / max(1, step):.2f} s/step)")
    return {k: v.detach().clone().contiguous() for k, v in projector.state_dict().items()}, model, processor


def save_projector(state: dict[str, torch.Tensor], out: Path) -> str:
    """Write ``projector.safetensors`` and ``projector.sha256`` into ``out``; returns the sha256."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    path = out / "projector.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "model": "tokcomp tiny LLaVA projector"})
    sha = sha256_file(path)
    (out / "projector.sha256").write_text(f"{sha}  projector.safetensors\n")
    return sha


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="train the tiny LLaVA projector on easy-VQA (CPU, deterministic)")
    defaults = TrainConfig(out="")
    for name, value in asdict(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value) if name != "out" else str,
                        default=value, required=name == "out")
    ap.add_argument("--threads", type=int, default=1)
    args = vars(ap.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    cfg = TrainConfig(**args)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    logfile = (out / "train.log").open("w")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    import transformers
    log(f"config {json.dumps(asdict(cfg))}")
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    state, model, processor = train(cfg, log)
    sha = save_projector(state, out)
    log(f"saved {out / 'projector.safetensors'} sha256 {sha}")
    if cfg.final_eval:
        from .evaluate import accuracy, answer, answer_without_image, format_accuracy
        qs = data.heldout_questions(cfg.final_eval)
        for name, fn in (("image", answer), ("no image", answer_without_image)):
            t0 = time.time()
            log(f"held-out {len(qs)} ({name}, generate): "
                f"{format_accuracy(accuracy(qs, fn(model, processor, qs)))} [{time.time() - t0:.0f} s]")
    logfile.close()


if __name__ == "__main__":
    main()
