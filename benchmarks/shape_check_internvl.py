"""Shape check (a script, not a test): an InternVL3-1B-shaped model (real depths and widths, random weights)
runs one image through a compression session on CPU; prints the achieved token counts and the wall times.

    .venv/bin/python benchmarks/shape_check_internvl.py                      # 0.5 / 0.5 random+random
    .venv/bin/python benchmarks/shape_check_internvl.py --spec "pool(keep_ratio=0.5)+fastv(keep_ratio=0.5)"

The image is 448 x 896 px: a 1 x 2 crop grid of 448-px tiles plus the thumbnail, i.e. 3 InternViT tiles of
1 CLS + 32 x 32 patches, 3 x 256 = 768 <IMG_CONTEXT> tokens before compression. Needs about 6 GB of memory
and a few minutes on 2 cores (float32).
"""
from __future__ import annotations

import argparse
import time

import torch


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="random(keep_ratio=0.5)+random(keep_ratio=0.5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import tokcomp
    from tokcomp.testing import build_model, make_inputs, procedural_image

    vlm, t_build = _timed(lambda: build_model("internvl3-1b-shaped"))
    model = vlm.model
    vc, tc = model.config.vision_config, model.config.text_config
    print(f"model: InternViT {vc.num_hidden_layers}x{vc.hidden_size} @ {vc.image_size[0]} px, "
          f"LLM {tc.num_hidden_layers}x{tc.hidden_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
          f"params, built in {t_build:.1f} s")
    inputs = make_inputs(vlm, [procedural_image(448, 896, "shapes", seed=0)], "describe the image")
    n_ctx = int((inputs["input_ids"] == vlm.image_token_id).sum())
    print(f"input: pixel_values {tuple(inputs['pixel_values'].shape)} (tiles), prompt {inputs['input_ids'].shape[1]} "
          f"tokens of which {n_ctx} <IMG_CONTEXT>")

    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        base, t_base = _timed(lambda: model(**inputs).logits)
        base_seq, t_base_gen = _timed(lambda: model.generate(**inputs, **gen))
        with tokcomp.compress(model, args.spec) as session:
            out, t_sess = _timed(lambda: model(**inputs).logits)
            seq, t_sess_gen = _timed(lambda: model.generate(**inputs, **gen))
            rec = session.report.last
    print(f"session: {session.spec} on adapter {session.report.adapter!r}")
    print(f"vision tokens in (CLS included): {rec.vision_in}")
    print(f"vision tokens after each InternViT block: {[rec.vision_blocks[i] for i in sorted(rec.vision_blocks)]}")
    print(f"visual tokens leaving the vision side per image: {rec.vision_out} (of {n_ctx})")
    print(f"visual tokens entering the LLM per row: {rec.llm_in}")
    layers = [rec.llm_layers[i][0] for i in sorted(rec.llm_layers)]
    print(f"visual tokens entering each decoder layer (row 0): {layers}")
    print(f"logits: unmodified {tuple(base.shape)}, session {tuple(out.shape)}; finite: {bool(torch.isfinite(out).all())}")
    print(f"greedy tokens: unmodified {base_seq[0, -args.new_tokens:].tolist()}, session "
          f"{seq[0, -args.new_tokens:].tolist()}")
    print(f"forward: unmodified {t_base:.2f} s, session {t_sess:.2f} s ({t_base / t_sess:.2f}x)")
    print(f"generate({args.new_tokens}): unmodified {t_base_gen:.2f} s, session {t_sess_gen:.2f} s "
          f"({t_base_gen / t_sess_gen:.2f}x)")


if __name__ == "__main__":
    main()
