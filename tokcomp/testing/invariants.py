"""The adapter invariant suite: checks every adapter must pass, parametrised by a model builder and a spec.

Each ``check_*`` function takes a :class:`~tokcomp.testing.models.TinyVLM` (any family) and a spec string, runs
the model inside and outside a session, and asserts against an independent truth: the unmodified model, the same
prompt alone, a no-cache recompute. Use them from pytest with the matrix helpers::

    from tokcomp.testing import invariants as inv

    @pytest.mark.parametrize("spec", inv.invariant_specs())
    @pytest.mark.parametrize("attn", ["sdpa", "eager"])
    def test_restores(tiny_vlm_factory, attn, spec):
        inv.check_restores_model(tiny_vlm_factory("tiny-qwen2-vl", attn=attn), spec)

Prompts default to :func:`default_prompts`: a batch of three left-padded rows (one image; two images of different
sizes; text only), so every check also covers padding, several images per prompt, rows with different visual
token counts and a text-only row. Videos are model-family specific and tested by each adapter's own tests.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from tokcomp.adapters._hf import cache_lengths, output_cache
from tokcomp.run import extend_inputs

__all__ = ["invariant_specs", "default_prompts", "hook_count", "model_state", "check_keep_one_is_identity",
           "check_restores_model", "check_restores_after_exception", "check_cached_decoding_matches_recompute",
           "check_rows_match_alone", "check_text_only_untouched", "check_static_cache_refused", "noop_spec"]

#: atol for logits that must agree up to kernel rounding (tiny models have logits of magnitude ~10)
LOGIT_ATOL = 2e-4


# ------------------------------------------------------------------------------------------------------
# the matrix
# ------------------------------------------------------------------------------------------------------
def invariant_specs(vision: Sequence[str] = ("random", "pool"), llm: Sequence[str] = ("random",),
                    budgets: Sequence[float] = (1.0, 0.5)) -> list[str]:
    """Spec strings of the matrix: each vision strategy alone, each LLM strategy alone, and every pair, each at
    every budget (pairs use the same budget on both stages), e.g. ``"pool(keep_ratio=0.5)+random(keep_ratio=0.5)"``.
    """
    out = []
    for r in budgets:
        vs = [f"{v}(keep_ratio={r})" for v in vision]
        ls = [f"{name}(keep_ratio={r})" for name in llm]
        out += [f"{v}+none" for v in vs] + [f"none+{x}" for x in ls] + [f"{v}+{x}" for v in vs for x in ls]
    return out


def noop_spec(spec: str) -> bool:
    """True if every part of ``spec`` keeps everything (keep_ratio=1.0 or none)."""
    parts = [p.strip() for p in spec.split("+")]
    return all(p == "none" or "keep_ratio=1.0" in p.replace(" ", "") for p in parts)


def default_prompts() -> list[Any]:
    """Rows ``[image A, [image B, image D], None]`` from :func:`~tokcomp.testing.images.default_images`."""
    from tokcomp.testing.images import default_images
    ims = default_images()
    return [ims[0], [ims[1], ims[3]], None]


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def hook_count(model: torch.nn.Module) -> int:
    """Forward (pre-)hooks of every submodule of ``model``."""
    n = 0
    for m in model.modules():
        n += len(m._forward_pre_hooks) + len(m._forward_hooks)
    return n


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """What a session must restore: hooks, attention implementations, attention registries, instance attributes."""
    from tokcomp.adapters._hf import attn_impl, registry_names
    cfg = model.config
    impls = {"model": attn_impl(cfg)}
    for sub in ("text_config", "vision_config"):
        c = getattr(cfg, sub, None)
        if c is not None:
            impls[sub] = attn_impl(c)
    names = registry_names()
    return {"hooks": hook_count(model), "attn": impls,
            "attn_registry": names["attention"], "mask_registry": names["mask"],
            "attrs": {n: sorted(m.__dict__.keys()) for n, m in model.named_modules()}}


def _inputs(vlm, prompts):
    from tokcomp.testing.inputs import make_inputs
    return make_inputs(vlm, prompts)


def _generate(model, inputs, n: int, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def _session(vlm, spec: str):
    from tokcomp.session import compress
    return compress(vlm.model, spec)


# ------------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------------
def check_keep_one_is_identity(vlm, spec: str, prompts=None, new_tokens: int = 4) -> None:
    """A keep-everything spec changes nothing: logits and greedy tokens equal the model outside any session."""
    assert noop_spec(spec), f"{spec!r} is not a keep-everything spec"
    inputs = _inputs(vlm, prompts or default_prompts())
    ref_logits, ref_tokens = _logits(vlm.model, inputs), _generate(vlm.model, inputs, new_tokens)
    with _session(vlm, spec):
        logits, tokens = _logits(vlm.model, inputs), _generate(vlm.model, inputs, new_tokens)
    assert logits.shape == ref_logits.shape
    assert torch.equal(logits, ref_logits), f"max |diff| {(logits - ref_logits).abs().max():.3g}"
    assert torch.equal(tokens, ref_tokens)


def check_restores_model(vlm, spec: str, prompts=None, new_tokens: int = 3) -> None:
    """After the session: no hook left, same attention implementations and registries, same module attributes,
    and outputs identical to a never-touched model."""
    model = vlm.model
    inputs = _inputs(vlm, prompts or default_prompts())
    ref_logits, ref_tokens = _logits(model, inputs), _generate(model, inputs, new_tokens)
    before = model_state(model)     # after a plain forward (transformers sets e.g. rope_deltas itself)
    with _session(vlm, spec) as s:
        _generate(model, inputs, new_tokens)
        _logits(model, inputs)
        assert model_state(model)["hooks"] > before["hooks"] or s.vision is None and s.llm is None
    assert model_state(model) == before
    assert torch.equal(_logits(model, inputs), ref_logits)
    assert torch.equal(_generate(model, inputs, new_tokens), ref_tokens)


def check_restores_after_exception(vlm, spec: str, prompts=None) -> None:
    """An exception inside the ``with`` block (here: mid-forward, from a hook) still restores the model."""
    model = vlm.model
    inputs = _inputs(vlm, prompts or default_prompts())
    ref = _logits(model, inputs)
    before = model_state(model)

    class Boom(RuntimeError):
        pass

    def boom(*_a, **_k):
        raise Boom("raised inside the session")

    layer = _llm_layers(model)[-1]
    try:
        with _session(vlm, spec):
            h = layer.register_forward_pre_hook(boom)
            try:
                _logits(model, inputs)
            finally:
                h.remove()
    except Boom:
        pass
    else:  # pragma: no cover
        raise AssertionError("the exception did not propagate")
    assert model_state(model) == before
    assert torch.equal(_logits(model, inputs), ref)


def check_cached_decoding_matches_recompute(vlm, spec: str, prompts=None, new_tokens: int = 4) -> None:
    """Under one session, cached greedy decoding equals a no-cache forward over prompt + generated tokens, and
    cache layer 0 keeps the full (compressed-prompt) length.

    Holds for strategies whose choice depends on the prompt only (random, pool, DART, V2Drop, every vision
    compressor); FastV / SparseVLM choose with the last / text queries, which the recompute extends."""
    model = vlm.model
    inputs = _inputs(vlm, prompts or default_prompts())
    with _session(vlm, spec):
        out = _generate(model, inputs, new_tokens, output_logits=True, return_dict_in_generate=True)
        seq = out.sequences
        steps = torch.stack(out.logits, 1)                                   # [B, n, V]
        full = extend_inputs(inputs, seq[:, inputs["input_ids"].shape[1]:])
        recompute = _logits(model, full, use_cache=False)[:, -new_tokens - 1:-1]
        seen = []
        h = _llm_layers(model)[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
        try:
            with torch.no_grad():
                cache = output_cache(model(**inputs, use_cache=True))
        finally:
            h.remove()
        lengths = cache_lengths(cache)
    assert torch.allclose(recompute, steps, atol=LOGIT_ATOL, rtol=0), \
        f"max |diff| {(recompute - steps).abs().max():.3g}"
    assert torch.equal(recompute.argmax(-1), steps.argmax(-1))   # raw logits (generate may suppress ids)
    assert lengths[0] == seen[0] == max(lengths), (lengths, seen)   # layer 0 holds the whole prompt the LLM got


def check_rows_match_alone(vlm, spec: str, prompts=None, new_tokens: int = 4) -> None:
    """Row ``b`` of a left-padded batch generates the same tokens (and close last logits) as its prompt alone."""
    model = vlm.model
    prompts = prompts or default_prompts()
    inputs = _inputs(vlm, prompts)
    with _session(vlm, spec):
        batch = _generate(model, inputs, new_tokens)[:, -new_tokens:]
        last = _logits(model, inputs)[:, -1]
        for row, prompt in enumerate(prompts):
            one = _inputs(vlm, [prompt])
            alone = _generate(model, one, new_tokens)[:, -new_tokens:]
            assert torch.equal(batch[row], alone[0]), f"row {row}: {batch[row].tolist()} vs {alone[0].tolist()}"
            ref = _logits(model, one)[0, -1]
            assert torch.allclose(last[row], ref, atol=LOGIT_ATOL, rtol=0), \
                f"row {row}: max |diff| {(last[row] - ref).abs().max():.3g}"


def check_text_only_untouched(vlm, spec: str, new_tokens: int = 4) -> None:
    """A batch of text-only prompts gives exactly the unmodified model's logits and tokens."""
    from tokcomp.testing.inputs import make_inputs
    model = vlm.model
    inputs = make_inputs(vlm, [None, None], ["hello", "describe the quick brown fox"])
    ref_logits, ref_tokens = _logits(model, inputs), _generate(model, inputs, new_tokens)
    with _session(vlm, spec):
        logits, tokens = _logits(model, inputs), _generate(model, inputs, new_tokens)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


def check_static_cache_refused(vlm, spec: str, prompts=None) -> None:
    """generate() with a static cache raises a clear error naming the static cache, and the model is restored."""
    from tokcomp.errors import TokcompError
    model = vlm.model
    inputs = _inputs(vlm, prompts or default_prompts())
    before = model_state(model)
    with _session(vlm, spec):
        try:
            _generate(model, inputs, 2, cache_implementation="static")
        except TokcompError as exc:
            assert "static" in str(exc).lower(), str(exc)
        else:
            raise AssertionError("a static cache was not refused")
    after = model_state(model)
    before.pop("attrs"), after.pop("attrs")   # generate() itself records the static cache size on the model
    assert after == before


def _llm_layers(model):
    lm = getattr(getattr(model, "model", model), "language_model", None)
    if lm is None:
        raise AttributeError("cannot find model.model.language_model")
    return lm.layers

