"""Escapes through what the kernel and the fork server share between tenants: another tenant's
request left in a forked spare's memory, SysV and POSIX IPC objects outliving an activation."""

from __future__ import annotations

import hashlib

from tests.conftest import deploy_source
from tests.integration.arena import ATTACKER, Arena

# A tenant name that occurs nowhere else, so finding it in memory can only mean a leak.
LEAKER = "qzxleaker"

READ_OWN_TOKEN = """
import gc
(channel,) = [o for o in gc.get_objects() if type(o).__name__ == "Channel"]
import zmq
result = channel.sock.getsockopt(zmq.ROUTING_ID).decode()
"""

# Searches this process's whole memory for a needle it is given only as a prefix and a hash:
# passing the needle itself would put it in the memory being searched.
SEARCH_OWN_MEMORY = """
import ctypes, hashlib, os
libc = ctypes.CDLL(None, use_errno=True)
try:
    mem = open("/proc/self/mem", "rb", buffering=0)
except PermissionError:  # not dumpable after the uid change: /proc/self is root's until
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    mem = open("/proc/self/mem", "rb", buffering=0)
needles = [(n["prefix"].encode(), n["length"], n["sha256"]) for n in params["needles"]]
found, scanned = [], 0
for line in open("/proc/self/maps").read().splitlines():
    fields = line.split()
    if not fields[1].startswith("r") or fields[-1] in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
        continue
    start, end = (int(x, 16) for x in fields[0].split("-"))
    try:
        mem.seek(start)
        data = mem.read(end - start)
    except OSError:
        continue
    scanned += len(data)
    for prefix, length, digest in needles:
        at = data.find(prefix)
        while at >= 0:
            if hashlib.sha256(data[at : at + length]).hexdigest() == digest:
                found.append(digest)
                break
            at = data.find(prefix, at + 1)
result = {"found": sorted(set(found)), "scanned": scanned}
"""


def _needle(secret: str) -> dict[str, object]:
    return {
        "prefix": secret[:3],
        "length": len(secret),
        "sha256": hashlib.sha256(secret.encode()).hexdigest(),
    }


def test_a_spare_holds_nothing_of_the_previous_request(arena: Arena) -> None:
    """A spare forked right after tenant A's request once held that request (token, tenant name,
    cgroup paths); the next tenant's activation could read it in its own memory."""
    c = arena.client
    deploy_source(c, LEAKER, ATTACKER)
    c.create(LEAKER, "attack", {"code": READ_OWN_TOKEN}, id="t")
    st = c.wait(LEAKER, "t", timeout_s=120)
    token = st["output"]
    assert isinstance(token, str) and len(token) >= 16
    needles = [_needle(token), _needle(LEAKER)]
    # Two instances (two activations each): whichever spare follows A's request is among them.
    for iid in ("m1", "m2"):
        st = arena.attack(SEARCH_OWN_MEMORY, iid=iid, needles=needles)
        assert st["status"] == "complete", st
        assert st["output"]["scanned"] > 1 << 20  # it really read its memory
        assert st["output"]["found"] == [], f"{iid} found another tenant's request in memory"
