"""Model dimensions for the FLOPs model (:mod:`tokcomp.metrics.flops`), read from the modules themselves."""
from __future__ import annotations

from tokcomp.metrics.flops import LLMDims, VisionDims


def llm_dims(language_model, vocab: int) -> LLMDims:
    """A Qwen2-style decoder stack (q/k/v/o projections, SwiGLU MLP)."""
    attn = language_model.layers[0].self_attn
    mlp = language_model.layers[0].mlp
    head_dim = int(attn.head_dim)
    return LLMDims(width=attn.q_proj.in_features, heads=attn.q_proj.out_features // head_dim,
                   kv_heads=attn.k_proj.out_features // head_dim, head_dim=head_dim,
                   mlp=mlp.gate_proj.out_features, vocab=vocab, layers=len(language_model.layers))


def qwen_vision_dims(visual) -> VisionDims:
    """Qwen2-VL (fc1/fc2 MLP) or Qwen2.5-VL (SwiGLU) tower with its PatchMerger."""
    blk = visual.blocks[0]
    width = blk.attn.qkv.in_features
    swiglu = hasattr(blk.mlp, "gate_proj")
    mlp = blk.mlp.gate_proj.out_features if swiglu else blk.mlp.fc1.out_features
    first, last = visual.merger.mlp[0], visual.merger.mlp[2]
    return VisionDims(width=width, heads=int(blk.attn.num_heads), mlp=mlp, mlp_mats=3 if swiglu else 2,
                      merger_in=first.in_features, merger_hidden=first.out_features, out=last.out_features)


def internvl_vision_dims(tower, projector) -> VisionDims:
    """InternViT (fc1/fc2 MLP) with the pixel-shuffle projector LayerNorm(4C) -> Linear(4C, D) -> Linear(D, D)."""
    layer = tower.encoder.layer[0]
    width = layer.attention.q_proj.in_features
    return VisionDims(width=width, heads=int(tower.config.num_attention_heads), mlp=layer.mlp.fc1.out_features,
                      mlp_mats=2, merger_in=projector.linear_1.in_features,
                      merger_hidden=projector.linear_1.out_features, out=projector.linear_2.out_features)


def vit_vision_dims(parts, projector) -> VisionDims:
    """A plain ViT tower (DINOv2 / ViT / CLIP / SigLIP: fc1/fc2 MLP) with LLaVA's projector Linear(C, D) -> GELU ->
    Linear(D, D)."""
    cfg = parts.config
    mlp = next(m for n, m in parts.layers[0].named_modules() if n.endswith("fc1") or n.endswith("intermediate.dense"))
    return VisionDims(width=int(cfg.hidden_size), heads=int(cfg.num_attention_heads), mlp=mlp.out_features,
                      mlp_mats=2, merger_in=projector.linear_1.in_features,
                      merger_hidden=projector.linear_1.out_features, out=projector.linear_2.out_features)
