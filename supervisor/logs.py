"""structlog configured once: JSON lines (orjson) to stdout and, optionally, a file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _TeeBytesLogger:
    """Writes each rendered line to every sink and flushes, so `tail -f` sees it at once."""

    def __init__(self, sinks: list[IO[bytes]]) -> None:
        self._sinks = sinks

    def msg(self, message: bytes) -> None:
        line = message + b"\n"
        for sink in self._sinks:
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError):
                pass  # a closed or full sink must never stop the loop

    log = debug = info = warn = warning = error = critical = exception = msg


_file: dict[str, Any] = {}  # the log file's path and open sink, for `reopen`


def configure(level: str = "info", log_file: str = "") -> None:
    sinks: list[IO[bytes]] = [sys.stdout.buffer]
    if log_file:
        sinks.append(open(log_file, "ab"))  # noqa: SIM115 - lives as long as the process
        _file.update(path=log_file, sinks=sinks)
    tee = _TeeBytesLogger(sinks)
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


def reopen() -> str | None:
    """Reopen the log file (on SIGHUP): after logrotate moved it away, write a new one.
    Returns why it could not (the old file is kept), or None."""
    if not _file:
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
