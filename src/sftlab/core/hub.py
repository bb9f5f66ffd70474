"""Whether the Hugging Face hub can be reached, and what of it is cached, decided in a moment.

Without this a hub id on an offline machine costs a minute of download retries before failing.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit


def hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be reached (``HF_HUB_OFFLINE`` set, or no connection within a few
    seconds), or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    return hub_unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=4)
def hub_unreachable(endpoint: str) -> str | None:
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=3).close()
    except OSError as exc:
        return f"no connection to {url.hostname}: {exc.strerror or exc}"
    return None


def hub_cached(name: str, filename: str) -> str | None:
    """The local snapshot folder of hub id ``name`` when ``filename`` of it is cached, else None."""
    try:
        from huggingface_hub import (
            try_to_load_from_cache,  # deferred: heavy library, imported on first use
        )

        found = try_to_load_from_cache(name, filename)
    except Exception:  # a malformed id or cache: treat as not cached
        return None
    return str(Path(found).parent) if isinstance(found, str) else None
