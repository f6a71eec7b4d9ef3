"""Where hyperdas keeps what it derives once and reuses: converted target weights, filtered datasets."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HYPERDAS_CACHE"


def cache_root() -> Path:
    """The cache folder: $HYPERDAS_CACHE, else $XDG_CACHE_HOME/hyperdas, else ~/.cache/hyperdas."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hyperdas"
