"""Errors that reach the user as one clear message (main.py prints them without a traceback)."""


class ConfigError(ValueError):
    """A config value cannot work; the message names the field and what to use instead."""
