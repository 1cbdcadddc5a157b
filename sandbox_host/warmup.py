"""Run an activation's hot path in the fork server before it forks anything, on a workflow of
our own, so that every activation starts from an interpreter that has run it already.

Why: a forked activation shares the fork server's memory page by page until it writes to a
page, and each such write costs a page fault and a copy (a few microseconds). CPython 3.11 writes
to code it runs for the first times: each call counts down a warm-up counter in the code object,
then the bytecode is rewritten ("quickened") and its inline caches are filled as instructions
specialise. msgspec fills its decoders' caches on first use too. Run once here, in the process
every spare is forked from, none of that is left for each activation to do (and copy).

What runs is our own code on our own synthetic workflow: no tenant's code, request or token.
Nothing of it is kept: the module, its source and the messages are dropped before the fork
server forks, so a spare holds nothing a request put there.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import NoReturn

from protocol import zmtp
from protocol.codec import decode_to_activation, encode
from protocol.messages import Activate, JournalEntry
from sandbox_host import runtime

# Enough calls for CPython 3.11 to quicken each code object (after 8) and let its instructions
# specialise; a round calls each function of the path about once. Costs ~35 ms at start-up.
ROUNDS = 64
_FILENAME = "stepvisor_warmup.py"
_WORKFLOW = "warmup"
_SOURCE = b"""\
from stepvisor import workflow


@workflow("warmup")
def warmup(event, step):
    total = 0
    for i in range(4):
        total += step.do(f"s{i}", lambda: i)
    step.sleep("nap", 1)
    return total
"""


class _Channel:
    """Encodes what the runtime sends, as the activation's socket would, and only counts it."""

    def __init__(self, sent: Counter[str]) -> None:
        self.sent = sent

    def send(self, msg: object) -> None:
        zmtp.frame(encode(msg))
        self.sent[type(msg).__name__] += 1

    def wait_ack(self) -> None:
        pass


def _exit() -> NoReturn:
    raise runtime._Stop  # what every handler of the runtime lets through: this round is over


def _activate(entries: int) -> Activate:
    """The synthetic instance, with its first `entries` steps journaled, as the supervisor
    would send it (encoded and decoded, so the decoder's paths are warm too)."""
    journal = [
        JournalEntry(seq=i, kind="step", name=f"s{i}", status="ok", attempts=1, result=b"%d" % i)
        for i in range(min(entries, 4))
    ]
    if entries > 4:
        journal.append(JournalEntry(seq=4, kind="sleep", name="nap", status="ok", until=0.0))
    act = Activate(
        mode="run",
        tenant="warmup",
        filename=_FILENAME,
        code_kind="source",
        code=_SOURCE,
        instance="warmup",
        workflow=_WORKFLOW,
        journal=journal,
        now=time.time(),
    )
    decoded = decode_to_activation(encode(act))
    assert isinstance(decoded, Activate)
    return decoded


def warm(rounds: int = ROUNDS) -> Counter[str]:
    """Replay the synthetic workflow `rounds` times to each of its points: a new step, the
    sleep, and the return. Returns the messages the runtime sent, by type: a change to the
    runtime that made this path fail would otherwise go unnoticed (and warm nothing)."""
    sent: Counter[str] = Counter()
    try:
        for _ in range(rounds):
            for entries in (0, 2, 4, 5):
                rt = runtime.Runtime(_activate(entries), _Channel(sent), exit=_exit)
                try:
                    rt.run()
                except runtime._Stop:
                    pass
                finally:
                    rt.output.unmute()
    finally:
        sys.modules.pop("tenant_workflows", None)
        runtime._SOURCES.pop(f"<warmup>/{_FILENAME}", None)
    return sent
