"""Finished work by content key (the checkpoint's sha256 and the options that change a result), so a rerun after
Ctrl-C or kill -9 does only what is missing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

__all__ = ["CACHE_FILE", "DeployCache", "content_key"]

CACHE_FILE = "deploy-cache.json"


def content_key(**parts: Any) -> str:
    """A short stable digest of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class DeployCache:
    """OUT/deploy-cache.json: finished work by content key, rewritten atomically after each step. A file that
    cannot be read (a crash cannot leave half of one, but a person can) is started afresh. With no path, a copy
    in memory of `entries` (what an export worker is handed); `added` holds what was put since it was opened."""

    def __init__(self, path: Path | None, entries: dict[str, Any] | None = None) -> None:
        self.path = path
        self.added: dict[str, Any] = {}
        self.entries: dict[str, Any]
        if path is None:
            self.entries = dict(entries or {})
            return
        try:
            self.entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        self.added[key] = value
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, allow_nan=False) + "\n")
