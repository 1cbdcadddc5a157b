"""`stepvisor demo`: a supervisor on the embedded default, two tenants' example workflows, their
histories, then a clean stop. Everything lives in a temporary directory."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from stepvisor import views
from stepvisor.client import Client, StepVisorError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _start(base: Path) -> tuple[subprocess.Popen[bytes], Client, Path]:
    log_path = base / "supervisor.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stepvisor.cli",
                "serve",
                "--state-dir",
                str(base / "state"),
                "--runtime-dir",
                str(base / "run"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = Client(f"ipc://{base / 'run' / 'api.sock'}", timeout_s=30)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the supervisor exited:\n{log_path.read_text()[-2000:]}")
        try:
            client.ping(timeout_s=0.5)
            return proc, client, log_path
        except StepVisorError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the supervisor did not answer within 30 s") from None


def main(keep: bool = False) -> int:
    base = Path(tempfile.mkdtemp(prefix="stepvisor-demo-", dir="/tmp"))
    base.chmod(0o711)  # activations running as sandbox uids must reach the sockets inside
    proc, c, log_path = _start(base)
    print(f"supervisor pid {proc.pid}, state in {base / 'state'}, log {log_path}\n")
    try:
        for tenant, path in (
            ("acme", EXAMPLES / "acme" / "onboarding.py"),
            ("globex", EXAMPLES / "globex" / "reports.py"),
        ):
            r = c.deploy(tenant, path)
            print(f"deployed {tenant}: {', '.join(r['workflows'])} (version {r['version']})")
        runs = [
            ("acme", c.create("acme", "onboard", {"email": "ann@example.com"}, id="ann")["id"]),
            ("acme", c.create("acme", "onboard", {"email": "not-an-email"}, id="bob")["id"]),
            ("globex", c.create("globex", "nightly-report", {"factor": 2}, id="night-1")["id"]),
        ]
        # Sent before the workflow waits for it: events are stored and buffered per type.
        c.send_event("acme", "ann", "email-confirmed", {"at": "2026-01-01T12:00:00Z"})
        print("\nsent acme/ann an 'email-confirmed' event; it is buffered until she waits for it")
        for tenant, iid in runs:
            c.wait(tenant, iid, timeout_s=120)
        for tenant, iid in runs:
            print()
            print(views.history(c.history(tenant, iid)))  # the tenant's traceback too
        print("\ntenant output, attributed by the supervisor:")
        for line in log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                e = orjson.loads(line)
                if e.get("event") == "tenant.output":
                    print(f"  [{e['tenant']}/{e['instance']} step {e['step']!r}] {e['line']}")
    finally:
        c.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        print(f"\nsupervisor stopped (exit {code})")
        if keep:
            print(f"state kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0
