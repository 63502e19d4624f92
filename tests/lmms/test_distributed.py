"""Two CPU processes (torchrun, gloo) give the same per-document results as one process.

The two-process run is lmms-eval's own CLI under torchrun (the documented multi-GPU command, on CPU); the
one-process run is ``simple_evaluate`` in this process. Five documents over two ranks make lmms-eval pad rank 1 with a
copy of its last request; sampling (temperature 1) and a random pair make any per-process seeding show.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

SPEC = "random(keep_ratio=0.5)+random(keep_ratio=0.5)"
GEN = "temperature=1.0,do_sample=true"
_TIMES = {"vision_s", "prefill_s", "ttft_s", "decode_s_per_token", "generate_s"}


def _per_doc(samples: list[dict]) -> dict:
    out = {}
    for s in samples:
        tc = s["token_counts"][0]
        answer = s["filtered_resps"]                    # the file keeps one answer as a string
        out[s["doc_id"]] = (answer[0] if isinstance(answer, list) else answer, tc["input_tokens"], tc["output_tokens"],
                            {k: v for k, v in tc["tokcomp"].items() if k not in _TIMES})
    return out


def test_two_processes_give_the_one_process_results(demo_task, evaluate, lmms_home, tmp_path):
    paths = demo_task("tiny-qwen2-vl", docs=5)
    one = evaluate(paths, SPEC, gen_kwargs=GEN)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmms_eval", "--model", "tokcomp",
           "--model_args", f'pretrained={paths["model"]},compress="{SPEC}"',
           "--tasks", "tokcomp_demo", "--include_path", str(paths["tasks"]), "--batch_size", "1",
           "--gen_kwargs", GEN, "--log_samples", "--output_path", str(out), "--verbosity", "WARNING"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    results = [json.loads(p.read_text()) for p in Path(out).glob("*/*_results.json")]
    assert len(results) == 1, log[-4000:]                   # the CLI exits 0 after failures: the file is the proof
    samples = [json.loads(line) for p in Path(out).glob("*/*_samples_tokcomp_demo.jsonl")
               for line in p.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3, 4]
    assert _per_doc(samples) == _per_doc(one["samples"]["tokcomp_demo"])
    thr = results[0]["throughput"]
    assert thr["avg_tokcomp_docs"] == 5                      # rank 1's padding copy of doc 3 is not counted
    assert thr["avg_tokcomp_visual_tokens_llm"] == pytest.approx(one["throughput"]["avg_tokcomp_visual_tokens_llm"])
    assert thr["total_gen_tokens"] == one["throughput"]["total_gen_tokens"]
    assert log.count(f"tokcomp `{SPEC}`") == 1                # the summary is printed once, by rank 0
    assert SPEC in results[0]["config"]["model_args"]
