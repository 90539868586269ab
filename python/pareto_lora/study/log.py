"""The study's JSON-lines log: the protocol on the first line, then one line per finished run.

Each run's line is written, flushed and fsynced as soon as the run returns, so an interrupted study
loses at most the run in progress. Text after the last newline is the line that was being written
when the process stopped: reading ignores it, resuming cuts it off before appending.
"""

from __future__ import annotations

import json
import os

from .. import args
from .protocol import Protocol
from .records import Record, parse

__all__ = ["FORMAT", "read", "resume", "append", "path_of"]

#: the first line's marker and version
FORMAT = "pareto_lora.study/1"


def _lines(path: str) -> tuple[list[str], int]:
    """(complete lines, byte length of the complete part)."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    try:
        return data[:end].decode("utf-8").splitlines(), end
    except UnicodeDecodeError as e:
        raise ValueError(f"log: expected a UTF-8 study log (JSON lines), {path!r} is not ({e})") from None


def read(path) -> tuple[Protocol, list[Record]]:
    """The log's protocol and its records in file order (ValueError naming the path and line)."""
    path = path_of(path)
    lines, _ = _lines(path)
    if not lines:
        raise ValueError(f"log: expected a study log starting with its protocol line, got an empty file {path!r}")
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"log: expected JSON on every line of {path!r}, line {i}: {e}") from None
    head = rows[0]
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ValueError(f"log: expected the first line of {path!r} to be a {FORMAT} protocol line, got {args.shown(head)}")
    protocol = Protocol.from_dict(head.get("protocol"))
    records = [parse(f"log {path!r} line {i}", row, protocol) for i, row in enumerate(rows[1:], 2)]
    seen = set()
    for i, r in enumerate(records, 2):
        key = (r.method, r.seed)
        if key in seen:
            raise ValueError(f"log: expected one line per run in {path!r}; line {i} repeats {r.method.name} seed {r.seed}")
        seen.add(key)
    return protocol, records


def resume(path, protocol: Protocol) -> list[Record]:
    """The finished runs of the study at ``path`` (creating the log with ``protocol`` if absent or
    empty); ValueError naming the differences if the log was written by another protocol."""
    path = path_of(path)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"format": FORMAT, "protocol": protocol.as_dict()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return []
    logged, records = read(path)
    diff = protocol.differences(logged)
    if diff:
        raise ValueError(f"log: expected a log of this study's protocol; {path!r} was written by another one (this "
                         f"study vs the log: {'; '.join(diff)}). Use a new log path, or the log's protocol.")
    _, end = _lines(path)
    if end != os.path.getsize(path):
        with open(path, "r+b") as f:  # a line cut off by an interrupted write: drop it before appending
            f.truncate(end)
    return records


def append(path, record: Record) -> None:
    with open(path_of(path), "a", encoding="utf-8") as f:
        f.write(json.dumps(record.as_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def path_of(path) -> str:
    """``path`` as a str, or ValueError naming ``log``."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"log: expected a file path, got {args.shown(path)}")
    return os.fspath(path)
