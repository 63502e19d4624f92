"""Regressions of the transformers 5.24 break (the decoder cache keyword was renamed to ``cache``).

Each test is one symptom users met on 5.24 with the 5.23-era code; the suite runs on both ends of the tested range
(scripts/test.sh), so each holds on the lowest and on the newest supported transformers. Truths: a no-cache
recompute over the same kept set, the same row run alone, the prompt's own visual-token count, the documented
refusals, and an empty warning log.
"""
from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tokcomp
from tokcomp.adapters import _hf as hf
from tokcomp.errors import AdapterError
from tokcomp.testing import default_images, make_inputs
from tokcomp.testing import invariants as inv
from tokcomp.testing import matrix

FAMILIES = matrix.presets()
REPO = Path(__file__).resolve().parents[2]


def _visual_counts(vlm, inputs) -> list[int]:
    cfg = vlm.model.config
    ids = {cfg.image_token_id, getattr(cfg, "video_token_id", None)} - {None}
    vis = torch.isin(inputs["input_ids"], torch.tensor(sorted(ids))) & inputs["attention_mask"].bool()
    return vis.sum(1).tolist()


# -- generate() with an LLM pruner: padded batches (sdpa, eager), one unpadded row (eager) ------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_generate_with_an_llm_pruner_decodes_like_a_recompute(tiny_vlm_factory, name, attn):
    vlm = tiny_vlm_factory(name, attn=attn)
    inv.check_cached_decoding_matches_recompute(vlm, "none+random(keep_ratio=0.5)")
    inv.check_cached_decoding_matches_recompute(vlm, "none+random(keep_ratio=0.5)", prompts=[default_images()[0]])


# -- a unit vision compressor on a left-padded batch: padded rows (text-only rows too) decode as alone -------
@pytest.mark.parametrize("name", FAMILIES)
def test_pool_on_a_padded_batch_decodes_each_row_as_alone(tiny_vlm_factory, name):
    vlm = tiny_vlm_factory(name)
    inv.check_rows_match_alone(vlm, "pool(keep_ratio=0.5)+none")
    inv.check_cached_decoding_matches_recompute(vlm, "pool(keep_ratio=0.5)+none")


# -- the report describes the prefill, not the last decode step -------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_report_after_generate_describes_the_prefill(tiny_vlm_factory, name):
    vlm = tiny_vlm_factory(name)
    inputs = make_inputs(vlm, inv.default_prompts())
    want = _visual_counts(vlm, inputs)
    assert sum(want) > 0
    with tokcomp.compress(vlm.model, "none+random(keep_ratio=0.5)") as s, torch.no_grad():
        vlm.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(s.report.prefill) == 1                       # three decode steps are not prefills
    last = s.report.last
    assert last.llm_in == want
    assert last.llm_layers[0] == want and last.llm_layers[3] == [round(n * 0.5) for n in want]
    summary = s.report.summary()
    assert summary["llm_in"] == want and set(summary["llm_layers"]) == set(range(4))
    assert len(s.report.times.prefill) == 1 and len(s.report.times.decode) == 3


def test_tokcomp_run_prints_the_prefill_counts(capsys):
    from tokcomp.cli import main
    assert main(["run", "--spec", "none+random(keep_ratio=0.5)", "--repeats", "1", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    n = int(re.search(r"LLM visual tokens\s+in \[(\d+)\]", out).group(1))
    assert n > 0
    layers = re.search(r"entering each layer (.*)", out).group(1).split()
    assert layers[0] == f"0:{n}" and layers[-1] == f"3:{round(n * 0.5)}"


# -- refusals: a static cache, new images on a filled cache ----------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_static_cache_is_refused_by_name(tiny_vlm_factory, name):
    vlm = tiny_vlm_factory(name)
    for spec in ("none+random(keep_ratio=0.5)", "pool(keep_ratio=0.5)+none"):
        inv.check_static_cache_refused(vlm, spec)
        inputs = make_inputs(vlm, inv.default_prompts())
        with tokcomp.compress(vlm.model, spec), torch.no_grad():
            with pytest.raises(AdapterError, match="DynamicCache"):
                vlm.model(**inputs, **hf.cache_kwargs(hf.new_static_cache(vlm.model.config.get_text_config(), 96)))


@pytest.mark.parametrize("name", FAMILIES)
def test_new_images_on_a_filled_cache_are_refused(tiny_vlm_factory, name):
    vlm = tiny_vlm_factory(name)
    inputs = make_inputs(vlm, [default_images()[0]])
    with tokcomp.compress(vlm.model, "pool(keep_ratio=0.5)+none"), torch.no_grad():
        cache = hf.output_cache(vlm.model(**inputs, use_cache=True))
        assert hf.cache_length(cache) > 0
        with pytest.raises(AdapterError, match="cache"):
            vlm.model(**inputs, **hf.cache_kwargs(cache))


# -- quiet: no warnings from our own calls --------------------------------------------------------------------
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.mark.parametrize("name", FAMILIES)
def test_a_session_emits_no_warnings(tiny_vlm_factory, name):
    vlm = tiny_vlm_factory(name)
    inputs = make_inputs(vlm, inv.default_prompts())
    log, logger = _Collect(), logging.getLogger("transformers")
    logger.addHandler(log)
    once = getattr(logging.Logger, "warning_once", None)      # transformers' warn-once memo: let it fire again
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            with tokcomp.compress(vlm.model, "ipcv(keep_ratio=0.5,prune_layer=1,stabilize_layers=2)+fastv(keep_ratio=0.5)"
                                  if name != "tiny-internvl" else "tome(keep_ratio=0.5)+dart(keep_ratio=0.5)") as s:
                out = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
                vlm.model(**inputs, use_cache=True)
                vlm.model(**inputs, use_cache=False)
            s.report.summary()
            hf.output_cache(out)
    finally:
        logger.removeHandler(log)
    assert [str(w.message) for w in caught] == []
    assert [m for m in log.records if "deprecat" in m.lower()] == []


def test_tokcomp_run_prints_no_warnings_in_a_fresh_process():
    """A fresh interpreter, so transformers' warn-once messages are not already spent by other tests."""
    proc = subprocess.run([sys.executable, "-m", "tokcomp.cli", "run", "--spec", "pool(keep_ratio=0.5)+fastv",
                           "--repeats", "1", "--max-new-tokens", "2"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "" and "warn" not in proc.stdout.lower()


# -- the seam and the declared range ------------------------------------------------------------------------
def test_declared_range_is_the_tested_range():
    text = (REPO / "pyproject.toml").read_text()
    declared = re.search(r'"transformers([^"]*)"', text).group(1)
    assert declared == hf.TESTED_RANGE
    assert hf.in_tested_range(hf.LOWEST) and hf.in_tested_range(hf.NEWEST)
    assert re.search(rf"^LOWEST={re.escape(hf.LOWEST)}\s", (REPO / "scripts" / "test.sh").read_text(), re.M)
    assert hf.in_tested_range(hf.installed_version())


def test_an_untested_version_warns_once_naming_the_range(monkeypatch, tiny_vlm_factory):
    vlm = tiny_vlm_factory("tiny-qwen2-vl")
    monkeypatch.setattr(hf, "installed_version", lambda: "9.0.0")
    hf._warn_untested.cache_clear()
    try:
        with pytest.warns(hf.UntestedTransformersWarning, match=re.escape(hf.TESTED_RANGE)) as rec:
            for _ in range(2):
                with tokcomp.compress(vlm.model, "none"):
                    pass
        assert len(rec) == 1
    finally:
        hf._warn_untested.cache_clear()


def test_no_file_outside_the_seam_names_transformers_private_names():
    """Every transformers keyword that moved and every private attribute goes through adapters/_hf.py."""
    names = ["past_" + "key_values", "cache_" + "params", "_attn_" + "implementation", "_global_" + "mapping",
             "_from_" + "config"]
    banned = re.compile("|".join(rf"(?<![A-Za-z0-9]){n}" for n in names))
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or rel == Path("adapters/_hf.py") or "site-packages" in rel.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if banned.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []


def test_quiet_loading_drops_loading_bars_and_passes_other_stderr_on(capsys):
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging
    with hf.quiet_loading():
        assert not hf_logging.is_progress_bar_enabled()
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        print("a real message", file=sys.stderr)
    assert hf_logging.is_progress_bar_enabled()
    assert capsys.readouterr().err == "a real message\n"
