"""Errors that reach the user as one clear message (main.py prints them without a traceback)."""


class UserError(ValueError):
    """A problem with the user's config, data or model files: one message, no traceback."""


class ConfigError(UserError):
    """A config value cannot work; the message names the field and what to use instead."""
