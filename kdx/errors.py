"""kdx's error types (a leaf module: it imports nothing from kdx).

Every one of them carries a message that names the setting to change; the command line prints that
message as one line and exits with status 1 (:mod:`kdx.cli`), without a traceback.
"""
from __future__ import annotations


class KdxError(Exception):
    """Base class of the errors kdx reports as one line naming the setting to change."""


class ConfigError(KdxError, ValueError):
    """A setting that is unknown, misspelt, unused by this run, or has an impossible value."""


class CheckpointError(KdxError, RuntimeError):
    """A checkpoint or stored artifact that cannot be used; the message names the file and what to change."""


class NonFiniteLossError(KdxError, RuntimeError):
    """The loss became NaN/inf: the run stops (the message names the step range, the term and how to resume)."""


class LoggerStartError(KdxError, RuntimeError):
    """The configured logger could not start (logger=...)."""


__all__ = ["CheckpointError", "ConfigError", "KdxError", "LoggerStartError", "NonFiniteLossError"]
