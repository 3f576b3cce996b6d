"""Sweeps: folder names (:mod:`.folders`), skip/resume (:mod:`.resume`), DDP under launchers (:mod:`.launch`)."""
