"""structlog configured once: JSON lines (orjson) to stdout and, optionally, a file. On a
terminal, stdout gets the lines as `stepvisor logs` renders them instead; the file stays JSON."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from stepvisor import logview

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _TeeBytesLogger:
    """Writes each rendered line to every sink and flushes, so `tail -f` sees it at once."""

    def __init__(
        self, sinks: list[IO[bytes]], first: Callable[[bytes], bytes] | None = None
    ) -> None:
        self._sinks = sinks
        self._first = first  # how the first sink (stdout) shows a line, if not as JSON

    def msg(self, message: bytes) -> None:
        line = message + b"\n"
        for i, sink in enumerate(self._sinks):
            try:
                sink.write(self._first(message) if i == 0 and self._first else line)
                sink.flush()
            except (OSError, ValueError):
                pass  # a closed or full sink must never stop the loop

    log = debug = info = warn = warning = error = critical = exception = msg


_file: dict[str, Any] = {}  # the log file's path and open sink, for `reopen`


def _readable(message: bytes) -> bytes:
    return (logview.render(orjson.loads(message)) + "\n").encode()


def configure(level: str = "info", log_file: str = "", *, readable: bool = False) -> None:
    """Log at `level` and above to stdout (`readable`: rendered for people, else JSON) and, when
    given, to `log_file` (JSON, opened now; see `add_file` for one opened later)."""
    sinks: list[IO[bytes]] = [sys.stdout.buffer]
    _file.clear()
    _file["sinks"] = sinks
    if log_file:
        sinks.append(open(log_file, "ab"))  # noqa: SIM115 - lives as long as the process
        _file["path"] = log_file
    tee = _TeeBytesLogger(sinks, _readable if readable else None)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: tee,
        cache_logger_on_first_use=False,
    )


def add_file(path: str) -> str | None:
    """Also log to `path` from now on: a file in a directory made after `configure` (the
    embedded default's, in its state dir). Returns why it could not be opened, or None."""
    try:
        sink = open(path, "ab")  # noqa: SIM115 - lives as long as the process
    except OSError as exc:
        return f"cannot open log file {path}: {exc.strerror}"
    _file["sinks"].append(sink)
    _file["path"] = path
    return None


def reopen() -> str | None:
    """Reopen the log file (on SIGHUP): after logrotate moved it away, write a new one.
    Returns why it could not (the old file is kept), or None."""
    if "path" not in _file:
        return None
    sinks: list[IO[bytes]] = _file["sinks"]
    try:
        new = open(_file["path"], "ab")  # noqa: SIM115 - replaces the sink it closes
    except OSError as exc:
        return f"cannot reopen {_file['path']}: {exc.strerror}"
    old, sinks[-1] = sinks[-1], new
    old.close()
    return None


def journal_unit() -> str | None:
    """The systemd unit whose journal receives our stdout, when it does (systemd sets
    JOURNAL_STREAM for a service whose output goes to the journal)."""
    if not os.environ.get("JOURNAL_STREAM"):
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        for part in reversed(line.rsplit(":", 1)[-1].split("/")):
            if part.endswith(".service"):
                return part
    return None


def get(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)
