"""`read_json(path, what)`: read a JSON object from a file, with one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path

from andromeda.errors import UserError


def read_json(path: Path, what: str = "file") -> dict:
    """The JSON object in `path`; a missing file, invalid JSON or a non-object raise
    UserError naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data
