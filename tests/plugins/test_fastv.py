"""FastV on synthetic steps: the choice equals the top-k of a brute-force eager attention row."""
import math

import pytest
import torch

from llm_fakes import FakeLLM
from tokcomp.errors import ConfigError
from tokcomp.plugins.fastv import FastV

torch.set_num_threads(1)

ROWS = [
    ([("t", 3), ("v", (1, 3, 4)), ("t", 2), ("v", (1, 2, 3)), ("t", 5)], 11),  # two images in one row
    ([("t", 2), ("v", (2, 2, 2)), ("t", 4)], 12),                            # a 2-frame video, shorter row
    ([("t", 6)], 13),                                                      # text only
]


def naive_eager_last_row(row, layer: int) -> list[float]:
    """Head-mean softmax of the last token over all tokens of an unpruned row, by explicit loops."""
    _, q, k = row.layer(layer)
    n, heads, hd = q.shape
    rep = heads // k.shape[1]
    last = n - 1
    mean = [0.0] * n
    for h in range(heads):
        logits = [sum(float(q[last, h, d]) * float(k[j, h // rep, d]) for d in range(hd)) / math.sqrt(hd)
                  for j in range(n)]
        top = max(logits)
        ex = [math.exp(v - top) for v in logits]
        z = sum(ex)
        for j in range(n):
            mean[j] += ex[j] / z / heads
    return mean


@pytest.mark.parametrize("layer,ratio", [(2, 0.5), (1, 0.25), (3, 0.1)])
def test_choice_equals_topk_of_bruteforce_eager_row(layer, ratio):
    fake = FakeLLM(ROWS, n_layers=5)
    pruner = FastV(layer=layer, keep_ratio=ratio)
    res = fake.run(pruner)
    for b, row in enumerate(fake.rows):
        scores = naive_eager_last_row(row, layer - 1)
        vis = [i for i in range(row.n) if bool(row.visual[i])]
        k = min(pruner.config.keep_count(len(vis)), len(vis)) if vis else 0
        want = sorted(sorted(vis, key=lambda i: (-scores[i], i))[:k])
        assert res.kept[b].tolist() == want


def test_counts_one_shot_and_attention_queries():
    fake = FakeLLM(ROWS, n_layers=6)
    pruner = FastV(layer=2, keep_ratio=0.3)
    assert pruner.prune_layers(6) == [1]
    assert [pruner.attention_queries(i) for i in range(4)] == [None, "last", None, None]
    res = fake.run(pruner)
    n0 = [int(r.visual.sum()) for r in fake.rows]
    for i in range(6):
        want = n0 if i < 2 else [pruner.config.keep_count(n) if n else 0 for n in n0]
        assert res.counts[i] == want
    assert pruner.needs_attention_rows and not pruner.needs_keys and pruner.flash_compatible


def test_keep_ratio_one_is_noop():
    assert FastV(keep_ratio=1.0).prune_layers(28) == []
    fake = FakeLLM(ROWS, n_layers=4)
    res = fake.run(FastV(keep_ratio=0.5))
    step, _ = res.steps[0]
    sel = FastV(keep_ratio=1.0).select(step, {})
    for b in range(step.visual.shape[0]):
        assert sel.keep[b].tolist() == step.visual[b].nonzero()[:, 0].tolist()
    assert sel.replace is None


def test_num_tokens_and_batch_row_equals_single_run():
    pruner = FastV(num_tokens=5)
    both = FakeLLM(ROWS, n_layers=4).run(pruner)
    for b, row in enumerate(ROWS):
        alone = FakeLLM([row], n_layers=4).run(pruner)
        assert torch.equal(both.kept[b], alone.kept[0])
        assert torch.allclose(both.hidden[b], alone.hidden[0])
    assert [k.numel() for k in both.kept] == [5, 5, 0]


def test_config_validation():
    with pytest.raises(ConfigError):
        FastV(layer=0)
    with pytest.raises(ConfigError):
        FastV(keep_ratio=0.5, num_tokens=3)
    with pytest.raises(ConfigError, match="out of range"):
        FastV(layer=4).validate({"llm": 4})
    FastV(layer=3).validate({"llm": 4})
    assert FastV().config.keep_ratio == 0.5 and FastV().config.layer == 2
    assert FastV(layer=3, keep_ratio=0.25).spec == "fastv(keep_ratio=0.25,layer=3)"
