"""Every error tokcomp raises names the problem and the fix."""


class TokcompError(Exception):
    """Base class of all tokcomp errors."""


class ConfigError(TokcompError, ValueError):
    """A strategy configuration is invalid (raised before any model work)."""


class SpecError(ConfigError):
    """A spec string or config file cannot be parsed."""


class UnknownStrategyError(ConfigError, KeyError):
    """No strategy of that name is registered."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterError(TokcompError):
    """No adapter supports the model, or the adapter cannot meet a strategy's needs."""


class SessionError(TokcompError, RuntimeError):
    """A session cannot be opened or used (e.g. a second concurrent session on one model)."""
