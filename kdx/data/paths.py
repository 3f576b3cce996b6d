"""Default locations."""

from __future__ import annotations

import os


def default_data_root() -> str:
    """Absolute path of ``../shared/data`` (relative to the working directory) if it exists, else of ``./data``."""
    shared = os.path.abspath(os.path.join(os.getcwd(), "..", "shared", "data"))
    if os.path.isdir(shared):
        return shared
    return os.path.abspath(os.path.join(os.getcwd(), "data"))
