"""Bad input to ``--model tokcomp`` fails when the model is built: before any data loads, and where the input alone
shows the problem, before any weight is read."""
from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")

from tokcomp.errors import ConfigError, SpecError, UnknownStrategyError  # noqa: E402
from tokcomp.lmms import loading  # noqa: E402


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if lmms-eval loads any dataset."""
    import datasets

    def boom(*a, **k):
        raise AssertionError("a dataset was loaded before the bad input was refused")
    monkeypatch.setattr(datasets, "load_from_disk", boom)
    monkeypatch.setattr(datasets, "load_dataset", boom)


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any checkpoint is read."""
    def boom(*a, **k):
        raise AssertionError("weights were read before the bad input was refused")
    monkeypatch.setattr(loading, "load_checkpoint", boom)


@pytest.mark.parametrize("compress, error, words", [
    ("nosuch(keep_ratio=0.5)", UnknownStrategyError, ["nosuch"]),
    ("ipcv(keep_ratio=1.5)", ConfigError, ["keep_ratio"]),
    ("ipcv(keep_ratio=0.35", SpecError, ["comma", "quote"]),
    ("", SpecError, ["compress=none"]),
])
def test_a_bad_spec_fails_before_weights_and_data(demo_task, evaluate, no_data, no_weights, compress, error, words):
    with pytest.raises(error) as e:
        evaluate(demo_task(), compress)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_an_unquoted_spec_cut_by_lmms_eval_names_the_quoting(demo_task, evaluate, no_data, no_weights):
    paths = demo_task()
    with pytest.raises(SpecError) as e:     # what the shell hands over without the inner quotes
        evaluate(paths, None, f"pretrained={paths['model']},compress=ipcv(keep_ratio=0.35,prune_layer=2)+dart")
    msg = str(e.value)
    assert "cut at a comma" in msg and "prune_layer=2)+dart" in msg and "compress=\"ipcv" in msg


def test_a_spec_the_model_cannot_serve_fails_after_loading_before_data(demo_task, evaluate, no_data):
    with pytest.raises(ConfigError, match="prune_layer=9"):          # the tiny tower has 4 blocks
        evaluate(demo_task(), "ipcv(keep_ratio=0.35,prune_layer=9)")


def test_fsdp_is_refused_with_the_reason_before_weights(demo_task, evaluate, no_data, no_weights, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError) as e:
        evaluate(demo_task(), "none")
    msg = str(e.value)
    assert "FSDP" in msg and "lockstep" in msg and "--num_processes" in msg


@pytest.mark.parametrize("kind, ok", [("FSDP", False), ("DEEPSPEED", False), ("MEGATRON_LM", False),
                                      ("XLA", False), ("NO", True), ("MULTI_GPU", True), ("MULTI_CPU", True)])
def test_only_data_parallel_launches_pass(kind, ok):
    from accelerate import DistributedType
    if ok:
        loading.check_parallelism(DistributedType[kind], env={})
    else:
        with pytest.raises(ConfigError, match="--num_processes N"):
            loading.check_parallelism(DistributedType[kind], env={})


def test_batch_size_and_unknown_arguments_are_refused(demo_task, evaluate, no_data, no_weights):
    from tokcomp.lmms.model import TokcompChat
    with pytest.raises(ConfigError, match="--batch_size 1"):
        TokcompChat(pretrained=str(demo_task()["model"]), compress="none", batch_size=4)
    with pytest.raises(ConfigError, match="unknown model_args.*keep_ratio"):
        evaluate(demo_task(), "none", model_args="keep_ratio=0.5")


def test_quotes_around_a_spec_are_taken_off():
    assert loading.parse_compress('"pool(keep_ratio=0.5)+dart(keep_ratio=0.35)"').spec == \
        loading.parse_compress("pool(keep_ratio=0.5)+dart(keep_ratio=0.35)").spec
    assert loading.parse_compress("'none'").spec == "none"


def test_a_spec_file_is_read(tmp_path):
    f = tmp_path / "pair.yaml"
    f.write_text("vision: {name: pool, keep_ratio: 0.5}\nllm: {name: dart, keep_ratio: 0.35}\n")
    assert loading.parse_compress(str(f)).spec.startswith("pool(keep_ratio=0.5)+dart(")
    with pytest.raises(SpecError, match="no such spec file"):
        loading.parse_compress(str(tmp_path / "missing.yaml"))


class _Accel:
    def __init__(self, n: int, device: str):
        self.num_processes, self.device = n, device


def test_each_rank_uses_its_own_device():
    import torch
    assert loading.local_device("cuda:0", _Accel(2, "cpu")) == torch.device("cpu")     # --device is one GPU for all
    assert loading.local_device(None, _Accel(1, "cpu")) == torch.device("cpu")
    assert loading.local_device("cpu", _Accel(1, "cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            loading.local_device("cuda:0", _Accel(1, "cpu"))


def test_the_demo_cli_refuses_bad_arguments_with_one_line(tmp_path, capsys):
    from tokcomp.lmms import demo
    assert demo.main([str(tmp_path), "--model", "qwen2-vl-2b-shaped"]) == 2
    assert demo.main([str(tmp_path), "--docs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a tiny preset" in err[0] and "--docs" in err[1]
    assert not any(tmp_path.iterdir())                           # nothing written
