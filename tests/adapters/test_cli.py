"""The CLI end to end on the embedded tiny models."""
import json

from tokcomp.cli import main


def test_schema_of_a_name_on_both_stages(capsys):
    assert main(["schema", "random"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"vision", "llm"} and "keep_ratio" in out["llm"]["properties"]
    assert main(["schema", "fastv"]) == 0
    assert json.loads(capsys.readouterr().out)["properties"]["layer"]["default"] == 2
    assert main(["schema", "fastvv"]) == 2
    assert "Did you mean 'fastv'" in capsys.readouterr().err


def test_list_shows_every_strategy_and_adapter(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ipcv", "tome", "tofu", "dart_vit", "luvc_oim", "dart", "fastv", "v2drop", "sparsevlm", "luvc_spu",
                 "random", "pool", "qwen2_vl", "internvl", "vit"):
        assert f"\n{name} " in "\n" + out


def test_run_prints_answers_counts_and_times(capsys):
    assert main(["run", "--spec", "pool(keep_ratio=0.25)+random(keep_ratio=0.5)", "--repeats", "1",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "unmodified" in out and "with spec" in out and "visual tokens to LLM" in out
    assert "entering each layer" in out


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--model", "tiny-internvl", "--pairs", "pool+random,none+fastv", "--keep", "0.5",
                 "--repeats", "1", "--new-tokens", "3", "--quiet", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| none |" in table and "| pool+random | 0.5 |" in table and "error" not in table
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["spec"]: r for r in data["rows"]}
    assert set(rows) == {"none", "pool(keep_ratio=0.5)+random(keep_ratio=0.5)", "none+fastv(keep_ratio=0.5)"}
    base = rows["none"]
    for spec, r in rows.items():
        assert r["error"] is None and r["tflops"] > 0 and r["kv_mb"] > 0
        if spec != "none":   # fewer visual tokens: fewer FLOPs and a smaller cache than the unmodified model
            assert r["tflops"] < base["tflops"] and r["kv_mb"] < base["kv_mb"]
    assert data["meta"]["torch"] and (tmp_path / "bench.png").stat().st_size > 1000
