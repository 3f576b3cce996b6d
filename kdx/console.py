"""What a run prints: one line per event, no advertisements.

Lightning attaches its own console handler to the ``lightning`` logger (``lightning/__init__.py``, always) and to
``lightning.pytorch``/``lightning.fabric`` when the root logger has none yet; under Hydra, whose handler sits on
the root logger, every Lightning line then printed twice. :func:`one_line_per_event` leaves one handler (the
root's) when the root has one, drops Lightning's "Tip: ... litlogger/litmodels" advertisements, and silences a
deprecation warning Lightning itself triggers on every fit with this torch (``LeafSpec``), which a user cannot act
on.
"""
from __future__ import annotations

import importlib
import logging
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _NoAdvertisement(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("💡 Tip:") or "litlogger" in msg or "litmodels" in msg)


_FILTER = _NoAdvertisement()


def one_line_per_event() -> None:
    """Idempotent; call it after logging is configured (Hydra does that before a job starts)."""
    importlib.import_module("lightning")  # its import adds the handlers removed here

    has_root_handler = bool(logging.getLogger().handlers)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if has_root_handler:
            logger.handlers.clear()
            logger.propagate = True
        for target in (logger, *logger.handlers):
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _FILTER not in rank_zero.filters:
        rank_zero.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


__all__ = ["one_line_per_event"]
