"""Model paths in configs may be relative to the project root, wherever Ray starts its workers."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_absolute() or not (PROJECT_ROOT / p).exists():
        return path  # absolute, or a hub model name for a GPU cluster
    return str(PROJECT_ROOT / p)
