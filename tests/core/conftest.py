import pytest

from tokcomp.hookspecs import hookimpl
from tokcomp.registry import Registry


class _ToyPlugin:
    @hookimpl
    def tokcomp_register(self, registry):
        from toymodel import ToyAdapter
        registry.add_adapter(ToyAdapter)


@pytest.fixture
def registry():
    """The installed plugins plus the toy adapter (a fresh registry per test)."""
    return Registry.load(extra_plugins=(_ToyPlugin(),))
