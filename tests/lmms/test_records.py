"""Per-document seeds, the de-duplicated gathering of records across ranks, and the summary arithmetic."""
from __future__ import annotations

import pytest

import tokcomp
from tokcomp.lmms import records, seeding


def test_document_seeds_depend_on_run_seed_task_and_document_only():
    s = seeding.mix(0, "mme", 7)
    assert s == seeding.mix(0, "mme", 7) and 0 <= s < 2 ** 31
    assert len({s, seeding.mix(1, "mme", 7), seeding.mix(0, "gqa", 7), seeding.mix(0, "mme", 8)}) == 4
    assert seeding.mix(0, "mme", 7) == 1647788139          # the same in every process, on every machine


def test_seed_fields_are_derived_per_document_and_other_strategies_kept():
    pair = tokcomp.parse_spec("random(keep_ratio=0.5,seed=3)+dart(keep_ratio=0.35)")
    a, b = seeding.seeded_pair(pair, "t", 0), seeding.seeded_pair(pair, "t", 1)
    assert a.vision.config.seed == seeding.mix(3, "t", 0) != b.vision.config.seed
    assert a.llm is pair.llm and pair.vision.config.seed == 3
    assert a.vision.config.keep_ratio == 0.5
    plain = tokcomp.parse_spec("pool(keep_ratio=0.5)+dart")
    assert seeding.seeded_pair(plain, "t", 0) is plain


def test_document_rng_is_seeded_inside_and_restored_after():
    import torch
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    with seeding.document_rng(11):
        x = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)
    with seeding.document_rng(11):
        assert torch.equal(torch.rand(3), x)


class _FakeDist:
    """torch.distributed for ``gather`` as seen from rank ``rank`` of a group whose ranks hold ``held``."""

    def __init__(self, rank: int, held: list[dict]):
        self.rank, self.held = rank, held

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return len(self.held)

    def get_rank(self):
        return self.rank

    def gather_object(self, obj, parts, dst=0):
        assert obj == list(self.held[self.rank].items())
        if self.rank == dst:
            parts[:] = [list(h.items()) for h in self.held]


def test_records_are_gathered_on_rank_zero_once_per_document():
    held = [{("t", 0): {"v": "r0"}, ("t", 2): {"v": "r0"}},
            {("t", 1): {"v": "r1"}, ("t", 2): {"v": "r1-copy"}}]
    merged = records.gather(held[0], _FakeDist(0, held))
    assert merged == {("t", 0): {"v": "r0"}, ("t", 2): {"v": "r0"}, ("t", 1): {"v": "r1"}}
    assert records.gather(held[1], _FakeDist(1, held)) is None
    assert records.gather(held[0], None) == held[0]


def test_the_summary_averages_documents_and_sums_for_ratios():
    recs = [{"visual_tokens": 100, "visual_tokens_llm": 25.0, "tflops_total": 1.0, "tflops_unmodified": 2.0},
            {"visual_tokens": 300, "visual_tokens_llm": 75.0, "tflops_total": 3.0, "tflops_unmodified": 4.0}]
    s = records.summarize(recs)
    assert s["docs"] == 2 and s["visual_tokens"] == 200 and s["visual_tokens_llm"] == 50
    assert s["visual_keep"] == pytest.approx(0.25) and s["tflops_ratio"] == pytest.approx(4 / 6)
    assert "kv_ratio" not in s
    per = records.by_task({("a", 0): recs[0], ("b", 0): recs[1]})
    assert set(per) == {"a", "b", "all"} and per["all"] == s
    assert "| a | 1 |" in records.table(per, "pool") and "| all | 2 |" in records.table(per, "pool")
