"""Exceptions raised by estinet, so that callers can catch the library's errors in one place."""


class EstinetError(Exception):
    """Base class of every error that estinet raises on purpose."""


class ConfigError(EstinetError, ValueError):
    """Invalid or inconsistent configuration value."""


class DataError(EstinetError, RuntimeError):
    """Missing, corrupt or inconsistent data files."""


class CheckpointError(EstinetError, RuntimeError):
    """Missing, unreadable or incompatible checkpoint file."""
