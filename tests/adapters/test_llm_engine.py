"""The shared LLM-side engine (adapters/_llm.py) on tiny Qwen2-VL and InternVL, sdpa and eager.

Truths used: the unmodified model (keep-all no-op, undo), a no-cache recompute (cached decoding), each prompt run
alone (batches), eager attention probabilities (attention rows) and a brute-force per-row reference that runs the
decoder layers by hand with explicit gathers (pruning + replace)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from tokcomp.adapter import Surgery
from tokcomp.adapters import _hf as hf
from tokcomp.adapters._llm import LLMEngine, query_positions, repad_left, spans_from_ids
from tokcomp.errors import AdapterError
from tokcomp.plugins.baselines import RandomLLM
from tokcomp.strategy import LLMPruner
from tokcomp.testing import build_model, make_inputs, matrix, procedural_image
from tokcomp.tokens import LLMStep, Selection

ALL_FAMILIES = matrix.presets()
FAMILIES = [p for p in ALL_FAMILIES if p != "tiny-qwen2.5-vl"]  # Qwen2.5-VL's text model only differs by names
ATTNS = ["sdpa", "eager"]
TOL = 1e-4


# ------------------------------------------------------------------------------------------------------
# test-only pruners
# ------------------------------------------------------------------------------------------------------
class NormTopK(LLMPruner):
    """Progressive: after each layer in ``layers`` keep the visual tokens of largest hidden norm, ``ratios[s]`` of
    each row's original count. Logs every step (test-only; real pruners keep no state on self)."""

    name = "test-norm-topk"

    def __init__(self, layers=(0, 2), ratios=(0.6, 0.3)):
        super().__init__(keep_ratio=1.0)
        self.layers, self.ratios, self.log = list(layers), list(ratios), []

    def prune_layers(self, n_layers):
        return self.layers

    def select(self, step: LLMStep, ctx) -> Selection:
        r = self.ratios[self.layers.index(step.layer)]
        keep = []
        for b in range(step.hidden.shape[0]):
            pos = step.visual[b].nonzero()[:, 0]
            k = min(pos.numel(), max(1, round(int(step.n_visual_original[b]) * r)))
            score = step.hidden[b, pos].float().norm(dim=-1)
            keep.append(pos[score.topk(k).indices])
        self.log.append((step, keep))
        return Selection(keep=keep)


def merge_value(h, kept, dropped):
    """SparseVLM-like recycling rule shared by the probe and the reference: Tensor[L, D] hidden of one row, kept
    and dropped visual positions -> (target position, new value Tensor[D])."""
    t = kept.min()
    return t, 0.5 * (h[t] + h[dropped].mean(0))


class AttnProbe(LLMPruner):
    """Asks for attention rows (``kinds[layer]``) and keys; keeps the visual tokens with the most attention from the
    query rows (``ratios[layer]`` of the original count, 1.0 keeps all); optionally recycles the dropped tokens
    into the first kept one with :func:`merge_value`. Logs every step."""

    name = "test-attn-probe"
    needs_attention_rows = True
    needs_keys = True

    def __init__(self, kinds=None, ratios=None, replace=False):
        super().__init__(keep_ratio=1.0)
        self.kinds = kinds or {1: "text", 2: "last"}
        self.ratios = ratios or {i: 1.0 for i in self.kinds}
        self.replace, self.log = replace, []

    def prune_layers(self, n_layers):
        return sorted(self.kinds)

    def attention_queries(self, layer):
        return self.kinds.get(layer)

    def select(self, step: LLMStep, ctx) -> Selection:
        assert step.attn is not None and step.keys is not None and step.queries is not None
        score = step.attn.mean((1, 2))  # [B, L]
        keep, rep = [], []
        for b in range(step.hidden.shape[0]):
            pos = step.visual[b].nonzero()[:, 0]
            k = min(pos.numel(), max(1, round(int(step.n_visual_original[b]) * self.ratios[step.layer])))
            kept = pos[score[b, pos].topk(k).indices]
            keep.append(kept)
            dropped = pos[~torch.isin(pos, kept)]
            if self.replace and dropped.numel():
                t, val = merge_value(step.hidden[b], kept, dropped)
                rep.append((t.reshape(1), val.reshape(1, -1)))
            else:
                rep.append(None)
        self.log.append((step, keep))
        return Selection(keep=keep, replace=rep if self.replace else None)


class Boom(LLMPruner):
    """A buggy pruner: "keeps" a text position, which the engine must refuse."""

    name = "test-boom"

    def prune_layers(self, n_layers):
        return [1]

    def select(self, step, ctx):
        return Selection(keep=[(~step.visual[b]).nonzero()[:1, 0] for b in range(step.visual.shape[0])])


# ------------------------------------------------------------------------------------------------------
# models, inputs, harness
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def vlm(tiny_vlm_factory):
    """``vlm(name, attn)``: the session-shared tiny model of tokcomp.testing (seed 0: same weights for every attn)."""
    return lambda name, attn="sdpa": tiny_vlm_factory(name, attn=attn)


PROMPTS = ["describe the image in detail", "hi"]
SIZES = [(112, 84), (56, 56)]  # different numbers of visual tokens per row


def images(rows=(0, 1)):
    return [procedural_image(*SIZES[b], seed=b + 1) for b in rows]


def make_batch(v, image=True):
    """The left-padded batch of 2 prompts (different visual counts, or text only)."""
    return dict(make_inputs(v, images() if image else [None, None], PROMPTS))


def row_inputs(v, b):
    """Prompt ``b`` of :func:`make_batch` alone."""
    return dict(make_inputs(v, images([b]), [PROMPTS[b]]))


@contextlib.contextmanager
def engine(v, pruner, grids=False, check=True):
    """Attach an LLMEngine with a minimal top-level pre-hook (what the adapters do); undo on exit.
    check: the pre-hook calls engine.check_cache first (else only the engine's own check, before layer 0)."""
    m, s, counts = v.model, Surgery(), []
    eng = LLMEngine(model=m, language_model=m.model.language_model, pruner=pruner, surgery=s,
                    on_prefill=counts.append)
    img = m.config.image_token_id

    def top(mod, args, kw):
        if check:
            eng.check_cache(hf.get_cache(kw))
        ids, am = kw.get("input_ids"), kw.get("attention_mask")
        vis = ids == img
        g = None
        if grids and kw.get("image_grid_thw") is not None:
            g = [(int(t), int(h) // 2, int(w) // 2) for t, h, w in kw["image_grid_thw"]]
        eng.begin(input_ids=ids, attention_mask=am, visual=vis,
                  spans=spans_from_ids(ids, am, img, g) if bool(vis.any()) else None)
    try:
        s.pre_hook(m.model, top)
        eng.attach()
        eng.counts = counts
        yield eng
    finally:
        s.undo()


def generate(m, inputs, n=4, **kw):
    with torch.no_grad():
        return m.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kw)


def forward(m, inputs, **kw):
    with torch.no_grad():
        return m(**inputs, **kw)


def recompute_check(m, inputs, out):
    """No-cache forward over prompt + generated tokens (same session) vs the cached decode logits."""
    L, seq = inputs["input_ids"].shape[1], out.sequences
    n = seq.shape[1] - L
    kw = dict(inputs, input_ids=seq)
    kw["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, L:])], 1)
    if "mm_token_type_ids" in kw:
        kw["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(seq[:, L:])], 1)
    if hasattr(m.model, "rope_deltas"):
        m.model.rope_deltas = None
    logits = forward(m, kw, use_cache=False).logits[:, -(n + 1):-1]
    dec = torch.stack(out.logits, 1)
    assert (logits - dec).abs().max().item() <= TOL
    assert torch.equal(logits.argmax(-1), dec.argmax(-1))  # raw logits (generate also suppresses placeholders)


def hook_snapshot(model):
    """{module name: (forward hook ids, forward pre-hook ids)} of every module that has any. transformers installs
    its own output-capturing hooks lazily on a first forward, so tests snapshot after a warm-up forward."""
    return {n: (list(mod._forward_hooks), list(mod._forward_pre_hooks)) for n, mod in model.named_modules()
            if mod._forward_hooks or mod._forward_pre_hooks}


def registries():
    return hf.registry_names()


def impls(m):
    c = m.config
    return hf.attn_impl(c), hf.attn_impl(c.text_config), hf.attn_impl(c.vision_config)


# ------------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------------
def test_spans_from_ids_runs_grids_and_padding():
    V, W = 9, 8
    ids = torch.tensor([[0, 0, 1, V, V, V, V, V, V, 2, 1, W, W, 2],
                        [0, 0, 0, 0, 0, 0, 0, 1, V, V, V, V, 2, 3]])
    am = torch.ones_like(ids)
    am[1, :7] = 0
    ids[1, 0] = V  # a placeholder id inside the padding is not visual
    spans = spans_from_ids(ids, am, [V, W], [(1, 2, 2), (1, 1, 2), (1, 1, 2), (1, 2, 2)])
    assert [[s.positions.tolist() for s in row] for row in spans] == [[[3, 4, 5, 6], [7, 8], [11, 12]],
                                                                      [[8, 9, 10, 11]]]
    assert spans[0][0].grid == (1, 2, 2) and spans[0][0].cells.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0],
                                                                             [0, 1, 1]]
    assert all(s.row == b for b, row in enumerate(spans) for s in row)
    free = spans_from_ids(ids, am, V)
    assert [[s.grid for s in row] for row in free] == [[(1, 1, 6)], [(1, 1, 4)]]
    with pytest.raises(ValueError):
        spans_from_ids(ids, am, [V, W], [(1, 2, 2)])
    with pytest.raises(ValueError):
        spans_from_ids(ids, am, [V, W], [(1, 2, 2), (1, 1, 2), (1, 1, 2), (1, 2, 2), (1, 1, 1)])


def test_repad_left_and_query_positions():
    keep = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    idx, valid = repad_left(keep)
    assert valid.tolist() == [[True, True, True], [False, True, True]]
    assert idx[0].tolist() == [1, 2, 4] and idx[1, 1:].tolist() == [0, 4]
    visual = torch.tensor([[0, 0, 1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert query_positions("last", visual, valid).tolist() == [[7], [7]]
    assert query_positions("text", visual, valid).tolist() == [[4, 6, 7], [6, 7, 7]]


# ------------------------------------------------------------------------------------------------------
# model tests
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_is_exact_noop(vlm, name, attn):
    v = vlm(name, attn)
    m, inputs = v.model, make_batch(v)
    ref, ref_gen = forward(m, inputs).logits, generate(m, inputs)
    n_vis = (inputs["input_ids"] == m.config.image_token_id).sum(1).tolist()
    for pruner in (RandomLLM(keep_ratio=1.0), AttnProbe()):
        with engine(v, pruner) as eng:
            got = forward(m, inputs).logits
            got_gen = generate(m, inputs)
        assert torch.equal(got, ref)
        assert torch.equal(got_gen.sequences, ref_gen.sequences)
        assert all(torch.equal(a, b) for a, b in zip(got_gen.logits, ref_gen.logits))
        assert eng.counts[0] == {i: n_vis for i in range(4)}
    assert len(pruner.log) == 4  # the probe ran at layers 1 and 2 of both prefills


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", FAMILIES)
def test_keep_half_kv_lengths_and_cached_decode(vlm, name, attn):
    v = vlm(name, attn)
    m, inputs = v.model, make_batch(v)
    L = inputs["input_ids"].shape[1]
    vis = inputs["input_ids"] == m.config.image_token_id
    n_vis = vis.sum(1)
    n_txt = inputs["attention_mask"].sum(1) - n_vis
    kept = torch.round(n_vis * 0.5).long()
    Lc = int((n_txt + kept).max())
    with engine(v, RandomLLM(keep_ratio=0.5, layer=2)) as eng:
        out = generate(m, inputs, n=4)
        assert hf.cache_lengths(hf.output_cache(out)) == [L + 3, L + 3, Lc + 3, Lc + 3]
        assert eng.counts[0] == {0: n_vis.tolist(), 1: n_vis.tolist(), 2: kept.tolist(), 3: kept.tolist()}
        recompute_check(m, inputs, out)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_batch_rows_equal_single_runs(vlm, name, attn):
    """Progressive pruning, left-padded batch of 2 with different visual counts: row b == prompt b alone."""
    v = vlm(name, attn)
    m, inputs = v.model, make_batch(v)
    pruner = NormTopK()
    with engine(v, pruner, grids=True):
        logits = forward(m, inputs).logits
        out = generate(m, inputs, n=4)
        kv = hf.cache_lengths(hf.output_cache(out))
        assert kv[0] == inputs["input_ids"].shape[1] + 3 and kv[1] == kv[2] > kv[3]  # layer 0 keeps full length
        recompute_check(m, inputs, out)
        for b in range(2):
            single = row_inputs(v, b)
            s_logits = forward(m, single).logits
            n = s_logits.shape[1]
            assert (logits[b, -n:] - s_logits[0]).abs().max().item() <= TOL
            s_out = generate(m, single, n=4)
            assert torch.equal(out.sequences[b, -4:], s_out.sequences[0, -4:])
    # spans follow the pruning: their positions are the current visual positions, cells shrink with them
    for step, keep in pruner.log:
        for b, row in enumerate(step.spans):
            pos = torch.cat([s.positions for s in row])
            assert torch.equal(pos, step.visual[b].nonzero()[:, 0])
            assert sum(s.cells.shape[0] for s in row) == pos.numel()
            assert torch.equal(step.embeds_index[b, pos], torch.sort(step.embeds_index[b, pos]).values)


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_with_a_text_only_row(vlm, name):
    """A row without any image in a batch with one: it keeps every token; both rows equal their single runs."""
    v = vlm(name, "sdpa")
    m = v.model

    img = procedural_image(112, 84, seed=1)
    rows = [(None, "hi"), (img, "describe the image")]
    inputs = dict(make_inputs(v, [r[0] for r in rows], [r[1] for r in rows]))
    with engine(v, NormTopK()) as eng:
        out = generate(m, inputs, n=4)
        assert eng.counts[0][0][0] == 0 and eng.counts[0][3][1] < eng.counts[0][0][1]
        recompute_check(m, inputs, out)
        for b, row in enumerate(rows):
            single = dict(make_inputs(v, [row[0]], [row[1]]))
            assert torch.equal(out.sequences[b, -4:], generate(m, single, n=4).sequences[0, -4:])


@pytest.mark.parametrize("attn", ATTNS)
def test_multi_token_continuation_on_pruned_cache(vlm, attn):
    """A later forward of several tokens on a pruned prompt's cache (chat continuation) == a no-cache recompute."""
    v = vlm("tiny-internvl", attn)  # plain 1-D positions: explicit position_ids are easy to give both runs
    m, inputs = v.model, make_batch(v)
    with engine(v, NormTopK()):
        out = generate(m, inputs, n=4)
        B, L = inputs["input_ids"].shape
        seq = torch.cat([out.sequences, torch.tensor([[5, 6, 7]] * B)], 1)
        am = torch.cat([inputs["attention_mask"], torch.ones(B, seq.shape[1] - L, dtype=torch.long)], 1)
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)  # what generate() used
        cont = forward(m, dict(input_ids=seq[:, L + 3:], attention_mask=am, position_ids=pos[:, L + 3:],
                               **hf.cache_kwargs(hf.output_cache(out)))).logits
        full = forward(m, dict(inputs, input_ids=seq, attention_mask=am, position_ids=pos), use_cache=False).logits
    assert hf.cache_lengths(hf.output_cache(out))[0] == seq.shape[1]
    assert (full[:, -4:] - cont).abs().max().item() <= TOL


def reference_logits(v, inputs, plan):
    """Brute force for one unpadded prompt: run the decoder layers by hand, after each layer of ``plan`` keep the
    listed ORIGINAL positions (and recycle with merge_value). plan: {layer: (kept visual orig positions, replace)}.
    -> logits Tensor[L', V] of the kept positions."""
    m = v.model
    lm = m.model.language_model
    cap = {}

    class Stop(Exception):
        pass

    def grab(mod, args, kw):
        cap["h"], cap["pe"] = (args[0] if args else kw["hidden_states"]), kw["position_embeddings"]
        raise Stop

    handle = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            m(**inputs)
    except Stop:
        pass
    finally:
        handle.remove()
    h, (cos, sin) = cap["h"], cap["pe"]
    L = h.shape[1]
    orig = torch.arange(L)
    visual = inputs["input_ids"][0] == m.config.image_token_id
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            n = h.shape[1]
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None,
                      use_cache=False)
            if i in plan:
                kept_vis, recycle = plan[i]
                keep = ~visual[orig] | torch.isin(orig, kept_vis)
                cur_vis = visual[orig].nonzero()[:, 0]
                kept_cur = cur_vis[torch.isin(orig[cur_vis], kept_vis)]
                dropped_cur = cur_vis[~torch.isin(orig[cur_vis], kept_vis)]
                if recycle and dropped_cur.numel():
                    t, val = merge_value(h[0], kept_cur, dropped_cur)
                    h = h.clone()
                    h[0, t] = val
                h, cos, sin, orig = h[:, keep], cos[:, keep], sin[:, keep], orig[keep]
        return m.lm_head(lm.norm(h))[0]


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", FAMILIES)
def test_matches_brute_force_reference_with_attention_and_replace(vlm, name, attn):
    v = vlm(name, attn)
    m, inputs = v.model, make_batch(v)
    pruner = AttnProbe(kinds={0: "text", 2: "last"}, ratios={0: 0.5, 2: 0.25}, replace=True)
    with engine(v, pruner):
        logits = forward(m, inputs).logits
    pad = (inputs["attention_mask"] == 0).sum(1)
    for b in range(2):
        plan = {}
        for step, keep in pruner.log:
            plan[step.layer] = (step.embeds_index[b, keep[b]] - pad[b], True)
        ref = reference_logits(vlm(name, "sdpa"), row_inputs(v, b), plan)
        assert (logits[b, -ref.shape[0]:] - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_rows_and_keys_match_eager(vlm, name):
    """Rows the wrapper computes beside sdpa (and beside eager) == eager's probabilities, with left padding,
    before and after a prune stage; keys == what the cache stored."""
    eager, sdpa = vlm(name, "eager"), vlm(name, "sdpa")
    inputs = make_batch(eager)
    ref = forward(eager.model, inputs, output_attentions=True).attentions
    kinds, ratios = {1: "text", 2: "last"}, {1: 0.5, 2: 1.0}
    logs = {}
    for v in (sdpa, eager):
        pruner = AttnProbe(kinds, ratios)
        with engine(v, pruner):
            out = forward(v.model, inputs, output_attentions=(v is eager), use_cache=True)
        logs[hf.attn_impl(v.model.config.text_config)] = pruner.log
        step1, step2 = pruner.log[0][0], pruner.log[1][0]
        assert step1.attn.dtype == torch.float32 and step1.attn.shape[:3] == (2, 4, step1.queries.shape[1])
        # stage 0: against the untouched eager model's probabilities
        want = ref[1].gather(2, step1.queries[:, None, :, None].expand(-1, 4, -1, ref[1].shape[-1]))
        assert (step1.attn - want).abs().max().item() <= 1e-5
        assert torch.equal(step2.keys, hf.output_cache(out).layers[2].keys)
        if v is eager:  # after pruning at layer 1: against eager's own probabilities on the compressed sequence
            a2 = out.attentions[2]
            want = a2.gather(2, step2.queries[:, None, :, None].expand(-1, 4, -1, a2.shape[-1]))
            assert a2.shape[-1] == step2.hidden.shape[1] < inputs["input_ids"].shape[1]
            assert (step2.attn - want).abs().max().item() <= 1e-5
    # the two backends saw the same probabilities at the same queries
    (s1, _), (s2, _) = logs["sdpa"][1], logs["eager"][1]
    assert torch.equal(s1.queries, s2.queries) and (s1.attn - s2.attn).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_text_only_prompt_untouched(vlm, name):
    v = vlm(name, "sdpa")
    m = v.model
    inputs = make_batch(v, image=False)
    ref, ref_gen = forward(m, inputs).logits, generate(m, inputs)
    pruner = NormTopK()
    with engine(v, pruner) as eng:
        assert torch.equal(forward(m, inputs).logits, ref)
        assert torch.equal(generate(m, inputs).sequences, ref_gen.sequences)
        assert eng.counts == [] and pruner.log == [] and len(eng._decodes) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_static_cache_refused_before_any_layer(vlm, name):
    v = vlm(name, "sdpa")
    m, inputs = v.model, make_batch(v)
    calls = []
    handle = m.model.language_model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for check in (False, True):  # the engine's own check (decoder-stack pre-hook), the adapter's early one
            with engine(v, RandomLLM(keep_ratio=0.5), check=check):
                cache = hf.new_static_cache(m.config.get_text_config(), max_cache_len=64)
                with pytest.raises(AdapterError, match="StaticCache.*DynamicCache"):
                    forward(m, inputs, **hf.cache_kwargs(cache))
                if check:
                    with pytest.raises(AdapterError, match="DynamicCache"):
                        generate(m, inputs, cache_implementation="static")
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", FAMILIES)
def test_undo_restores_everything(name, attn):
    v = build_model(name, attn=attn, seed=0)  # fresh model and a never-touched twin
    untouched = build_model(name, attn=attn, seed=0).model
    m, inputs = v.model, make_batch(v)
    ref = forward(untouched, inputs).logits
    assert torch.equal(forward(m, inputs).logits, ref)  # warm-up: transformers' lazy capture hooks
    before = impls(m), registries(), hook_snapshot(m)
    with engine(v, AttnProbe(ratios={1: 0.5, 2: 0.5})) as eng:
        assert eng.attn_name and hf.attn_impl(m.config.text_config) == eng.attn_name
        assert impls(m)[2] == before[0][2]  # the vision tower keeps its kernel
        assert hook_snapshot(m) != before[2]
        pruned = forward(m, inputs).logits
    assert pruned.shape[1] < inputs["input_ids"].shape[1]
    assert (impls(m), registries(), hook_snapshot(m)) == before
    assert all(not mod._forward_pre_hooks for mod in m.model.language_model.modules())
    assert torch.equal(forward(m, inputs).logits, ref)
    # also after an exception inside a forward (a pruner returning text positions)
    with pytest.raises(AdapterError, match="not visual"):
        with engine(v, Boom(keep_ratio=0.5)):
            forward(m, inputs)
    assert (impls(m), registries(), hook_snapshot(m)) == before
    assert torch.equal(forward(m, inputs).logits, ref)


# ------------------------------------------------------------------------------------------------------
# flash-attention design check: a CPU stand-in kernel that, like flash, accepts only 2-D padding masks or None
# ------------------------------------------------------------------------------------------------------
FAKE = "flash_attention_cpu_stand_in"


def fake_flash(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    assert hf.attn_impl(module.config) == FAKE  # the wrapper shows the kernel its own name
    assert attention_mask is None or attention_mask.dim() == 2
    B, H, Lq, d = query.shape
    K = key.shape[2]
    keyok = torch.ones(B, K, dtype=torch.bool) if attention_mask is None else attention_mask[:, -K:].bool()
    ok = (torch.arange(K)[None, :] <= torch.arange(Lq)[:, None] + (K - Lq))[None] & keyok[:, None, :]
    rep = H // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    s = (query @ k.transpose(2, 3)) * scaling
    p = s.masked_fill(~ok[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2).contiguous(), None


@pytest.fixture
def fake_flash_model(vlm):
    undo = hf.register_attention(FAKE, fake_flash, mask_like="flash_attention_2")
    v = build_model("tiny-qwen2-vl", attn="sdpa", seed=0)
    try:
        hf.set_text_attention(v.model, FAKE)
        yield v
    finally:
        hf.set_text_attention(v.model, "sdpa")
        undo()


def test_flash_style_kernel_gets_2d_masks_and_matches_sdpa(vlm, fake_flash_model):
    v, ref_v = fake_flash_model, vlm("tiny-qwen2-vl", "sdpa")
    inputs = make_batch(v)
    n_text = inputs["attention_mask"].sum(1) - (inputs["input_ids"] == v.model.config.image_token_id).sum(1)
    results = []
    for model_v in (ref_v, v):
        pruner = AttnProbe(ratios={1: 0.5, 2: 0.5})
        with engine(model_v, pruner) as eng:  # attention rows + keys through the wrapper
            assert ("flash" in eng.attn_name) == (model_v is v)
            logits = forward(model_v.model, inputs).logits
        with engine(model_v, NormTopK()):     # progressive, cached decoding (recompute-consistent pruner)
            out = generate(model_v.model, inputs, n=3)
            recompute_check(model_v.model, inputs, out)
        n_valid = [int(n_text[b]) + pruner.log[1][1][b].numel() for b in range(2)]  # real tokens after layer 2
        results.append((logits, out.sequences))
    (l1, s1), (l2, s2) = results
    assert torch.equal(s1, s2)
    for b in range(2):
        assert (l1[b, -n_valid[b]:] - l2[b, -n_valid[b]:]).abs().max().item() <= TOL
