"""Load the `tokcomp` pytest plugin when the package is not installed (no `pytest11` entry point yet).

Once tokcomp is installed, the entry point registers the plugin under the name "tokcomp" and this is a no-op.
"""

import importlib


def pytest_configure(config):
    plugin = importlib.import_module("tokcomp.testing.pytest_plugin")
    pm = config.pluginmanager
    if not pm.is_registered(plugin) and pm.get_plugin("tokcomp") is None:
        pm.register(plugin, "tokcomp")
