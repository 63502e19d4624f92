"""Offline byte-level BPE tokenizers for the tiny test models (no hub files, no downloads).

A 32-merge byte-level BPE is trained in-process with the `tokenizers` library (cached, trained once per
process) and wrapped in a fresh `transformers.Qwen2Tokenizer` on every call, with the special tokens the
processors and models expect and a minimal Qwen-style chat template.

Vocabulary (both families): 256 byte symbols + 32 merges = ids 0..287, then 7 special tokens = 295 ids.

* Qwen-VL: `<|im_end|>` 288 (eos), `<|endoftext|>` 289 (pad), `<|im_start|>` 290, `<|vision_start|>` 291,
  `<|vision_end|>` 292, `<|image_pad|>` 293, `<|video_pad|>` 294.
* InternVL: `<|im_end|>` 288 (eos), `<|endoftext|>` 289 (pad), `<img>` 290, `</img>` 291, `<IMG_CONTEXT>` 292,
  `<video>` 293, `<|im_start|>` 294. The named attributes `tok.start_image_token(_id)`,
  `tok.end_image_token(_id)`, `tok.context_image_token(_id)` and `tok.video_token(_id)` are set, as
  `InternVLProcessor` requires.

Do not hard-code these ids: read them from `tok.convert_tokens_to_ids(...)` or from the model config.
"""

from __future__ import annotations

import functools
import json

__all__ = [
    "QWEN_VL_SPECIAL_TOKENS",
    "INTERNVL_SPECIAL_TOKENS",
    "LLAVA_SPECIAL_TOKENS",
    "build_qwen_vl_tokenizer",
    "build_internvl_tokenizer",
    "build_llava_tokenizer",
]

QWEN_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
INTERNVL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
)
LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")

_N_MERGES = 32
_CORPUS = (
    "describe the image in detail",
    "what is in this picture?",
    "the quick brown fox jumps over the lazy dog",
    "describe the video frame by frame",
    "user assistant system",
)

# Minimal Qwen-style chat template. `content` is a string or a list of {"type": "image"|"video"|"text"} items;
# the two placeholders below are substituted per family. The processor expands each image placeholder.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}@IMAGE@{% elif c['type'] == 'video' %}@VIDEO@"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Train the tiny byte-level BPE once per process.

    Returns:
        (vocab items, merges): 288 `(token, id)` pairs and 32 `(left, right)` merge pairs, as immutable tuples
        so the cached value cannot be mutated by callers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + _N_MERGES,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(_CORPUS) * 10, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    # Qwen2Tokenizer needs merges as tuples; a list of "a b" strings raises "failed to extract enum PyMerges".
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"])
    vocab = tuple(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    return vocab, merges


def _base_tokenizer(**named_tokens):
    from transformers import Qwen2Tokenizer

    vocab, merges = _trained_bpe()
    return Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        **named_tokens,
    )


def build_qwen_vl_tokenizer():
    """Fresh Qwen2-VL / Qwen2.5-VL style tokenizer (295 ids), left padding, with a chat template.

    The template renders `{"type": "image"}` as `<|vision_start|><|image_pad|><|vision_end|>` (the processor
    expands `<|image_pad|>`) and `{"type": "video"}` as `<|vision_start|><|video_pad|><|vision_end|>`.
    """
    tok = _base_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": list(QWEN_VL_SPECIAL_TOKENS)})
    tok.chat_template = _CHAT_TEMPLATE.replace(
        "@IMAGE@", "<|vision_start|><|image_pad|><|vision_end|>"
    ).replace("@VIDEO@", "<|vision_start|><|video_pad|><|vision_end|>")
    tok.padding_side = "left"
    return tok


def build_internvl_tokenizer():
    """Fresh InternVL (InternVL3 "-hf" port) style tokenizer (295 ids), left padding, with a chat template.

    The template renders `{"type": "image"}` as `<IMG_CONTEXT>\\n`; `InternVLProcessor` expands it to
    `<img>` + `<IMG_CONTEXT>` x (image_seq_length * tiles) + `</img>`. `{"type": "video"}` renders as `<video>\\n`.
    """
    tok = _base_tokenizer(
        start_image_token="<img>",
        end_image_token="</img>",
        context_image_token="<IMG_CONTEXT>",
        video_token="<video>",
    )
    tok.add_special_tokens({"extra_special_tokens": list(INTERNVL_SPECIAL_TOKENS)})
    tok.chat_template = _CHAT_TEMPLATE.replace("@IMAGE@", "<IMG_CONTEXT>\n").replace("@VIDEO@", "<video>\n")
    tok.padding_side = "left"
    return tok


def build_llava_tokenizer():
    """Fresh LLaVA-1.5 style tokenizer (292 ids), left padding, with a chat template.

    The template renders `{"type": "image"}` as `<image>\n`; `LlavaProcessor` expands `<image>` to one token per
    patch of the (square-resized) image."""
    tok = _base_tokenizer(image_token="<image>")
    tok.add_special_tokens({"extra_special_tokens": list(LLAVA_SPECIAL_TOKENS)})
    tok.chat_template = _CHAT_TEMPLATE.replace("@IMAGE@", "<image>\n").replace("@VIDEO@", "")
    tok.padding_side = "left"
    return tok
