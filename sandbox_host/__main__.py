"""Entry point of one spawned activation: `python -I -m sandbox_host --endpoint E --ppid P
--sandbox JSON`. The one-time token arrives on stdin, never on the command line (other users can
read argv). Every isolation layer is applied before any tenant byte is received."""

from __future__ import annotations

import argparse
import time

STARTED = time.monotonic()  # before the heavy imports: those are part of a spawn's cost


def main() -> None:
    parser = argparse.ArgumentParser(prog="sandbox_host")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--ppid", type=int, required=True)
    parser.add_argument("--sandbox", required=True, help="JSON of protocol.launch.Sandbox")
    args = parser.parse_args()

    import msgspec

    from protocol.launch import Sandbox
    from sandbox_host import activation

    box = msgspec.json.decode(args.sandbox, type=Sandbox)
    activation.run(args.endpoint, args.ppid, box, STARTED)


if __name__ == "__main__":
    main()
