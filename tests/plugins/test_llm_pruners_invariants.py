"""The adapter invariant matrix for every registered LLM pruner (drawn from the registry with its example configs)
on every tiny preset, alone and composed with every registered vision compressor.

Truths: the unmodified model (keep_ratio=1.0, restore on exit), the same prompt alone (batch rows), a no-cache
recompute (cached decoding). FastV, DART and SparseVLM rank visual tokens with the prompt's TEXT (last token, text
pivots, text raters); a no-cache recompute over prompt + generated tokens has more text, so it would legitimately
choose differently. For them the recompute replays the prefill's selection (:class:`Replay`), which still checks
that the cache the pruned prefill left behind is exactly what a full forward with that pruning computes.
V²Drop and LUVC-SPU only look at visual tokens, which precede the generated ones, so they use the plain check.
"""
from __future__ import annotations

import pytest
import torch

import tokcomp
from llm_fakes import planned_counts  # noqa: I001 (tests/ is on sys.path)
from tokcomp.run import extend_inputs
from tokcomp.strategy import LLMPruner
from tokcomp.testing import invariants as inv
from tokcomp.testing import matrix
from tokcomp.tokens import LLMStep, Selection

torch.set_num_threads(1)

MODELS = matrix.presets()
#: (class, example config) of every registered LLM pruner / vision compressor
PRUNERS = [(c, ex) for c in matrix.strategies("llm") for ex in c.examples]
VISION = [(c, c.examples[0]) for c in matrix.strategies("vision")]
FIRST = [(c, c.examples[0]) for c in matrix.strategies("llm")]


def _id(case) -> str:
    return matrix.spec_part(*case)


def _runs_on(case, model: str) -> bool:
    return matrix.family(model) in tokcomp.default_registry().runs_on(case[0])


def text_conditioned(cls) -> bool:
    """Ranks with the prompt's text (attention rows or keys): a longer recompute may legitimately choose
    differently, so its recompute replays the prefill's selection."""
    return cls.needs_attention_rows or cls.needs_keys


class Replay(LLMPruner):
    """Wraps a pruner: records its prefill selections as ORIGINAL positions, and in replay mode re-applies them
    (replacement values included) to a longer prompt that starts with the recorded one."""

    name = "replay"

    def __init__(self, inner: LLMPruner):  # noqa: super().__init__ would build a config; reuse the inner one
        self.inner, self.config = inner, inner.config
        self.needs_keys, self.needs_attention_rows = inner.needs_keys, inner.needs_attention_rows
        self.recorded: dict[int, tuple[list, list]] = {}
        self.replaying = False

    def prune_layers(self, n_layers: int) -> list[int]:
        return self.inner.prune_layers(n_layers)

    def attention_queries(self, layer: int) -> str | None:
        return self.inner.attention_queries(layer)

    def begin(self, ctx) -> None:
        self.inner.begin(ctx)

    def select(self, step: LLMStep, ctx) -> Selection:
        idx = step.embeds_index
        if not self.replaying:
            sel = self.inner.select(step, ctx)
            rep = [None if r is None else (idx[b, r[0]], r[1]) for b, r in enumerate(sel.replace or [])]
            self.recorded[step.layer] = ([idx[b, k] for b, k in enumerate(sel.keep)], rep)
            return sel
        keep_orig, rep = self.recorded[step.layer]
        keep, replace = [], []
        for b in range(idx.shape[0]):
            keep.append((torch.isin(idx[b], keep_orig[b]) & step.visual[b]).nonzero()[:, 0])
            r = rep[b] if b < len(rep) else None
            if r is not None:
                slots = torch.stack([((idx[b] == o) & step.valid[b]).nonzero()[0, 0] for o in r[0]])
                replace.append((slots, r[1]))
            else:
                replace.append(None)
        return Selection(keep=keep, replace=replace if any(x is not None for x in replace) else None)


def check_cached_matches_recompute(vlm, vision: str | None, pruner: LLMPruner, replay: bool,
                                   new_tokens: int = 4, inputs=None) -> None:
    """Under one session, cached greedy decoding equals a no-cache forward over prompt + generated tokens (the
    prefill's selection replayed there when ``replay``), and each generated token is the recompute's greedy choice
    among the tokens generate() may emit (the tiny models suppress the vision placeholders, whose raw logits can
    be the largest; ``inv.check_cached_decoding_matches_recompute`` compares with the raw argmax)."""
    model = vlm.model
    inputs = inv._inputs(vlm, inv.default_prompts()) if inputs is None else inputs
    llm = Replay(pruner) if replay else pruner
    with tokcomp.compress(model, vision=vision, llm=llm) as session:
        out = inv._generate(model, inputs, new_tokens, output_logits=True, return_dict_in_generate=True)
        seq, steps = out.sequences, torch.stack(out.logits, 1)
        counts = session.report.last.llm_layers
        full = extend_inputs(inputs, seq[:, inputs["input_ids"].shape[1]:])
        if replay:
            assert llm.recorded, "the pruner never ran"
            llm.replaying = True
        recompute = inv._logits(model, full, use_cache=False)[:, -new_tokens - 1:-1]
        assert session.report.last.llm_layers == counts  # the recompute pruned the prompt the same way
    assert torch.allclose(recompute, steps, atol=inv.LOGIT_ATOL, rtol=0), \
        f"max |diff| {(recompute - steps).abs().max():.3g}"
    allowed = recompute.clone()
    allowed[..., list(model.generation_config.suppress_tokens or [])] = float("-inf")
    assert torch.equal(allowed.argmax(-1), seq[:, -new_tokens:])


def _vision(vision, ratio: float) -> str | None:
    return None if vision is None else matrix.spec_part(*vision, keep_ratio=ratio)


def _spec(vision, pruner, ratio: float) -> str:
    return f"{_vision(vision, ratio) or 'none'}+{matrix.spec_part(*pruner, keep_ratio=ratio)}"


def _pruner(pruner, ratio: float = 0.5):
    return pruner[0](**pruner[1], keep_ratio=ratio)


def _cached(vlm, vision, pruner, ratio: float = 0.5) -> None:
    check_cached_matches_recompute(vlm, _vision(vision, ratio), _pruner(pruner, ratio),
                                   replay=text_conditioned(pruner[0]))


def _alone_params():
    return [pytest.param(m, p, id=f"{_id(p)}-{m}") for p in PRUNERS for m in MODELS if _runs_on(p, m)]


# ------------------------------------------------------------------------------------------------ alone
@pytest.mark.parametrize("model,pruner", _alone_params())
def test_alone_keep_one_is_identity(tiny_vlm_factory, model, pruner):
    inv.check_keep_one_is_identity(tiny_vlm_factory(model), _spec(None, pruner, 1.0))


@pytest.mark.parametrize("model,pruner", _alone_params())
def test_alone_prunes_restores_decodes_and_rows_match(tiny_vlm_factory, model, pruner):
    vlm = tiny_vlm_factory(model)
    spec = _spec(None, pruner, 0.5)
    with tokcomp.compress(vlm.model, spec) as s:           # the pruner really prunes on this model
        with torch.no_grad():
            vlm.model(**inv._inputs(vlm, inv.default_prompts()))
        counts = s.report.last.llm_layers
    n_layers = vlm.model.config.get_text_config().num_hidden_layers
    assert counts[n_layers - 1][0] < counts[0][0], counts
    p = s.llm                                               # achieved counts == the pruner's own schedule
    for b, n in enumerate(counts[0]):
        assert [counts[i][b] for i in range(n_layers)] == planned_counts(p, n, n_layers), (b, counts)
    inv.check_restores_model(vlm, spec)
    _cached(vlm, None, pruner)
    inv.check_rows_match_alone(vlm, spec)


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-internvl"])
@pytest.mark.parametrize("pruner", [p for p in FIRST if text_conditioned(p[0])], ids=_id)
def test_alone_eager_attention(tiny_vlm_factory, model, pruner):
    vlm = tiny_vlm_factory(model, attn="eager")
    _cached(vlm, None, pruner)
    inv.check_rows_match_alone(vlm, _spec(None, pruner, 0.5))


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-internvl"])
def test_sparsevlm_several_recycled_clusters(tiny_vlm_factory, model):
    """One aggressive stage (12 -> 3 tokens) so DPC-kNN forms 2 clusters whose merged states replace 2 kept slots."""
    vlm = tiny_vlm_factory(model)
    spec = "sparsevlm(schedule=[[1,0.25]],cluster_size=2)"
    pruner = tokcomp.get("sparsevlm", schedule=[[1, 0.25]], cluster_size=2)
    replay = Replay(pruner)
    with tokcomp.compress(vlm.model, llm=replay):
        with torch.no_grad():
            vlm.model(**inv._inputs(vlm, inv.default_prompts()))
    (_, rep), = replay.recorded.values()
    assert max(0 if r is None else r[0].numel() for r in rep) >= 2
    check_cached_matches_recompute(vlm, None, pruner, replay=True)
    inv.check_rows_match_alone(vlm, spec)


@pytest.mark.parametrize("pruner", FIRST, ids=_id)
def test_video_and_image_in_one_prompt(tiny_vlm_factory, pruner):
    """A Qwen2-VL prompt with an image and a 4-frame video (t=2 temporal grid): both spans are the row's visual
    tokens, the achieved counts follow the schedule, cached decoding equals the recompute."""
    from tokcomp.testing import default_images, make_video_inputs
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    inputs = make_video_inputs(vlm, frames=4, size=(56, 84), images=[default_images()[3]])
    p = _pruner(pruner, 0.4)
    with tokcomp.compress(vlm.model, llm=p) as s:
        with torch.no_grad():
            vlm.model(**inputs)
        counts = s.report.last.llm_layers
    n, n_layers = counts[0][0], len(counts)
    want = planned_counts(p, n, n_layers)
    assert [counts[i][0] for i in range(n_layers)] == want and want[-1] < n
    check_cached_matches_recompute(vlm, None, _pruner(pruner, 0.4), text_conditioned(pruner[0]), new_tokens=3,
                                   inputs=inputs)


@pytest.mark.parametrize("pruner", FIRST, ids=_id)
def test_alone_exception_text_only_static_cache(tiny_vlm_factory, pruner):
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    spec = _spec(None, pruner, 0.5)
    inv.check_restores_after_exception(vlm, spec)
    inv.check_text_only_untouched(vlm, spec)
    inv.check_static_cache_refused(vlm, spec)


# ------------------------------------------------------------------------------------------------ composed
# Every (pruner, vision) pair runs on one family, alternating, so each pruner and each vision compressor meets
# both the Qwen2-VL and the InternVL adapter while the suite stays fast (the alone tests cover all three models).
def _pairs():
    out, k = [], 0
    for p in FIRST:
        for v in VISION:
            models = [m for m in matrix.presets() if _runs_on(p, m) and _runs_on(v, m)]
            if models:
                m = models[k % len(models)]
                k += 1
                out.append(pytest.param(p, v, m, id=f"{_id(v)}+{_id(p)}-{m}"))
    return out


PAIRS = _pairs()


@pytest.mark.parametrize("pruner,vision,model", PAIRS)
def test_composed_keep_one_is_identity(tiny_vlm_factory, model, vision, pruner):
    inv.check_keep_one_is_identity(tiny_vlm_factory(model), _spec(vision, pruner, 1.0), new_tokens=2)


@pytest.mark.parametrize("pruner,vision,model", PAIRS)
def test_composed_restores_decodes_and_rows_match(tiny_vlm_factory, model, vision, pruner):
    vlm = tiny_vlm_factory(model)
    inv.check_restores_model(vlm, _spec(vision, pruner, 0.5), new_tokens=2)
    _cached(vlm, vision, pruner)
    inv.check_rows_match_alone(vlm, _spec(vision, pruner, 0.5), new_tokens=3)
