"""Default locations (data, the teacher store, caches); a leaf module.

User-level by default, so a run from any folder finds the same teachers and caches; each one has an
environment variable (and a ``paths.*`` setting) to move it:

- ``KDX_TEACHERS`` → ``paths.teachers``: the teacher store (default ``~/.kdx/teachers``);
- ``KDX_CACHE`` → ``paths.cache_dir``: decoded array files and teacher-logit caches (default ``~/.cache/kdx``);
- ``KDX_DATA`` → ``paths.data_dir``: datasets (default ``../shared/data`` when that folder exists, else ``./data``).
"""

from __future__ import annotations

import os


def default_data_root() -> str:
    """``$KDX_DATA``, else the absolute path of ``../shared/data`` (from the working folder) if it exists, else of
    ``./data``."""
    if os.environ.get("KDX_DATA"):
        return os.path.abspath(os.path.expanduser(os.environ["KDX_DATA"]))
    shared = os.path.abspath(os.path.join(os.getcwd(), "..", "shared", "data"))
    if os.path.isdir(shared):
        return shared
    return os.path.abspath(os.path.join(os.getcwd(), "data"))


def default_teachers_dir() -> str:
    """``$KDX_TEACHERS``, else ``~/.kdx/teachers``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("KDX_TEACHERS") or os.path.join("~", ".kdx", "teachers")))


def default_cache_dir() -> str:
    """``$KDX_CACHE``, else ``~/.cache/kdx``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("KDX_CACHE") or os.path.join("~", ".cache", "kdx")))


__all__ = ["default_cache_dir", "default_data_root", "default_teachers_dir"]
