"""Shape check (a script, not a test): a Qwen2-VL-2B-shaped model (real depths and widths, random weights) runs one
448 x 448 image through a compression session on CPU; prints the achieved token counts and the wall times.

    .venv/bin/python benchmarks/shape_check_qwen2_vl.py                      # 0.5 / 0.5 random+random
    .venv/bin/python benchmarks/shape_check_qwen2_vl.py --spec "pool(keep_ratio=0.5)+none"

448 x 448 px is 32 x 32 patches of 14 px: 1024 ViT tokens, 256 2x2 units = 256 <|image_pad|> tokens before
compression. The model (ViT 32 x 1280, LLM 28 x 1536) has about 2.2 B parameters: about 9 GB of memory in float32
and a few minutes on 2 cores.
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
    ap.add_argument("--size", type=int, default=448, help="image side in pixels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import tokcomp
    from tokcomp.testing import build_model, make_inputs, procedural_image

    vlm, t_build = _timed(lambda: build_model("qwen2-vl-2b-shaped"))
    model = vlm.model
    vc, tc = model.config.vision_config, model.config.text_config
    print(f"model: ViT {vc.depth}x{vc.embed_dim} ({vc.num_heads} heads), LLM {tc.num_hidden_layers}x{tc.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params, built in {t_build:.1f} s")
    inputs = make_inputs(vlm, [procedural_image(args.size, args.size, "shapes", seed=0)], "describe the image")
    n_pad = int((inputs["input_ids"] == vlm.image_token_id).sum())
    print(f"input: pixel_values {tuple(inputs['pixel_values'].shape)}, grid_thw {inputs['image_grid_thw'].tolist()}, "
          f"prompt {inputs['input_ids'].shape[1]} tokens of which {n_pad} <|image_pad|>")

    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        base, t_base = _timed(lambda: model(**inputs).logits)
        base_seq, t_base_gen = _timed(lambda: model.generate(**inputs, **gen))
        with tokcomp.compress(model, args.spec) as session:
            out, t_sess = _timed(lambda: model(**inputs).logits)
            seq, t_sess_gen = _timed(lambda: model.generate(**inputs, **gen))
            rec = session.report.last
    print(f"session: {session.spec} on adapter {session.report.adapter!r}")
    print(f"vision tokens in: {rec.vision_in}")
    print(f"vision tokens after each ViT block: {[rec.vision_blocks[i] for i in sorted(rec.vision_blocks)]}")
    print(f"visual tokens leaving the vision side per image: {rec.vision_out} (of {n_pad})")
    print(f"visual tokens entering the LLM per row: {rec.llm_in}")
    layers = [rec.llm_layers[i][0] for i in sorted(rec.llm_layers)]
    print(f"visual tokens entering each decoder layer (row 0): {layers}")
    finite = bool(torch.isfinite(out).all())
    print(f"logits: unmodified {tuple(base.shape)}, session {tuple(out.shape)}; finite: {finite}")
    print(f"greedy tokens: unmodified {base_seq[0, -args.new_tokens:].tolist()}, session "
          f"{seq[0, -args.new_tokens:].tolist()}")
    print(f"forward: unmodified {t_base:.2f} s, session {t_sess:.2f} s ({t_base / t_sess:.2f}x)")
    print(f"generate({args.new_tokens}): unmodified {t_base_gen:.2f} s, session {t_sess_gen:.2f} s "
          f"({t_base_gen / t_sess_gen:.2f}x)")


if __name__ == "__main__":
    main()
