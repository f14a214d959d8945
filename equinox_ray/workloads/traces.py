"""Load the vendored real traces (see data/README.md for their sources), with errors that name the file and line."""

from __future__ import annotations

import csv
from pathlib import Path

from equinox_ray.fairness.request import User
from equinox_ray.workloads.workload import TraceRequest, Workload

DATA_DIR = Path(__file__).parent / "data"
LMSYS = DATA_DIR / "lmsys_arena_27clients.csv"
SHAREGPT = DATA_DIR / "sharegpt_lengths.csv"
AZURE_CONV = DATA_DIR / "azure_conv_2023.csv"


class TraceError(ValueError):
    """A malformed trace file; the message names the file and line."""


def _positive_int(value: str, column: str, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {column} must be an integer, got {value!r}") from None
    if number <= 0:
        raise TraceError(f"{where}: {column} must be > 0, got {number}")
    return number


def _arrival(value: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: arrival_s must be a number, got {value!r}") from None
    if not number >= 0:
        raise TraceError(f"{where}: arrival_s must be >= 0, got {value!r}")
    return number


def read_rows(path: Path, required: tuple[str, ...]) -> list[tuple[str, dict[str, str]]]:
    """Rows of a CSV trace as (location, row), checking the header first."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)}")
        rows = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                raise TraceError(f"{where}: expected {len(reader.fieldnames)} fields")
            rows.append((where, row))
    return rows


def read_lengths(path: Path) -> list[tuple[int, int]]:
    """(prompt_tokens, output_tokens) pairs."""
    return [
        (_positive_int(row["prompt_tokens"], "prompt_tokens", where),
         _positive_int(row["output_tokens"], "output_tokens", where))
        for where, row in read_rows(path, ("prompt_tokens", "output_tokens"))
    ]


def read_timed_lengths(path: Path) -> list[tuple[float, int, int]]:
    """(arrival_s, prompt_tokens, output_tokens) triples."""
    return [
        (_arrival(row["arrival_s"], where),
         _positive_int(row["prompt_tokens"], "prompt_tokens", where),
         _positive_int(row["output_tokens"], "output_tokens", where))
        for where, row in read_rows(path, ("arrival_s", "prompt_tokens", "output_tokens"))
    ]


def read_user_trace(path: Path, users: dict[str, User] | None = None, name: str | None = None) -> Workload:
    """A trace with a user column. With `users` given, a user missing from it is an error; otherwise every user in
    the trace gets weight 1."""
    rows = read_rows(path, ("arrival_s", "user", "prompt_tokens", "output_tokens"))
    known = dict(users) if users is not None else {}
    requests = []
    for where, row in rows:
        user = row["user"].strip()
        if not user:
            raise TraceError(f"{where}: empty user")
        if user not in known:
            if users is not None:
                raise TraceError(f"{where}: unknown user {user!r}")
            known[user] = User(user)
        requests.append(TraceRequest(
            _arrival(row["arrival_s"], where), user,
            _positive_int(row["prompt_tokens"], "prompt_tokens", where),
            _positive_int(row["output_tokens"], "output_tokens", where),
        ))
    return Workload(name or Path(path).stem, known, requests)


def lmsys_arena(users: dict[str, User] | None = None) -> Workload:
    return read_user_trace(LMSYS, users, name="lmsys")


def sharegpt_lengths() -> list[tuple[int, int]]:
    return read_lengths(SHAREGPT)


def azure_conversations() -> list[tuple[float, int, int]]:
    return read_timed_lengths(AZURE_CONV)
