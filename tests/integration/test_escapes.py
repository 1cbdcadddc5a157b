"""Hostile tenant code against a real supervisor: every attack must fail, be classified, and
leave the daemon and the other tenant untouched. Layers this host lacks are skipped, not faked."""

from __future__ import annotations

import contextlib
import os
import socket
import textwrap
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psutil
import pytest

from stepvisor.client import StepVisorError
from tests.conftest import deploy_source, wait_for, wait_gone
from tests.integration.arena import ATTACKER, VICTIM, Arena


@pytest.mark.sqlite_only
def test_cannot_read_the_journal_database_or_the_config(arena: Arena) -> None:
    arena.need("uid", "landlock")
    st = arena.attack(
        """
        result = {}
        for name in ("db", "config"):
            try:
                result[name] = len(open(params[name], "rb").read())
            except OSError as exc:
                result[name] = exc.strerror
        """,
        db=str(arena.daemon.state / "stepvisor.db"),
        config=str(arena.daemon.config_path),
    )
    assert st["output"] == {"db": "Permission denied", "config": "Permission denied"}
    assert arena.outcomes() == ["ok", "ok"]


@pytest.mark.postgresql_only
def test_cannot_reach_the_postgresql_database(arena: Arena) -> None:
    """The cluster's socket is reachable by path and trusts every local user, as a careless
    set-up would: only the sandbox (seccomp's connect rule, Landlock) stands between tenant code
    and the database of every tenant."""
    arena.need("seccomp", "landlock")
    url = arena.daemon.database
    sock = next(Path(unquote(url.split("host=")[1].split("&")[0])).glob(".s.PGSQL.*"))
    st = arena.attack(
        """
        import socket
        out = {}
        try:  # seccomp refuses the socket itself; Landlock and the uid, the path
            socket.socket(socket.AF_UNIX).connect(params["sock"])
            out["socket"] = "connected"
        except OSError as exc:
            out["socket"] = exc.strerror
        try:
            import psycopg
            psycopg.connect(params["url"], connect_timeout=3).close()
            out["psycopg"] = "connected"
        except Exception as exc:
            out["psycopg"] = type(exc).__name__
        result = out
        """,
        sock=str(sock),
        url=url,
    )
    assert st["status"] == "complete", st["error"]
    out = st["output"]
    assert out["socket"] in ("Operation not permitted", "Permission denied"), out
    assert out["psycopg"] != "connected", out
    assert arena.outcomes() == ["ok", "ok"]


def test_cannot_read_another_tenants_scratch(arena: Arena) -> None:
    arena.need("uid", "landlock")
    c = arena.client
    deploy_source(c, "victim", """
        import os, time
        from stepvisor import workflow

        @workflow("hold")
        def hold(event, step):
            def write_and_wait():
                open("secret.txt", "w").write("victim scratch secret")
                time.sleep(20)
            step.do("hold", write_and_wait, timeout=60)
    """, filename="hold.py")  # fmt: skip
    c.create("victim", "hold", id="h")
    scratch_root = arena.daemon.run_dir / "scratch" / "victim"  # one dir per tenant
    wait_for(lambda: list(scratch_root.glob("*/secret.txt")), 30, "the victim's secret")
    st = arena.attack(
        """
        import os
        found, refused = [], []
        try:
            os.listdir(params["root"])
        except OSError as exc:
            refused.append(exc.strerror)
        for n in range(1, 40):  # activation ids are small numbers: guess the victim's dir
            d = os.path.join(params["root"], str(n))
            if d == os.getcwd():
                continue
            try:
                found.append(open(os.path.join(d, "secret.txt")).read())
            except FileNotFoundError:
                pass
            except OSError as exc:
                refused.append(exc.strerror)
        result = {"found": found, "refused": refused}
        """,
        root=str(scratch_root),
    )
    assert st["output"]["found"] == []
    assert "Permission denied" in st["output"]["refused"]
    c.terminate("victim", "h")


def test_cannot_use_the_api_socket(arena: Arena) -> None:
    arena.need("uid", "seccomp")
    st = arena.attack(
        """
        import zmq
        from protocol.codec import encode, decode_reply
        from protocol.messages import ListInstances
        try:
            ctx = zmq.Context()
            s = ctx.socket(zmq.DEALER)
            s.connect(params["api"])
            s.send(encode(ListInstances(rid=1, tenant="victim")))
            got = s.poll(3000)
            result = {"answer": decode_reply(s.recv()).result if got else None}
            s.close(linger=0)
            ctx.term()
        except Exception as exc:
            result = {"refused": repr(exc)}
        """,
        api=arena.daemon.endpoint,
    )
    out = st["output"]
    assert out.get("answer") is None, out  # no listing of the victim's instances, ever
    assert arena.daemon.alive()


def test_cannot_open_a_tcp_connection(arena: Arena) -> None:
    arena.need("network", "seccomp")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list[Any] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the timeout: nobody connected
            accepted.append(server.accept())

    listener = threading.Thread(target=accept)
    listener.start()
    try:
        st = arena.attack(
            """
            import socket
            try:
                socket.create_connection(("127.0.0.1", params["port"]), timeout=3)
                result = {"connected": True}
            except OSError as exc:
                result = {"refused": exc.strerror}
            """,
            port=server.getsockname()[1],
        )
    finally:
        listener.join()
        server.close()
    assert st["output"]["refused"] in ("Operation not permitted", "Network is unreachable")
    assert accepted == []


def test_a_fork_bomb_hits_the_process_limit(arena: Arena) -> None:
    arena.need("uid", "cgroup")
    st = arena.attack(
        """
        import os, time
        children = 0
        try:
            for _ in range(2000):
                pid = os.fork()
                if pid == 0:
                    time.sleep(120)
                    os._exit(0)
                children += 1
        except OSError as exc:
            result = {"children": children, "stopped_by": exc.strerror}
        else:
            result = {"children": children}
        """
    )
    out = st["output"]
    assert out["children"] < 32, out  # max_pids of the tenant
    assert out["stopped_by"] == "Resource temporarily unavailable"
    uid_procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"].real >= 900_000]
    wait_for(
        lambda: not [p for p in uid_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
        10,
        "the bomb to be killed",
    )


def test_memory_limit_holds_for_the_tenant_as_a_whole(arena: Arena) -> None:
    arena.need("cgroup")
    code = """
        import time
        block = bytearray(135 * 1024 * 1024)  # under the address-space cap alone
        for i in range(0, len(block), 4096):
            block[i] = 1  # touch every page: resident, not just reserved
        time.sleep(4)
        result = "held 135 MiB"
    """
    c = arena.client
    for iid in ("m1", "m2"):
        c.create("evil", "attack", {"code": textwrap.dedent(code)}, id=iid)
    finals = [c.wait("evil", iid, timeout_s=120) for iid in ("m1", "m2")]
    # Each fits under memory_mib = 256 alone; together they do not: the kernel kills one.
    outcomes = arena.outcomes("m1")[:1] + arena.outcomes("m2")[:1]
    assert "oom" in outcomes, (outcomes, finals)
    errored = [f for f in finals if f["status"] == "errored"]
    assert errored and "memory" in errored[0]["error"]["message"].lower()


def test_a_huge_file_is_cut_off(arena: Arena) -> None:
    st = arena.attack(
        """
        written = 0
        try:
            with open("huge.bin", "wb") as f:
                chunk = b"x" * (1 << 20)
                for _ in range(1024):
                    f.write(chunk)
                    f.flush()
                    written += 1
        except OSError as exc:
            result = {"mib": written, "stopped_by": exc.strerror}
        else:
            result = {"mib": written}
        """
    )
    assert st["output"]["stopped_by"] == "File too large"
    assert st["output"]["mib"] <= 64


def test_cannot_become_root(arena: Arena) -> None:
    if os.geteuid() == 0:
        arena.need("uid")
    st = arena.attack(
        """
        import os
        try:
            os.setuid(0)
            result = {"uid": os.getuid()}
        except OSError as exc:
            result = {"refused": exc.strerror, "uid": os.getuid()}
        """
    )
    assert st["output"]["refused"] == "Operation not permitted"
    assert st["output"]["uid"] != 0 or os.geteuid() != 0


def test_cannot_kill_the_supervisor(arena: Arena) -> None:
    arena.need("uid")
    assert arena.daemon.proc is not None
    st = arena.attack(
        """
        import os, signal
        try:
            os.kill(params["pid"], signal.SIGKILL)
            result = {"killed": True}
        except OSError as exc:
            result = {"refused": exc.strerror}
        """,
        pid=arena.daemon.proc.pid,
    )
    assert st["output"] == {"refused": "Operation not permitted"}
    assert arena.daemon.alive()


def test_a_daemonised_grandchild_dies_with_its_activation(arena: Arena, shared: Path) -> None:
    arena.need("cgroup")
    pidfile = shared / "escapee.pid"
    pidfile.touch()
    pidfile.chmod(0o666)
    arena.daemon.stop()
    arena.daemon.write_config(f'[tenants.evil]\nwritable_paths = ["{shared}"]\n')
    arena.daemon.start()
    arena.client = arena.daemon.client(timeout_s=60)
    st = arena.attack(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()              # leave the activation's process group and session
            if os.fork() == 0:
                open(params["pidfile"], "w").write(str(os.getpid()))
                time.sleep(300)
            os._exit(0)
        deadline = time.monotonic() + 10
        while not open(params["pidfile"]).read() and time.monotonic() < deadline:
            time.sleep(0.01)  # return only once the daemon has said who it is
        result = "left a daemon behind"
        """,
        pidfile=str(pidfile),
    )
    assert st["status"] == "complete"
    escapee = int(pidfile.read_text())
    wait_gone(escapee, 10, "the daemonised grandchild to be killed with its activation's cgroup")


def test_a_step_holds_no_descriptor_but_its_own(arena: Arena) -> None:
    """The fork server's processes open things for every activation (Landlock targets, the
    spares' sockets, a tenant's network namespace): none of it reaches tenant code, which sees
    its stdio, its connection to the supervisor and what the interpreter itself opened."""
    st = arena.attack(
        """
        import os, socket, stat
        seen = {}
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                st = os.fstat(fd)
            except OSError:
                continue  # the listing's own directory fd, closed by now
            if stat.S_ISSOCK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                seen[fd] = "socket" if stat.S_ISSOCK(st.st_mode) else "fifo"
            else:
                seen[fd] = os.readlink(f"/proc/self/fd/{fd}")
        result = seen
        """
    )
    assert st["status"] == "complete", st
    fds = {int(k): v for k, v in st["output"].items()}
    assert set(fds) == {0, 1, 2, 3}, fds  # stdin, stdout, stderr, the supervisor connection
    assert fds[3] == "socket" and fds[1] == fds[2] == "fifo"


def test_garbage_on_its_own_channel_is_a_protocol_error(arena: Arena) -> None:
    st = arena.attack(
        """
        import gc
        (channel,) = [o for o in gc.get_objects() if type(o).__name__ == "Channel"]
        garbage = b"\\xc1 not a message"
        channel.sock.sendall(bytes([0, len(garbage)]) + garbage)  # one well-framed ZMTP frame
        import time
        time.sleep(30)
        """
    )
    assert st["status"] == "errored"
    assert arena.outcomes()[0] == "protocol_error"
    assert "undecodable" in arena.client.history("evil", "a")["activations"][0]["detail"]


def test_an_activation_that_never_says_hello_is_killed(make_daemon, tmp_short: Path) -> None:
    hang = tmp_short / "hanging-python"
    hang.write_text("#!/bin/sh\nexec sleep 300\n")
    hang.chmod(0o755)
    daemon = make_daemon(f'[tenants.evil]\npython = "{hang}"\n', server="hello_timeout_s = 0.5\n")
    c = daemon.client()
    deploy_source(c, "victim", VICTIM)  # other tenants use the server's interpreter
    with pytest.raises(StepVisorError) as exc:
        deploy_source(c, "evil", ATTACKER)
    assert exc.value.code == "DEPLOY_FAILED"
    assert "never_connected" in exc.value.message
    finished = wait_for(lambda: daemon.events("activation.finished", tenant="evil"), 10, "reap")
    assert finished[0]["outcome"] == "never_connected"
    c.create("victim", "keep", id="v")
    wait_for(lambda: c.status("victim", "v")["status"] == "waiting", 30, "the victim to run")


def test_a_tenant_allowed_the_network_gets_it_and_only_ip(make_daemon) -> None:
    daemon = make_daemon("[tenants.online]\nnetwork = true\n")
    c = daemon.client()
    deploy_source(c, "online", ATTACKER)
    server = socket.create_server(("127.0.0.1", 0))
    code = """
        import socket
        out = {}
        try:
            socket.create_connection(("127.0.0.1", params["port"]), timeout=3).close()
            out["tcp"] = "connected"
        except OSError as exc:
            out["tcp"] = exc.strerror
        try:
            socket.socket(socket.AF_UNIX).close()
            out["unix"] = "allowed"
        except OSError as exc:
            out["unix"] = exc.strerror
        result = out
    """
    try:
        c.create(
            "online",
            "attack",
            {"code": textwrap.dedent(code), "port": server.getsockname()[1]},
            id="n",
        )
        out = c.wait("online", "n", timeout_s=60)["output"]
    finally:
        server.close()
    assert out["tcp"] == "connected"
    layers = {e["layer"] for e in daemon.events("isolation.layer")}
    if "seccomp" in layers:
        assert out["unix"] == "Operation not permitted"  # still no way to the API socket


def test_tenants_without_network_never_share_a_network_namespace(make_daemon) -> None:
    """In fork mode a tenant's activations reuse its private namespace (so none is made and torn
    down per step); another tenant's activations and the host are never in it."""
    daemon = make_daemon()
    if "network" not in {e["layer"] for e in daemon.events("isolation.layer")}:
        pytest.skip("isolation layer network is not available on this host")
    c = daemon.client()
    code = {"code": "import os\nresult = os.readlink('/proc/self/ns/net')"}
    seen: dict[str, list[str]] = {}
    for tenant in ("one", "two"):
        deploy_source(c, tenant, ATTACKER)
        for n in range(2):
            c.create(tenant, "attack", code, id=f"n{n}")
            seen.setdefault(tenant, []).append(c.wait(tenant, f"n{n}", timeout_s=60)["output"])
    host = os.readlink("/proc/self/ns/net")
    assert host not in seen["one"] + seen["two"]
    assert not set(seen["one"]) & set(seen["two"])
    assert seen["one"][0] == seen["one"][1]  # fork mode (the default): kept per tenant


def test_code_never_runs_as_root_when_every_sandbox_uid_is_taken(make_daemon) -> None:
    daemon = make_daemon(
        "[isolation]\nsandbox_uid_range = [900000, 900000]\n", server="max_activations = 1\n"
    )
    if "uid" not in {e["layer"] for e in daemon.events("isolation.layer")}:
        pytest.skip("isolation layer uid is not available on this host")
    c = daemon.client()
    deploy_source(c, "evil", ATTACKER)
    c.create("evil", "attack", {"code": "import time; time.sleep(30)"}, id="busy")
    wait_for(lambda: c.history("evil", "busy")["entries"], 30, "the only uid to be taken")
    with pytest.raises(StepVisorError) as err:  # a deploy check would otherwise run as root
        c.deploy("evil", "import os\nraise RuntimeError(os.getuid())\n", filename="x.py")
    assert err.value.code == "UNAVAILABLE" and "sandbox uid" in err.value.message
    c.terminate("evil", "busy")
