"""What activations say and what it does: one handler per message, and `settle`, the one place an
activation's fate is decided. The supervisor owns one `ActivationMessages` and hands it the
sandbox socket's messages (`drain`), the steps given to prepared activations (`activate`) and
every fate its loop decides (a reap, a deadline, a failed launch: `settle`)."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from protocol.codec import decode_from_activation, encode
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import MAX_WORKFLOWS, PROTOCOL_VERSION, WORKFLOW_NAME_RE
from protocol.messages import (
    Ack,
    Activate,
    Checked,
    CompleteCmd,
    FailCmd,
    Final,
    Hello,
    Inspected,
    InvokeCmd,
    SleepCmd,
    StepResult,
    StepStarted,
    WaitEventCmd,
)
from supervisor import checks, engine, launcher, outcome
from supervisor import journal as j
from supervisor.activation import (
    CONNECTED,
    IN_STEP,
    LAUNCHED,
    PARKED,
    SETTLED,
    Activation,
    DeployRequest,
)
from supervisor.activations import Activations
from supervisor.config import Config
from supervisor.journal.db import Db
from supervisor.outbox import Outbox
from supervisor.output import OutputCapture
from supervisor.prepared import Prepared
from supervisor.replay_cache import ReplayCache
from supervisor.sandbox_server import SandboxServer

if TYPE_CHECKING:  # a cycle at run time: client_requests takes our limits
    from supervisor.client_requests import Clients

MAX_MESSAGES_PER_TICK = 1000
MAX_BAD_FRAMES = 10  # garbage frames from one peer before it is ignored


# `workflow("name")` or `workflow(name='name')` with a plain literal: what a source file that
# defines workflow `name` contains. A regex with a literal prefix: one fast pass over the file.
_WORKFLOW_LITERAL = re.compile(
    rb"""workflow\(\s*(?:name\s*=\s*)?(?:"([^"\\\n]{1,1024})"|'([^'\\\n]{1,1024})')"""
)


def deployed_workflows(d: DeployRequest, reported: list[str]) -> list[str]:
    """The workflows an inspection reported, checked against the code it inspected: tenant code
    ran in that sandbox and may have said anything. Each name must be a valid workflow name
    written in the deployed bytes: a source file names it in `@workflow("...")`, a pickle (one
    workflow) holds it as UTF-8. A byte search, not a parse: this runs in the supervisor's loop,
    shared by every tenant, so it reads the code once (at most ~0.1 s for 8 MiB)."""
    names = sorted(set(reported))
    if not names or len(names) > MAX_WORKFLOWS:
        raise ProtocolError(
            ErrorCode.DEPLOY_FAILED,
            f"{d.filename}: its inspection reported {len(names)} workflows "
            f"(a file defines from 1 to {MAX_WORKFLOWS})",
        )
    if d.kind == "pickle" and len(names) != 1:
        raise ProtocolError(
            ErrorCode.DEPLOY_FAILED,
            f"{d.filename}: a pickled deploy is one workflow; its inspection reported {names}",
        )
    for name in names:
        if not WORKFLOW_NAME_RE.match(name):
            raise ProtocolError(
                ErrorCode.DEPLOY_FAILED,
                f"{d.filename}: workflow name {name!r} has a comma or a control character",
            )
    if d.kind == "pickle":
        written = {names[0].encode()} if names[0].encode() in d.code else set()
    else:
        written = {a or b for a, b in _WORKFLOW_LITERAL.findall(d.code)}
    for name in names:
        if name.encode() not in written:
            raise ProtocolError(
                ErrorCode.DEPLOY_FAILED,
                f"{d.filename}: its inspection reported workflow {name!r}, which the deployed "
                f"code does not name (write it as a literal: @workflow({name!r}))",
            )
    return names


class ActivationMessages:
    """The sandbox socket's messages and the activations' fates; owned by the supervisor."""

    def __init__(
        self,
        conn: Db,
        sandbox: SandboxServer,
        acts: Activations,
        prepared: Prepared,
        outbox: Outbox,
        clients: Clients,
        output: OutputCapture,
        log: Any,
        *,
        config: Callable[[], Config],
        add_tenant: Callable[[str], None],
    ) -> None:
        """`config()`: the supervisor's config now (a reload replaces it); `add_tenant`: tell
        the supervisor of a tenant a deploy made."""
        self.conn = conn
        self.sandbox = sandbox
        self.acts = acts
        self.prepared = prepared
        self.outbox = outbox
        self.clients = clients
        self.output = output
        self.log = log
        self.config = config
        self.add_tenant = add_tenant
        self.replay_cache = ReplayCache()  # code and settled journal heads, between activations
        self.bad_peers: dict[bytes, int] = {}  # garbage frames per sandbox peer
        # Settled this tick: their results commit with it (the loop stamps and clears them).
        self.settled_this_tick: list[Activation] = []

    def drain(self, now: float, mono: float) -> None:
        self.sandbox.pump()
        for _ in range(MAX_MESSAGES_PER_TICK):
            received = self.sandbox.receive()
            if received is None:
                return
            mono = time.monotonic()  # this message's own arrival, for the activation's phases
            identity, frames = received
            act = self.acts.get(identity.decode("ascii", "replace"))
            if act is None:
                if self.bad_peers.get(identity, 0) < MAX_BAD_FRAMES:
                    self.bad_peers[identity] = self.bad_peers.get(identity, 0) + 1
                    self.log.warning("sandbox.unknown_token", token=identity[:64].hex())
                continue
            if act.state == SETTLED:
                act.late_messages += 1
                if act.late_messages == 1:  # said once: a straggler may send many
                    act.log.warning("sandbox.late_message", outcome=act.outcome)
                continue
            if len(frames) != 1:
                self._protocol_error(act, "expected one frame per message", mono)
                continue
            try:
                msg = decode_from_activation(frames[0])
            except ProtocolError as exc:
                self._protocol_error(act, exc.message, mono)
                continue
            # Output written before this message is already in the pipes: log it under the
            # activation's state before the message changes it, so lines land on the right step.
            self.output.drain(act)
            self.conn.execute("SAVEPOINT message")
            try:
                self._on_message(act, msg, now, mono)
            except Exception as exc:
                self.conn.execute("ROLLBACK TO message")
                self.log.exception("sandbox.internal_error", activation=act.aid)
                self._protocol_error(
                    act, f"internal error handling {type(msg).__name__}: {exc!r}", mono
                )
            finally:
                self.conn.execute("RELEASE message")

    def admit(self, identity: bytes, uid: int) -> str | None:
        """Why a connection from `uid` may not speak under this token, or None: the token of an
        activation with a sandbox uid is good only from that uid (the sandbox server asks)."""
        act = self.acts.get(identity.decode("ascii", "replace"))
        if act is not None and act.uid is not None and uid != act.uid:
            return f"a token of an activation running as uid {act.uid}, from uid {uid}"
        return None

    def _fenced(self, act: Activation, mono: float) -> None:
        launcher.kill_group(act.pid)
        self.settle(act, outcome.FENCED, "the instance is no longer leased to it", mono)

    def _protocol_error(self, act: Activation, why: str, mono: float) -> None:
        launcher.kill_group(act.pid)
        self.settle(act, outcome.PROTOCOL_ERROR, why[:2000], mono)

    def _ack(self, act: Activation) -> None:
        """Acknowledge a final message: sent once its consequences are committed (and synced)."""
        # Its last message: nothing it says after this matters, so the connection closes with
        # it (the loop need not wake for the hang-up when the process exits).
        self.outbox.acknowledge(
            functools.partial(self.sandbox.send, act.identity, encode(Ack()), last=True)
        )

    def _on_message(self, act: Activation, msg: Any, now: float, mono: float) -> None:
        if isinstance(msg, Final):
            act.marks, act.result_mono = msg.marks, mono
        if isinstance(msg, Hello):
            self._on_hello(act, msg, now, mono)
            return
        if act.state == LAUNCHED:
            self._protocol_error(act, f"{type(msg).__name__} before Hello", mono)
            return
        if act.state == PARKED:
            self._protocol_error(act, f"{type(msg).__name__} before Activate", mono)
            return
        if act.kind == "inspect":
            self._on_inspect_result(act, msg, now, mono)
            return
        tenant, instance = act.tenant, act.instance
        assert instance is not None
        if not j.hold_lease(self.conn, tenant, instance, act.aid):
            # Its node lost the lease (it was paused past lease_s, or the instance was
            # terminated through another node): nothing it says may be journaled.
            self._fenced(act, mono)
            return
        if (
            isinstance(msg, StepStarted | SleepCmd | WaitEventCmd | InvokeCmd)
            and act.state == CONNECTED
        ):
            if msg.seq != act.expected_seq:
                kind = "step" if isinstance(msg, StepStarted) else "command"
                self._protocol_error(
                    act, f"{kind} at seq {msg.seq}, expected {act.expected_seq}", mono
                )
                return
            act.seq, act.step = msg.seq, msg.name
            refused = engine.command(self.conn, tenant, instance, msg, act.limits, now)
            if refused is not None:
                # Over the tenant's step limit, or not the command journaled at this seq (the
                # runtime checks that too, but it runs beside tenant code that can speak on its
                # socket: the supervisor decides from its own journal).
                launcher.kill_group(act.pid)
                how = outcome.ERROR if refused.code == "LIMIT_EXCEEDED" else outcome.PROTOCOL_ERROR
                detail = f"{refused.type}: {refused.message}"[:500]
                self.settle(act, how, detail, mono, committed=True)
                return
            if isinstance(msg, StepStarted):
                act.state = IN_STEP
                act.deadline_mono = mono + min(msg.timeout_s, act.limits.timeout_s)
                j.update_activation(self.conn, act.aid, seq=msg.seq, step=msg.name)
                # Acked at once, not after commit: this ack only orders the step's output after
                # this point in our log. Durability does not need it: if we die before
                # committing, the activation dies with us and the attempt re-runs as interrupted.
                self.sandbox.send(act.identity, encode(Ack()))
            else:
                self.settle(act, outcome.OK, "", mono, committed=True)
                self._ack(act)
        elif isinstance(msg, StepResult) and act.state == IN_STEP:
            if msg.seq != act.seq:
                self._protocol_error(act, f"result for seq {msg.seq}, started {act.seq}", mono)
                return
            msg = engine.step_finished(
                self.conn, tenant, instance, msg, act.limits, now, state_bytes=act.state_bytes
            )
            self.settle(act, self._result_outcome(msg), "", mono, committed=True)
            self._ack(act)
        elif isinstance(msg, CompleteCmd | FailCmd) and act.state == CONNECTED:
            engine.workflow_finished(self.conn, tenant, instance, msg, now)
            self.replay_cache.forget(tenant, instance)
            if isinstance(msg, FailCmd):
                detail = f"{msg.error.type}: {msg.error.message}"[:500]
                self.settle(act, outcome.ERROR, detail, mono, committed=True)
            else:
                self.settle(act, outcome.OK, "", mono, committed=True)
            self._ack(act)
        else:
            self._protocol_error(act, f"unexpected {type(msg).__name__} in state {act.state}", mono)

    @staticmethod
    def _result_outcome(msg: StepResult) -> str:
        if msg.ok:
            return outcome.OK
        if msg.error is not None and msg.error.type == "MemoryError":
            return outcome.OOM
        return outcome.ERROR

    def _on_hello(self, act: Activation, msg: Hello, now: float, mono: float) -> None:
        if act.state != LAUNCHED or msg.token != act.token:
            self._protocol_error(act, "unexpected or forged Hello", mono)
            return
        if msg.protocol_version != PROTOCOL_VERSION:
            self._protocol_error(
                act, f"protocol version {msg.protocol_version}, expected {PROTOCOL_VERSION}", mono
            )
            return
        act.hello_mono = mono
        if act.unbound:
            # Prepared ahead: it waits for a step, and is stopped if none comes soon.
            act.state = PARKED
            act.deadline_mono = mono + self.config().server.prepared_idle_s
            return
        self.activate(act, now, mono)

    def activate(self, act: Activation, now: float, mono: float) -> None:
        """Send a connected activation what it runs: an instance's journal, or code to inspect."""
        act.state = CONNECTED
        # Replaying and loading code gets the tenant's wall-clock cap too.
        act.deadline_mono = mono + act.limits.timeout_s
        if act.kind == "inspect":
            d = act.deploy
            assert d is not None
            activate = Activate(
                mode="inspect" if d.plan is None else "check",
                tenant=act.tenant,
                filename=d.filename,
                code_kind=d.kind,  # type: ignore[arg-type]
                code=d.code,
                now=now,
                max_timeout_s=act.limits.timeout_s,
                replays=[] if d.plan is None else d.plan.replays,
            )
        else:
            assert act.instance is not None
            if not j.hold_lease(self.conn, act.tenant, act.instance, act.aid):
                self._fenced(act, mono)
                return
            inst = j.get_instance(self.conn, act.tenant, act.instance)
            assert inst is not None
            act.expected_seq = engine.prepare_replay(self.conn, act.tenant, act.instance, now)
            code = self.replay_cache.code(self.conn, act.tenant, inst["version"])
            assert code is not None
            replay = self.replay_cache.journal(self.conn, act.tenant, act.instance)
            act.state_bytes = replay.state_bytes
            activate = engine.build_activate(inst, code, replay.entries, act.limits, now)
        self.outbox.activate(functools.partial(self.sandbox.send, act.identity, encode(activate)))

    def _on_inspect_result(self, act: Activation, msg: Any, now: float, mono: float) -> None:
        d = act.deploy
        assert d is not None
        if isinstance(msg, Checked) and d.plan is not None and act.state == CONNECTED:
            try:
                workflows = deployed_workflows(d, msg.workflows)
                results = checks.results_of(d.plan, msg.results)
            except ProtocolError as exc:
                self.clients.reply(d.identity, d.rid, error=exc)
                launcher.kill_group(act.pid)
                self.settle(act, outcome.PROTOCOL_ERROR, exc.message[:500], mono, committed=True)
                return
            report = checks.conclude(self.conn, act.tenant, d.plan, workflows, results, now)
            self.clients.reply(d.identity, d.rid, report)
            self.log.info(
                "code.checked",
                tenant=act.tenant,
                version=d.version,
                purpose=d.plan.purpose,
                instances=len(results),
                compatible=report["compatible"],
            )
            self.settle(act, outcome.OK, "", mono, committed=True)
            self._ack(act)
        elif isinstance(msg, Inspected) and d.plan is None and act.state == CONNECTED:
            try:
                workflows = deployed_workflows(d, msg.workflows)
            except ProtocolError as exc:
                self.clients.reply(d.identity, d.rid, error=exc)
                launcher.kill_group(act.pid)
                self.settle(act, outcome.PROTOCOL_ERROR, exc.message[:500], mono, committed=True)
                return
            j.ensure_tenant(self.conn, act.tenant, now)
            j.put_code(self.conn, act.tenant, d.version, d.kind, d.filename, d.code, workflows, now)
            for name in workflows:
                j.set_deployment(self.conn, act.tenant, name, d.version, now)
            self.add_tenant(act.tenant)
            self.clients.reply(
                d.identity,
                d.rid,
                {"tenant": act.tenant, "version": d.version, "workflows": workflows},
            )
            self.log.info(
                "code.deployed",
                tenant=act.tenant,
                version=d.version,
                workflows=workflows,
                filename=d.filename,
            )
            self.settle(act, outcome.OK, "", mono, committed=True)
            self._ack(act)
        elif isinstance(msg, FailCmd) and act.state == CONNECTED:
            err = msg.error
            text = f"{d.filename} failed to load: {err.type}: {err.message}"
            if err.traceback:
                text += "\n" + err.traceback
            self.clients.reply(
                d.identity, d.rid, error=ProtocolError(ErrorCode.DEPLOY_FAILED, text)
            )
            self.settle(
                act, outcome.ERROR, f"{err.type}: {err.message}"[:500], mono, committed=True
            )
            self._ack(act)
        else:
            self._protocol_error(act, f"unexpected {type(msg).__name__} from an inspection", mono)

    def settle(
        self, act: Activation, how: str, detail: str, mono: float, *, committed: bool = False
    ) -> None:
        """Decide an activation's fate once.

        `committed`: the caller already journaled the result (and replied to a deployer); only the
        record changes. Otherwise this is a failure and its consequence is journaled here.
        """
        if act.state == SETTLED:
            return
        was_step = act.state == IN_STEP
        act.state, act.outcome, act.detail, act.settled_mono = SETTLED, how, detail, mono
        self.output.settled(act)
        if act.unbound:
            self.prepared.forget(act)  # its process failed while it waited, or it was stopped
        self.acts.settled(act, held_slot=not act.unbound)
        self.settled_this_tick.append(act)
        now = time.time()
        j.update_activation(
            self.conn, act.aid, outcome=how, detail=detail or None, seq=act.seq, step=act.step
        )
        if committed:
            return
        if act.kind == "inspect":
            if act.deploy is not None:
                why = outcome.failure_message(how, detail)
                tail = act.stderr_tail.decode("utf-8", "replace").strip()
                self.clients.reply(
                    act.deploy.identity,
                    act.deploy.rid,
                    error=ProtocolError(ErrorCode.DEPLOY_FAILED, f"{why}\n{tail}".strip()),
                )
            return
        instance = act.instance
        if instance is None:  # prepared, and no step was given to it: nothing to journal
            return
        if how in (outcome.KILLED_BY_OPERATOR, outcome.FENCED):
            return  # the control operation, or the node that took the lease, decides what next
        if not j.hold_lease(self.conn, act.tenant, instance, act.aid):
            act.log.warning("activation.fenced", detail="the instance is no longer leased to it")
            return
        if how == outcome.INTERRUPTED:
            engine.interrupted(self.conn, act.tenant, instance, now)
            return
        err = outcome.crash_error(how, detail, act.stderr_tail.decode("utf-8", "replace"))
        if was_step and act.seq is not None:
            result = engine.step_failed(
                self.conn, act.tenant, instance, act.seq, err, now, retryable=True
            )
        else:
            result = engine.activation_failed(self.conn, act.tenant, instance, act.limits, err, now)
        act.log.warning(
            "activation.failed",
            outcome=how,
            detail=detail,
            seq=act.seq,
            step=act.step,
            next=result,
        )
