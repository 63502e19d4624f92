"""Every CLI user error ends with exit status 2 and one line on stderr, before any model work; a benchmark that
compared nothing or whose every row failed exits non-zero."""
from __future__ import annotations

import pytest

from tokcomp import cli
from tokcomp.cli import main

CASES = [
    (["run", "--spec", "missing.yaml"], "spec file 'missing.yaml' does not exist"),
    (["run", "--spec", "IPCV(keep_ratio=0.5)"], "Did you mean 'ipcv'"),
    (["run", "--spec", "fastv(keep_ratio=true)"], "keep_ratio=true holds a boolean"),
    (["run", "--model", "."], "is not a checkpoint folder"),
    (["run", "--model", "no/such/dir"], "does not exist"),
    (["run", "--image", "missing.png"], "--image 'missing.png' does not exist"),
    (["run", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["run", "--repeats", "0"], "--repeats: must be >= 1"),
    (["run", "--size", "0", "0"], "--size: must be >= 1"),
    (["run", "--attn", "bogus"], "--attn 'bogus' is not an attention implementation"),
    (["bench", "--keep", "abc"], "'abc' is not a number"),
    (["bench", "--keep", "1.5"], "not in (0, 1]"),
    (["bench", "--new-tokens", "0"], "--new-tokens: must be >= 1"),
    (["bench", "--repeats", "-1"], "--repeats: must be >= 1"),
    (["bench", "--pairs", ""], "names no configuration"),
    (["bench", "--model", "tiny-qwen2-vl", "--pairs", ""], "names no pair"),
    (["bench", "--pairs", "fastv+tome+dart"], "3 parts"),
    (["bench", "--out", "/proc/no/such/folder"], "is not a writable folder"),
    (["schema", "nope"], "unknown strategy 'nope'"),
    (["frobnicate"], "invalid choice"),
]


@pytest.fixture
def no_model_work(monkeypatch):
    """Any model construction fails the test: errors must be found before any model work."""
    import tokcomp.testing

    def refuse(*a, **k):
        raise AssertionError("a model was built before the input error was found")
    tokcomp.testing.build_model               # resolve the lazy export first, so the patch below is undone cleanly
    monkeypatch.setattr("tokcomp.testing.build_model", refuse)
    monkeypatch.setattr("tokcomp.testing.models.build_model", refuse)
    monkeypatch.setattr("tokcomp.run.load", refuse)


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a) or "empty" for a, _ in CASES])
def test_user_errors_exit_2_with_one_line(capsys, no_model_work, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert message in lines[0] and " error: " in lines[0], lines[0]


def test_help_of_every_command_works(capsys):
    for argv in (["--help"], ["run", "--help"], ["bench", "--help"], ["bench-fidelity", "--help"]):
        assert main(argv) == 0, argv
        assert "usage" in capsys.readouterr().out.lower()


def test_a_bench_whose_every_row_failed_exits_non_zero(tmp_path, capsys):
    """IPCV's InternVL3 default (prune before block 7) does not fit the 4-block tiny tower: every compressed row
    fails when its session is built; the table says so and the exit status is 1."""
    rc = main(["bench", "--model", "tiny-internvl", "--pairs", "ipcv", "--keep", "0.5", "--repeats", "1",
               "--new-tokens", "2", "--quiet", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1 and "error" in out and "every compressed configuration failed" in err
    assert (tmp_path / "bench.json").is_file()


def test_usage_error_type_is_a_tokcomp_error():
    assert issubclass(cli.UsageError, Exception) and cli.UsageError("x", "tokcomp run").prog == "tokcomp run"
