"""What one tick of the loop sends, held until the tick's transaction commits.

Two kinds, sent at two moments:
- **Acknowledgements** (every reply to a client, every `Ack` of a final message) say that
  something is journaled. With `synchronous = "acked"` they also wait for the tick's one sync of
  the write-ahead log, so nothing acknowledged can be lost.
- **Activates** only hand an activation what is committed. They leave as soon as the tick
  commits, before that sync, so the activation decodes its journal and replays while the log is
  synced instead of after. The order "durable before acted on" still holds: a step's body waits
  for the ack of its `StepStarted`, which a later tick sends, after this tick's sync; any other
  command an activation reports is acknowledged only after its own commit and sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

Send = Callable[[], object]  # one message's send, bound to its socket and frames


class Outbox:
    def __init__(self, log: Any) -> None:
        self.log = log
        self._acks: list[Send] = []
        self._activates: list[Send] = []

    def acknowledge(self, send: Send) -> None:
        """Send once the tick has committed and, when acknowledgements wait for it, synced."""
        self._acks.append(send)

    def activate(self, send: Send) -> None:
        """Send once the tick has committed."""
        self._activates.append(send)

    @property
    def acknowledges(self) -> bool:
        """Whether this tick acknowledges something (and so syncs before sending it)."""
        return bool(self._acks)

    def send_activates(self) -> None:
        self._send(self._activates)

    def send_acknowledgements(self) -> None:
        self._send(self._acks)

    def _send(self, queue: list[Send]) -> None:
        for send in queue:
            try:
                send()
            except zmq.ZMQError as exc:  # a client's queue is full, or it is gone
                self.log.warning("send.dropped", error=str(exc))
        queue.clear()
