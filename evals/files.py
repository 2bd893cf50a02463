"""Reading the official data files: every error is a ValueError that names the file and the line."""
from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path, what: str):
    """A JSON file's content; `what` says which file was expected when it is missing."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file ({what})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None


def jsonl_objects(lines, source: str) -> list[tuple[str, int, dict]]:
    """(where, line number, object) for each non-blank JSONL line, `where` being "source, line N" for the
    caller's own messages; a line that is not a JSON object is refused here."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        records.append((where, number, record))
    return records
