"""Escapes through what the kernel and the fork server share between tenants: another tenant's
request left in a forked spare's memory, SysV and POSIX IPC objects outliving an activation."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import deploy_source, wait_for, writable
from tests.integration.arena import ATTACKER, Arena

# A tenant name that occurs nowhere else, so finding it in memory can only mean a leak.
LEAKER = "qzxleaker"

READ_OWN_TOKEN = """
import gc
(channel,) = [o for o in gc.get_objects() if type(o).__name__ == "Channel"]
result = channel.token
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


# --------------------------------------------------------------------------- SysV / POSIX IPC

MQ_NAME = "/stepvisor-escape-test"

PLANT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
IPC_CREAT = 0o1000
key = params["key"]
out = {}
shm = libc.shmget(key, 4096, IPC_CREAT | 0o666)
out["shm"] = shm >= 0 or os.strerror(ctypes.get_errno())
if shm >= 0:
    addr = libc.shmat(shm, None, 0)
    ctypes.memmove(addr, b"planted by evil", 15)
    libc.shmdt(ctypes.c_void_p(addr))
msq = libc.msgget(key, IPC_CREAT | 0o666)
out["msg"] = msq >= 0 or os.strerror(ctypes.get_errno())
if msq >= 0:
    buf = ctypes.create_string_buffer(8 + 15)
    ctypes.memmove(ctypes.addressof(buf), (1).to_bytes(8, "little") + b"planted by evil", 23)
    libc.msgsnd(msq, buf, 15, 0)
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
mq = libc.mq_open(params["mq"].encode(), os.O_CREAT | os.O_RDWR, 0o666, None)
out["mq"] = mq >= 0 or os.strerror(ctypes.get_errno())
result = out
"""

FIND = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
key = params["key"]
def errno_of(rc):
    return "found" if rc >= 0 else os.strerror(ctypes.get_errno())
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
result = {
    "shm": errno_of(libc.shmget(key, 0, 0)),
    "msg": errno_of(libc.msgget(key, 0)),
    "mq": errno_of(libc.mq_open(params["mq"].encode(), os.O_RDONLY)),
}
"""


def _host_keys(kind: str) -> set[int]:
    """The keys of the host namespace's SysV objects (this test runs in it)."""
    lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines if line.strip()}


@contextlib.contextmanager
def _removed_from_host(key: int) -> Iterator[None]:
    """Whatever happens, no object under `key` stays on the host (the old code left them)."""
    try:
        yield
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        ipc_rmid = 0
        if (shm := libc.shmget(key, 0, 0)) >= 0:
            libc.shmctl(shm, ipc_rmid, None)
        if (msq := libc.msgget(key, 0)) >= 0:
            libc.msgctl(msq, ipc_rmid, None)


def test_sysv_and_posix_ipc_objects_stay_in_their_activation(arena: Arena) -> None:
    """No IPC namespace: a SysV segment or queue planted by one tenant was found by key by the
    next, and stayed charged on the host after the activation ended."""
    if os.geteuid() != 0:
        pytest.skip("IPC namespaces need root (CAP_SYS_ADMIN)")
    arena.need("network")  # the IPC namespace rides on the namespace layer
    key = 0x5EC00000 + secrets.randbelow(1 << 16)  # IPC key evil plants its objects under
    with _removed_from_host(key):
        _plant_and_search(arena, key)


def _plant_and_search(arena: Arena, key: int) -> None:
    st = arena.attack(PLANT, iid="plant", key=key, mq=MQ_NAME)
    # POSIX queues: Landlock may refuse one already (the mqueue mount is outside its paths)
    assert st["output"]["shm"] is True and st["output"]["msg"] is True
    # Planted and left behind: nothing of it outlives the activation on the host.
    assert key not in _host_keys("shm")
    assert key not in _host_keys("msg")
    assert not Path("/dev/mqueue" + MQ_NAME).exists()
    # Neither another tenant nor a later activation of the same tenant finds it.
    deploy_source(arena.client, LEAKER, ATTACKER)
    arena.client.create(LEAKER, "attack", {"code": FIND, "key": key, "mq": MQ_NAME}, id="f")
    other = arena.client.wait(LEAKER, "f", timeout_s=120)
    again = arena.attack(FIND, iid="again", key=key, mq=MQ_NAME)
    for found in (other["output"], again["output"]):
        assert found["shm"] == found["msg"] == "No such file or directory"
        assert found["mq"] != "found"


def test_a_dead_nursery_takes_the_fork_server_down_and_it_is_replaced(arena: Arena) -> None:
    """The nursery forks every spare; without it the fork server exits rather than fork spares
    itself from a process that has seen requests."""
    assert arena.daemon.proc is not None

    def the_nursery() -> list[psutil.Process]:
        # The supervisor's child where spares are sibling forks, else the fork server's.
        found = []
        for p in psutil.Process(arena.daemon.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if p.name() == "sv-nursery":
                    found.append(p)
        return found

    (nursery,) = wait_for(the_nursery, 10, "the fork server's nursery")
    nursery.send_signal(signal.SIGKILL)
    wait_for(lambda: arena.daemon.events("zygote.failed"), 10, "the fork server's exit")
    st = arena.attack("result = 7", iid="after")
    assert st["output"] == 7
    assert len(arena.daemon.events("zygote.started")) == 2


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_each_activation_has_an_ipc_namespace_of_its_own(make_daemon, mode: str) -> None:
    """Spawned or forked, with the network or without: never the host's. (Whether two are the
    same cannot be told from here: a freed namespace's inode number is handed out again.)"""
    if os.geteuid() != 0:
        pytest.skip("IPC namespaces need root (CAP_SYS_ADMIN)")
    daemon = make_daemon("[tenants.online]\nnetwork = true\n", server=f'launch_mode = "{mode}"\n')
    c = daemon.client()
    code = 'import os\nresult = os.readlink("/proc/self/ns/ipc")'
    seen = []
    for tenant in ("online", "offline"):
        deploy_source(c, tenant, ATTACKER)
        for iid in ("one", "two"):
            c.create(tenant, "attack", {"code": code}, id=iid)
            seen.append(c.wait(tenant, iid, timeout_s=120)["output"])
    assert os.readlink("/proc/self/ns/ipc") not in seen, seen


# --------------------------------------------------------------------------- sandbox uid reuse

WRITE_SECRET = """
import os
with open(params["path"], "w") as f:
    f.write("alice's secret")
result = os.getuid()
"""

READ_SECRET = """
import os
try:
    found = open(params["path"]).read()
except OSError as exc:
    found = exc.strerror
result = {"uid": os.getuid(), "found": found}
"""


def test_a_reused_sandbox_uid_carries_no_file_to_another_tenant(make_daemon, shared) -> None:
    """Files an activation writes are owned by its uid; given to another tenant later, that uid
    opened them as their owner. A uid now serves one tenant for good, across restarts too."""
    daemon = make_daemon(
        writable(shared) + "[isolation]\nsandbox_uid_range = [900000, 900003]\n",
        server="max_activations = 1\n",
    )
    if "uid" not in {e["layer"] for e in daemon.events("isolation.layer")}:
        pytest.skip("isolation layer uid is not available on this host")
    secret = str(shared / "alice.txt")
    c = daemon.client()
    for tenant in ("alice", "bob"):
        deploy_source(c, tenant, ATTACKER)
    c.create("alice", "attack", {"code": WRITE_SECRET, "path": secret}, id="w")
    alice_uid = c.wait("alice", "w", timeout_s=60)["output"]
    seen = []
    for run in range(2):  # and again after a restart, from another random start
        if run:
            daemon.stop()
            daemon.start()
            c = daemon.client()
        for n in range(3):
            c.create("bob", "attack", {"code": READ_SECRET, "path": secret}, id=f"r{run}{n}")
            seen.append(c.wait("bob", f"r{run}{n}", timeout_s=60)["output"])
    assert all(s["found"] == "Permission denied" for s in seen), seen
    assert alice_uid not in {s["uid"] for s in seen}
