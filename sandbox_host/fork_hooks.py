"""The standard library's at-fork callbacks, skipped while the nursery forks a spare.

Every fork runs the callbacks modules registered with `os.register_at_fork` in the child:
`threading` rebuilds its bookkeeping and locks, `logging` re-creates its handlers' locks, for
the case where another thread held one of them at the fork. The nursery never has another
thread (`sibling.probe` and the fork server's rules insist on one), so in its children those
callbacks rebuild what is already in order, and they are not free: the pages they touch are
copied on write, about 130 page faults (a third of a millisecond of CPU) per spare, measured
in a process that imports what the fork server imports.

The nursery swaps their code for an empty function once (`quiet`); a spare puts it back first
thing (`restore`), so the activation, and any fork its tenant code makes, has the standard
library's behaviour. A Python whose modules name these callbacks differently keeps them.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable


def _nothing() -> None:
    pass


def _callbacks() -> list[types.FunctionType]:
    found = [
        getattr(threading, "_after_fork", None),
        getattr(logging, "_after_at_fork_child_reinit_locks", None),
    ]
    # Only plain functions without closures: their code can be swapped for `_nothing`'s.
    return [f for f in found if isinstance(f, types.FunctionType) and not f.__closure__]


def quiet() -> Callable[[], None]:
    """Make the callbacks do nothing in this process; returns what undoes that (in a child)."""
    saved = [(f, f.__code__) for f in _callbacks()]
    for f, _ in saved:
        f.__code__ = _nothing.__code__

    def restore() -> None:
        for f, code in saved:
            f.__code__ = code

    return restore
