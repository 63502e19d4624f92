"""DART on synthetic steps: the choice equals a naive greedy loop over all visual tokens of the row."""
import math

import pytest
import torch

from llm_fakes import FakeLLM, fake_norm
from tokcomp.errors import ConfigError
from tokcomp.plugins.dart import DART

torch.set_num_threads(1)

ROWS = [
    ([("t", 3), ("v", (1, 3, 4)), ("t", 2), ("v", (1, 4, 3)), ("t", 6)], 21),  # two images: both count
    ([("t", 1), ("v", (2, 3, 2)), ("t", 3)], 22),                            # video, shorter row (padded)
    ([("t", 5)], 23),                                                      # text only
]


def naive_dart(l1, hidden, visual, text, n_keep, p_i, p_t):
    """DART's greedy loop with plain Python lists (deterministic order: key L1 desc, then index)."""
    cos = lambda a, b: sum(x * y for x, y in zip(a, b)) / (  # noqa: E731
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    by_norm = lambda idx: sorted(idx, key=lambda i: (-l1[i], i))  # noqa: E731
    img_piv = by_norm(visual)[:min(p_i, len(visual))]
    if n_keep <= len(img_piv) or p_i + p_t == 0:
        return sorted(by_norm(visual)[:n_keep])
    txt_piv = by_norm(text)[:min(p_t, len(text))]
    pivots = by_norm(img_piv + txt_piv)
    extra = n_keep - len(img_piv)
    quotas = [extra // len(pivots) + (1 if j < extra % len(pivots) else 0) for j in range(len(pivots))]
    pool = [i for i in visual if i not in img_piv]
    selected = list(img_piv)
    for p, quota in zip(pivots, quotas):
        ranked = sorted(pool, key=lambda i: (cos(hidden[p], hidden[i]), i))[:quota]
        selected += ranked
        pool = [i for i in pool if i not in ranked]
    return sorted(selected)


@pytest.mark.parametrize("ratio,norm,pivots", [(0.3, True, (4, 4)), (0.5, False, (4, 4)), (0.2, True, (2, 3)),
                                               (0.1, True, (0, 0))])
def test_choice_equals_naive_greedy_loop(ratio, norm, pivots):
    fake = FakeLLM(ROWS, n_layers=4)
    pruner = DART(keep_ratio=ratio, norm=norm, pivots_image=pivots[0], pivots_text=pivots[1])
    res = fake.run(pruner)
    (step, sel), = res.steps
    assert step.layer == 1 and step.keys is not None
    hidden = fake_norm(step.hidden) if norm else step.hidden
    for b in range(step.visual.shape[0]):
        l1 = step.keys[b].abs().sum(dim=(0, 2)).tolist()
        vis = step.visual[b].nonzero()[:, 0].tolist()
        first = vis[0] if vis else None
        text = [i for i in range(step.visual.shape[1]) if first is not None and i > first
                and bool(step.valid[b, i]) and not bool(step.visual[b, i])]
        k = min(pruner.config.keep_count(len(vis)), len(vis)) if vis else 0
        want = naive_dart(l1, hidden[b].tolist(), vis, text, k, *pivots) if vis else []
        assert sel.keep[b].tolist() == want
    # the second image of row 0 is a candidate like the first (the reference only saw the first span)
    span2 = set(step.spans[0][1].positions.tolist())
    assert span2 & set(sel.keep[0].tolist())


def test_counts_and_flags():
    fake = FakeLLM(ROWS, n_layers=5)
    pruner = DART(layer=3, keep_ratio=0.4)
    assert pruner.prune_layers(5) == [2] and pruner.attention_queries(2) is None
    res = fake.run(pruner)
    n0 = [int(r.visual.sum()) for r in fake.rows]
    for i in range(5):
        assert res.counts[i] == (n0 if i < 3 else [pruner.config.keep_count(n) if n else 0 for n in n0])
    assert pruner.needs_keys and not pruner.needs_attention_rows and pruner.flash_compatible


def test_keep_ratio_one_is_noop_and_batch_invariance():
    assert DART(keep_ratio=1.0).prune_layers(28) == []
    res = FakeLLM(ROWS, n_layers=4).run(DART(keep_ratio=0.3))
    step, _ = res.steps[0]
    sel = DART(keep_ratio=1.0).select(step, {})
    for b in range(step.visual.shape[0]):
        assert sel.keep[b].tolist() == step.visual[b].nonzero()[:, 0].tolist()
    for b, row in enumerate(ROWS):
        alone = FakeLLM([row], n_layers=4).run(DART(keep_ratio=0.3))
        assert torch.equal(res.kept[b], alone.kept[0])


def test_defaults_and_validation():
    d = DART()
    assert (d.config.layer, d.config.pivots_image, d.config.pivots_text, d.config.keep_ratio) == (2, 4, 4, 0.222)
    with pytest.raises(ConfigError):
        DART(layer=0)
    with pytest.raises(ConfigError, match="out of range"):
        DART(layer=6).validate({"llm": 6})
