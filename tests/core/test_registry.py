import importlib.metadata as md
import subprocess
import sys
import types
from pathlib import Path

import pluggy
import pytest

from tokcomp.config import StrategyConfig
from tokcomp.errors import AdapterError, ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.registry import DEFAULT_PLUGINS, Registry
from tokcomp.strategy import ViTCompressor


def _strategy(name, module):
    cls = type("Dup", (ViTCompressor,), {"name": name, "Config": StrategyConfig, "__module__": module})
    return cls


def _plugin(*classes):
    class P:
        @hookimpl
        def tokcomp_register(self, registry):
            for c in classes:
                registry.add_strategy(c)
    return P()


def test_builtins_are_registered_in_code_and_entry_points_are_for_third_parties():
    eps = [ep for ep in md.entry_points(group="tokcomp") if ep.dist and ep.dist.name == "tokcomp"]
    assert eps == []                                   # built-ins need no install-time metadata
    reg = Registry.load(group="tokcomp-test-empty")    # no entry point at all: every built-in is still there
    assert all(reg.pm.get_plugin(m) is not None for m in DEFAULT_PLUGINS)
    assert {c.name for c in reg.strategies()} >= {"random", "pool", "ipcv", "fastv", "dart"}
    assert {a.name for a in reg.adapters()} >= {"qwen2_vl", "internvl", "vit"}


def test_a_source_checkout_without_install_has_every_builtin():
    """plugins/ and adapters/ beside tokcomp/ are served as tokcomp.plugins / tokcomp.adapters with no install
    (the editable install's finder is removed, the checkout put first on sys.path)."""
    root = Path(__file__).resolve().parents[2]
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            f"sys.path.insert(0, {str(root)!r})\n"
            "for m in [m for m in sys.modules if m.startswith('tokcomp')]: del sys.modules[m]\n"
            "import warnings; warnings.simplefilter('ignore')\n"
            "import tokcomp\n"
            "r = tokcomp.default_registry()\n"
            "print(tokcomp.__file__, len(r.strategies()), sorted(a.name for a in r.adapters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    path, n, adapters = out.split(" ", 2)
    assert path == str(root / "tokcomp" / "__init__.py") and int(n) >= 13
    assert adapters.strip() == "['internvl', 'llava', 'qwen2_vl', 'vit']"


def test_two_plugins_registering_one_name_name_both_distributions():
    a, b = _strategy("twin", "pkg_alpha.strategies"), _strategy("twin", "pkg_beta.strategies")
    with pytest.raises(ConfigError) as e:
        Registry.load(group="tokcomp-test-empty", extra_plugins=(_plugin(a), _plugin(b)))
    msg = str(e.value)
    assert "'twin'" in msg and "pkg_alpha" in msg and "pkg_beta" in msg and "uninstall one" in msg


def test_a_plugin_whose_import_fails_warns_and_the_rest_loads(monkeypatch):
    good = md.EntryPoint("baselines", "tokcomp.plugins.baselines", "tokcomp")
    bad = md.EntryPoint("broken", "tokcomp_no_such_module_xyz", "tokcomp")
    monkeypatch.setattr(md, "entry_points", lambda group: [bad, good] if group == "tokcomp" else [])
    with pytest.warns(RuntimeWarning, match=r"plugin 'broken' .*failed to import.*No module named"):
        reg = Registry.load()
    assert "broken" in reg.failed
    assert {c.name for c in reg.strategies()} >= {"random", "pool"}


def test_misspelled_hookimpl_fails_loudly():
    class Typo:
        @hookimpl
        def tokcomp_registr(self, registry):  # noqa: D401 - misspelled on purpose
            pass
    with pytest.raises(pluggy.PluginValidationError):
        Registry.load(group="tokcomp-test-empty", extra_plugins=(Typo(),))


def test_add_strategy_rejects_non_strategies_and_bad_names():
    reg = Registry()
    with pytest.raises(TypeError):
        reg.add_strategy(int)
    with pytest.raises(ConfigError, match="invalid name"):
        reg.add_strategy(_strategy("", "x"))
    with pytest.raises(ConfigError, match="invalid name"):
        reg.add_strategy(_strategy("none", "x"))


def test_unknown_model_lists_supported_adapters(registry):
    with pytest.raises(AdapterError) as e:
        registry.resolve_adapter(object())
    assert "no tokcomp adapter supports object" in str(e.value) and "toy: ToyVLM" in str(e.value)


def test_resolution_hook_takes_priority(registry):
    class Mine:
        name = "mine"

    class Resolver:
        @hookimpl(tryfirst=True)
        def tokcomp_resolve_adapter(self, model, registry):
            return Mine if isinstance(model, types.SimpleNamespace) else None

    registry.register_plugin(Resolver())
    assert registry.resolve_adapter(types.SimpleNamespace()) is Mine
