"""Errors every layer may raise, in a module that imports nothing (data and core code use it too)."""


class ConfigError(ValueError):
    """A config value a run cannot start with. The command line shows it as one line, no traceback."""
