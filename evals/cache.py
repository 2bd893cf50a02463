"""An SQLite cache of model outputs, so an interrupted evaluation resumes and a re-run is free.

A record is keyed by everything that decides the output: the model's fingerprint (weights and compression),
the kind of request ("generate", "loglikelihood"), the exact prompt text and the decoding parameters. Each
batch is committed as soon as it is computed, so killing a run loses at most the batch in flight. Values
are JSON (never pickles): a list of completions, or [loglikelihood, token count].
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

_SCHEMA = "CREATE TABLE IF NOT EXISTS outputs (key TEXT PRIMARY KEY, kind TEXT NOT NULL, value TEXT NOT NULL)"


def request_key(model: str, kind: str, request, params: dict) -> str:
    """The cache key: a hash of the model fingerprint, request kind, request and parameters (sorted JSON)."""
    text = json.dumps({"model": model, "kind": kind, "request": request, "params": params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class OutputCache:
    """Cached outputs of one or more models, in one SQLite file (created on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.path}: not a comptrust output cache ({exc}); remove it or choose another "
                             "--cache file") from None

    def get_many(self, keys: list[str]) -> dict[str, object]:
        """{key: value} for the keys present."""
        found = {}
        for start in range(0, len(keys), 500):  # SQLite limits the number of bound parameters
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in self._db.execute(f"SELECT key, value FROM outputs WHERE key IN ({marks})", chunk):
                found[key] = json.loads(value)
        return found

    def put_many(self, kind: str, items: dict[str, object]) -> None:
        """Store {key: value} and commit, so these survive a crash of the process right after."""
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO outputs (key, kind, value) VALUES (?, ?, ?)",
                                 [(key, kind, json.dumps(value)) for key, value in items.items()])

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outputs").fetchone()[0]

    def close(self) -> None:
        self._db.close()
