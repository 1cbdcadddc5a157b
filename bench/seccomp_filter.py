"""What the activation's seccomp policy costs: building it (once per process, at import),
installing it (once per activation, after Activate arrives), and every later syscall (an
argument-checked one runs the program; one allowed whatever its arguments is answered from the
kernel's per-filter cache).

    python -m bench.seccomp_filter [--runs N]

Each figure is a median over forked children (a filter is for life). Reported, never asserted.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import struct
import termios
import time
from collections.abc import Callable

from sandbox_host import isolation, limits

CALLS = 100_000


def in_child(body: Callable[[], dict[str, float]]) -> dict[str, float]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps(body()).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out: dict[str, float] = json.loads(f.read())
    os.waitpid(pid, 0)
    return out


def per_call_ns(call: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(CALLS):
        call()
    return (time.perf_counter_ns() - t0) / CALLS


def one_child() -> dict[str, float]:
    limits.no_new_privs()
    r, _w = os.pipe()
    buf = bytearray(4)

    def ioctl() -> object:
        return fcntl.ioctl(r, termios.FIONREAD, buf)

    before = {"getppid": per_call_ns(os.getppid), "ioctl": per_call_ns(ioctl)}
    t0 = time.perf_counter_ns()
    isolation.restrict_syscalls(allow_inet=False)
    install_us = (time.perf_counter_ns() - t0) / 1000
    return {
        "install_us": install_us,
        "getppid_extra_ns": per_call_ns(os.getppid) - before["getppid"],
        "ioctl_extra_ns": per_call_ns(ioctl) - before["ioctl"],
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.seccomp_filter", description=__doc__)
    p.add_argument("--runs", type=int, default=15, help="forked children (default 15)")
    args = p.parse_args()
    machine = platform.machine()
    builds = []
    for _ in range(200):
        t0 = time.perf_counter_ns()
        count, _code = isolation.syscall_filter(machine, allow_inet=False)
        builds.append((time.perf_counter_ns() - t0) / 1000)
    runs = [in_child(one_child) for _ in range(args.runs)]
    report = {
        "machine": machine,
        "instructions": count,
        "program_bytes": count * struct.calcsize("=HBBI"),
        "build_us_median": round(statistics.median(builds), 1),
        **{f"{k}_median": round(statistics.median(r[k] for r in runs), 1) for k in runs[0]},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
