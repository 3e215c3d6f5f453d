"""Errors a user can cause. The CLI prints them as one line and exits 2, never a traceback."""


class DitpipeError(Exception):
    """A problem with the user's input, config or artifacts, with a message that names it."""


class ConfigError(DitpipeError, ValueError):
    """A bad key or value in params.yaml or an override."""
