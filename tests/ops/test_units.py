"""tokcomp.ops.units against brute-force loops."""
import torch

from tokcomp.ops.matching import Match
from tokcomp.ops.units import unit_features, unit_keep_rows, unit_match_rows

torch.set_num_threads(1)


def _rows():
    # 5 units of 4 rows scattered over 23 rows (rows 0, 11, 22 belong to no unit, like CLS tokens)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0)) + 1
    perm[perm >= 11] += 1
    return perm.view(5, 4)


def test_unit_features():
    x = torch.randn(23, 3, generator=torch.Generator().manual_seed(1))
    rows = _rows()
    mean, cat = unit_features(x, rows), unit_features(x, rows, "cat")
    for u in range(5):
        torch.testing.assert_close(mean[u], sum(x[r] for r in rows[u].tolist()) / 4)
        assert torch.equal(cat[u], torch.cat([x[r] for r in rows[u].tolist()]))


def test_unit_match_rows_and_keep_rows():
    rows = _rows()
    m = unit_match_rows(Match(torch.tensor([3, 0]), torch.tensor([1, 4]), torch.empty(0, dtype=torch.long)), rows, 23)
    pairs = {}
    for su, du in ((3, 1), (0, 4)):
        for j in range(4):
            pairs[int(rows[su, j])] = int(rows[du, j])
    assert m.src.tolist() == sorted(pairs) and m.dst.tolist() == [pairs[s] for s in sorted(pairs)]
    assert m.keep.tolist() == [r for r in range(23) if r not in pairs]
    always = torch.zeros(23, dtype=torch.bool)
    always[[0, 11]] = True
    keep = unit_keep_rows(torch.tensor([2, 4]), rows, 23, always)
    assert keep.tolist() == sorted(rows[[2, 4]].reshape(-1).tolist() + [0, 11])
