"""structlog configured once: JSON lines (orjson) to stdout and, optionally, a file."""

from __future__ import annotations

import logging
import sys
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


def configure(level: str = "info", log_file: str = "") -> None:
    sinks: list[IO[bytes]] = [sys.stdout.buffer]
    if log_file:
        sinks.append(open(log_file, "ab"))  # noqa: SIM115 - lives as long as the process
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


def get(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)
