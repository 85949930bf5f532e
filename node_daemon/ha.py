"""High availability: a dead node is fenced through its fence device, then its VMs run elsewhere.

Every live daemon watches its peers' keepalives (``ha`` thread, twice per keepalive interval). A
peer whose keepalive has not changed for ``keepalive_s x dead_after`` seconds of this daemon's
connected time is judged ``dead``.

No daemon writes another node's keys. A verdict about a peer (``dead``, ``fencing``, ``fenced``,
``fence-failed``) is this daemon's own record ``/nodes/<self>/fences/<peer>``, naming the version
of the peer's own ``daemon_state`` it judged; everyone reads a node's state as its own combined
with the verdicts about its current version (_records.node_state, _cluster.read_node_states). A
node that writes its state again (its keepalive coming back, its daemon registering) makes every
older verdict stale. Fencing starts only in the transaction that creates the claim
``/nodes/<peer>/claims/<version>`` (create-once): the node coming back creates the same claim
when it writes ``run`` at that version, so exactly one of the two wins.

Exactly one live daemon acts on a dead node: the holder of the store's lock
``/locks/fence/<node>`` (taken without waiting; the others look again at their next pass). The
lock's node is ephemeral, so the actor's death (or its lost session) hands the work to another
daemon, which resumes from the state in ZooKeeper:

``dead``/``fencing``
    The claim and the ``fencing`` verdict are written (the claim only if no earlier actor made
    it: a hand-over), then the node's fence device (from this daemon's own configuration,
    never from ZooKeeper; node_daemon/fencing.py) powers it off and the power state is confirmed
    off. Confirmed: the verdict ``fenced`` (which makes the node's domain state read ``flushed``:
    nothing is placed there, and ``ready`` brings its VMs home). The verdict, with the record of
    the fence (who, how, when, the result), is the actor's own key ``/nodes/<actor>/fences/<node>``,
    which no other node may write. Not
    confirmed, or no device configured: ``fence-failed``, and nothing of the node is recovered
    until an operator confirms it is off (``pvc.cluster.node state=fenced confirm_down=true``).
    A node in maintenance (its ``maintenance`` flag, or domain state ``flushed``) is never fenced.
``fenced``
    Recovery (node_daemon/recovery.py decides): every VM assigned to the node that should run is
    assigned to a node chosen by the selector, in one version-checked transaction per VM with its
    audit record; that node's daemon starts it. What fits nowhere stays, not running, with the
    reason in ``failedreason``, and is tried again on later passes.

No quorum, no decisions: nothing is marked, fenced or recovered unless this daemon's session is
connected, holds the lock, and every write is a ZooKeeper transaction (a daemon that lost its
session can write nothing). The fence device is called only after the claim is written under
the lock, so a node that comes back in time wins, and a node claimed is fenced even if its
keepalive resumes (it cannot write ``run`` at a claimed version).
"""

from __future__ import annotations

import json
import threading
import time
import uuid as uuidlib

from pvc_cluster_common import _records as R
from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import VMRecord, read_fence_record, read_node_states, read_vms
from pvc_cluster_common._report import read_cluster
from pvc_cluster_common._requests import RequestError, history_key, placement_plan, submit_request
from pvc_cluster_common._selector import FailureCheck, FlushVM, PlannedMove, apply_plan, survives_node_failure
from pvc_cluster_common._store import ConflictError, StoreError, StoreLock, UnreachableError, text_of

from .context import DaemonContext, Outage, Service
from .faults import crash_point
from .fencing import FenceResult, fence
from .log import get_logger
from .migration import Migration, MigrationAgent
from .recovery import Act, LivenessTracker, fence_decision, plan_recovery

log = get_logger(__name__)

# How long a recovery actor waits for the live side of a migration involving the fenced node to
# resolve it, between passes (it holds the lock meanwhile).
WAIT_PASSES_S = 1.0


class HighAvailability(Service):
    def __init__(self, ctx: DaemonContext, migrations: MigrationAgent) -> None:
        super().__init__(ctx)
        self.migrations = migrations
        self.tracker = LivenessTracker(ctx.config.keepalive_interval_s * ctx.config.dead_after)
        self._tracker_lock = threading.Lock()
        self._outage = Outage("high availability")
        self._actors: dict[str, threading.Thread] = {}
        self._said: dict[str, str] = {}  # peer -> the last thing logged about it (said once)
        # peer -> monotonic time before which no new recovery pass starts (its last pass left only
        # VMs that fit nowhere: trying again at every pass would read every VM twice a second)
        self._quiet_until: dict[str, float] = {}
        self._stop = threading.Event()

    # ---- connection -------------------------------------------------------------------------

    def on_connection(self, connected: bool) -> None:
        """The daemon's session became usable (True) or not (False): every peer gets a new window."""
        with self._tracker_lock:
            if connected:
                self.tracker.connected(time.monotonic())
            else:
                self.tracker.disconnected()

    # ---- the pass ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self.on_connection(self.store.connected)
        while not stop.is_set():
            try:
                self.tick()
                if self.store.connected:  # a pass without a connection reads nothing
                    self._outage.passed()
            except UnreachableError as exc:
                # nothing is decided from a pass that could not read: a peer whose keepalive
                # could not be read is not thereby stale (its window starts again)
                with self._tracker_lock:
                    self.tracker.disconnected()
                self._outage.failed(exc)
            except StoreError as exc:
                log.warning("high availability pass: %s", exc)
            except Exception:  # one bad pass must not end the thread
                log.exception("high availability pass failed")
            stop.wait(self.config.keepalive_interval_s / 2)  # a timer, not a synchronisation

    def _say(self, peer: str, level, text: str, *args) -> None:
        message = text % args if args else text
        if self._said.get(peer) != message:
            self._said[peer] = message
            level(message)

    def tick(self) -> None:
        if not self.store.connected:
            with self._tracker_lock:
                self.tracker.disconnected()
            return
        everyone = self.store.list_children(self.schema.nodes(), missing_ok=True)
        peers = [peer for peer in everyone if peer != self.node]
        keys = (S.NODE_MAINTENANCE, S.NODE_KEEPALIVE)
        found = self.store.get_many([self.schema.node_key(peer, key) for peer in peers for key in keys])
        states = read_node_states(self.store, peers, everyone=everyone)
        now = time.monotonic()
        fence_failed = []
        for peer in peers:
            raw = {key: found[self.schema.node_key(peer, key)] for key in keys}
            with self._tracker_lock:
                self.tracker.observe(peer, text_of(raw[S.NODE_KEEPALIVE]), now)
                stale = self.tracker.stale(peer, now)
            state = states.get(peer)
            if state is None:
                continue
            daemon_state = state.daemon_state
            maintenance = text_of(raw[S.NODE_MAINTENANCE]) == "true"
            decision = fence_decision(daemon_state, state.domain_state, maintenance, stale)
            if daemon_state == "fence-failed":
                fence_failed.append(peer)
            if decision.act is Act.MARK_DEAD:
                if self._mark_dead(peer, state.version):
                    log.warning("node %s: no keepalive for %.1f s: marked dead", peer, self.tracker.window_s)
                    self._start_actor(peer)
            elif decision.act is Act.FENCE:
                self._start_actor(peer)
            elif decision.act is Act.RECOVER:
                if now >= self._quiet_until.get(peer, 0.0) and self._has_work(peer):
                    self._start_actor(peer)
            elif decision.act in (Act.MAINTENANCE, Act.WAIT_OPERATOR):
                self._say(
                    peer,
                    log.warning if decision.act is Act.MAINTENANCE else log.error,
                    "node %s is %s: %s",
                    peer,
                    daemon_state,
                    decision.why,
                )
            else:
                self._said.pop(peer, None)
        if self.metrics:
            self.metrics.fence_failed_nodes(peers, fence_failed)

    def _verdict(self, peer: str, result: str, version: int, **fields) -> dict:
        """This node's verdict about ``peer`` at the version ``version`` of its daemon_state."""
        record = {"by": self.node, "method": "none", "result": result, "started": round(time.time(), 3)}
        record.update(fields, version=version)
        return record

    def _verdict_writes(self, peer: str, record: dict) -> dict:
        """The writes of one verdict: this node's record, and the note in ``peer``'s claims
        container, whose version every verdict changes (a source's transfer checks it)."""
        note = {"by": self.node, "result": record["result"], "version": record["version"]}
        return {
            self.schema.node_fence_record(self.node, peer): json.dumps(record),
            self.schema.node_claims(peer): json.dumps(note),
        }

    def _mark_dead(self, peer: str, version: int) -> bool:
        """The verdict ``dead`` about ``peer`` at ``version`` of its daemon_state (checked in the
        transaction: a peer that wrote its state since has answered it)."""
        if version < 0:
            return False
        state_path = self.schema.node_key(peer, S.NODE_DAEMON_STATE)
        try:
            self.store.commit(
                self._verdict_writes(peer, self._verdict(peer, "dead", version)),
                expect_versions={state_path: version},
            )
        except ConflictError:
            return False
        return True

    def _has_work(self, peer: str) -> bool:
        """Whether the fenced ``peer`` may have VMs to recover (the watch-fed table: cheap)."""
        return any(
            record.node == peer and record.state in ("start", "restart") for record in self.domains.snapshot().values()
        )

    def _start_actor(self, peer: str) -> None:
        thread = self._actors.get(peer)
        if thread is not None and thread.is_alive():
            return
        thread = threading.Thread(target=self._act, args=(peer,), name=f"ha-{peer}", daemon=True)
        self._actors[peer] = thread
        thread.start()

    # ---- the actor --------------------------------------------------------------------------

    def _act(self, peer: str) -> None:
        with self.store.try_lock(self.schema.fence_lock(peer), identifier=self.node) as lock:
            if lock is None:
                return  # another daemon acts on it, or ZooKeeper cannot be asked now
            try:
                self._act_locked(peer, lock)
            except StoreError as exc:
                log.error("node %s: fencing or recovery stopped: %s (the next pass resumes it)", peer, exc)
            except Exception:
                log.exception("node %s: fencing or recovery failed (the next pass resumes it)", peer)

    def _holding(self, lock: StoreLock) -> bool:
        return lock.held and not self._stop.is_set()

    def _act_locked(self, peer: str, lock: StoreLock) -> None:
        state = read_node_states(self.store, [peer]).get(peer)
        if state is None:
            return
        maintenance = self.store.find_text(self.schema.node_key(peer, S.NODE_MAINTENANCE))
        decision = fence_decision(state.daemon_state, state.domain_state, maintenance == "true", stale=False)
        if decision.act is Act.FENCE:
            if not self._fence(peer, state, lock):
                return
        elif decision.act is not Act.RECOVER:
            return
        self._recover(peer, lock)

    def _fence(self, peer: str, state, lock: StoreLock) -> bool:
        """Fence ``peer`` (its state as read: _records.NodeState). True when it is fenced.

        Claims the version of ``peer``'s daemon_state the verdict judges (unless an earlier
        actor claimed it: then this one takes over), in the transaction that writes this node's
        verdict ``fencing``; the node's own keepalive claims the same version when it comes
        back, so exactly one of the two wins."""
        version = state.version
        state_path = self.schema.node_key(peer, S.NODE_DAEMON_STATE)
        device = self.config.fence_devices.get(peer)
        started = time.time()
        record = self._verdict(
            peer,
            "fencing",
            version,
            method=device.method if device else "none",
            device=device.describe() if device else "",
            started=round(started, 3),
        )
        if not self._holding(lock):
            return False
        claim = self.schema.node_claim(peer, version)
        values = self._verdict_writes(peer, record)
        create = []
        if not state.claimed:
            values[claim] = self.node
            create.append(claim)
        try:
            self.store.commit(values, expect_versions={state_path: version}, create=create)
        except ConflictError:
            log.info("node %s changed state before it could be fenced: looking again", peer)
            return False
        if device is None:
            result = FenceResult(
                False,
                f"no fence device for node {peer} in this daemon's configuration "
                f"({self.config.source or 'fencing.nodes'})",
                "none",
                started,
                time.time(),
            )
        else:
            log.warning("node %s is dead: fencing it through %s", peer, device.describe())
            result = fence(device, self.config.fence_timeout_s)
        if not self._holding(lock):
            # Our session went while the device worked: another daemon fences it again (a power
            # off is idempotent) and writes the result.
            log.warning(
                "node %s: lost the ZooKeeper session or the fence lock while fencing; the next actor fences it again",
                peer,
            )
            return False
        record.update(
            result="fenced" if result.ok else "fence-failed",
            detail=result.detail,
            finished=round(result.finished, 3),
            duration_s=round(result.finished - result.started, 3),
        )
        try:
            # still the version claimed: a node that registered again meanwhile has answered
            self.store.commit(self._verdict_writes(peer, record), expect_versions={state_path: version})
        except ConflictError:
            log.warning("node %s changed state while it was fenced (%s); looking again", peer, result.detail)
            return False
        if self.metrics:
            self.metrics.fence(result.method, result.ok, result.finished - result.started)
        if result.ok:
            log.ok("node %s fenced: %s (%.2f s)", peer, result.detail, result.finished - result.started)
            crash_point("ha:fenced")  # test fault injection (tests/lab/test_ha_lab.py)
            return True
        log.error(
            "node %s: FENCE FAILED: %s. Its VMs are NOT recovered: power it off by hand, then confirm with "
            "pvc.cluster.node name=%s state=fenced confirm_down=true",
            peer,
            result.detail,
            peer,
        )
        return False

    # ---- recovery ---------------------------------------------------------------------------

    def _candidates(self, peer: str) -> list[VMRecord]:
        """The VMs that the recovery of ``peer`` plans from: every VM assigned to it or with a
        migration naming it (fresh reads)."""
        uuids = self.store.list_children(self.schema.domains(), missing_ok=True)
        return [
            vm
            for vm in read_vms(self.store, uuids).values()
            if vm.node == peer or (vm.migration is not None and peer in (vm.migration.source, vm.migration.target))
        ]

    def _fenced_nodes(self) -> set[str]:
        return {name for name, state in read_node_states(self.store).items() if state.daemon_state == "fenced"}

    def _recover(self, peer: str, lock: StoreLock) -> None:
        fence_record: dict | None = None
        while self._holding(lock):
            state = read_node_states(self.store, [peer]).get(peer)
            if state is None or state.daemon_state != "fenced":
                return  # its daemon started again (init): what is still assigned to it is its own
            if fence_record is None:
                # the verdict that fenced it, or an operator's confirm_down
                fence_record = state.verdict or self._fence_record(peer)
            candidates = self._candidates(peer)
            snapshot = read_cluster(self.store)
            plan = plan_recovery(
                peer,
                candidates,
                snapshot.views(),
                self._fenced_nodes(),
                self.config.default_selector,
                running_by_node=snapshot.running_memory_by_node(),
            )
            for uuid in plan.aborts:
                self._end_migration_between_fenced(uuid, peer)
            n1, check = self._n1_after(peer, plan, candidates, snapshot) if plan.starts else (None, None)
            for start in plan.starts:
                if not self._holding(lock):
                    return
                if not self._recover_one(peer, start, fence_record, state.version, n1):
                    break  # its daemon state changed (it starts again?): look again
            else:
                if check is not None:
                    self._report_n1(peer, len(plan.starts), check, snapshot)
            for uuid, why in plan.unplaced.items():
                self._not_recovered(uuid, peer, why)
            if not plan.waiting and not plan.aborts:
                if plan.unplaced:
                    self._quiet_until[peer] = time.monotonic() + self.tracker.window_s
                if plan.starts:
                    log.ok(
                        "node %s: %d VM(s) recovered elsewhere%s",
                        peer,
                        len(plan.starts),
                        f"; {len(plan.unplaced)} fit nowhere and stay stopped" if plan.unplaced else "",
                    )
                return
            for uuid, why in plan.waiting.items():
                self._say(f"{peer}/{uuid}", log.info, "node %s: VM %s waits: %s", peer, uuid, why)
            if self._stop.wait(WAIT_PASSES_S):
                return

    def _fence_record(self, peer: str) -> dict:
        """The latest record of ``peer``'s fence (by whichever node fenced it, or an operator's
        confirm_down); an invalid one only makes the audit record poorer."""
        return read_fence_record(self.store, peer)

    def _n1_after(self, peer: str, plan, candidates, snapshot) -> tuple[dict, FailureCheck]:
        """The n-1 verdict of the cluster once ``plan``'s VMs run on their targets: the audit
        records' form and the check (which :meth:`_report_n1` reports once the VMs are assigned).

        require_n1 never refuses a recovery: its VMs were running and are down now, and the
        policy is about the *next* failure. Leaving them stopped to keep room for a failure that
        has not happened would turn one lost node into an outage now, so they are restarted (the
        plan preferring targets that keep n-1: plan_recovery), and the verdict (with require_n1 as
        set) is kept in each VM's recovery record."""
        by_uuid = {vm.uuid: vm for vm in candidates}
        vms = [FlushVM(start.uuid, by_uuid[start.uuid].memory_mib, (), None, None) for start in plan.starts]
        moves = [PlannedMove(start.uuid, start.target, "recovery") for start in plan.starts]
        views, running = apply_plan(peer, vms, moves, snapshot.views(), snapshot.running_memory_by_node())
        check: FailureCheck = survives_node_failure(views, running)
        record = {
            "ok": "true" if check.ok else "false",
            "require_n1": "true" if snapshot.require_n1 else "false",
            "detail": check.message[: R.MAX_REASON_BYTES],
        }
        return record, check

    def _report_n1(self, peer: str, count: int, check: FailureCheck, snapshot) -> None:
        """Said loudly once a recovery's VMs are assigned: when it left the cluster failing n-1, an
        error in the log and this node's ``recovery_n1`` (which pvc.cluster.node_info reports); when
        it kept n-1, an earlier recovery's ``recovery_n1`` is deleted. Written after the VMs are
        assigned, so that a failure to write it never holds a recovery back."""
        verdict_path = self.schema.node_key(self.node, S.NODE_RECOVERY_N1)
        try:
            if not check.ok:
                log.error(
                    "node %s: restarting %d VM(s) elsewhere leaves the cluster failing n-1: %s%s",
                    peer,
                    count,
                    check.message,
                    " (require_n1 is set; it never holds back the recovery of a failed node's VMs)"
                    if snapshot.require_n1
                    else "",
                )
                verdict = (
                    f"recovery of fenced node {peer} ({count} VM(s) restarted elsewhere) left the cluster"
                    f" failing n-1: {check.message}"
                )
                self.store.commit({verdict_path: verdict.encode()[: R.MAX_REASON_BYTES].decode(errors="ignore")})
            elif snapshot.nodes.get(self.node, {}).get(S.NODE_RECOVERY_N1) is not None:
                self.store.delete([verdict_path])  # an earlier recovery's verdict no longer applies
        except StoreError as exc:
            log.error("node %s: could not write this node's %s: %s", peer, S.NODE_RECOVERY_N1, exc)

    def _recover_one(self, peer: str, start, fence_record: dict, state_version: int, n1: dict | None = None) -> bool:
        """Assign one VM of the fenced ``peer`` to its planned target, through the one request
        path (_requests.submit_request): the fit on the target, its reservation and the
        version-checked rewrite of its reservations znode in the same transaction, which also
        checks the VM's ``node`` and the peer's daemon state (still the ``fenced`` of version
        ``state_version``): a node whose daemon starts again registers first, so from then on no
        VM still assigned to it is moved away while it may be starting it. False when the daemon
        state changed."""
        found = read_vms(self.store, [start.uuid]).get(start.uuid)
        if (
            found is None
            or found.node != peer
            or found.migration is not None
            or found.state not in ("start", "restart")
        ):
            return True  # changed since the plan: the next pass sees it
        now = time.time()
        record_id = uuidlib.uuid4().hex[:12]
        audit = {
            "kind": R.RECOVERY_KIND,
            "id": record_id,
            "vm": start.uuid,
            "name": found.name,
            "source": peer,
            "target": start.target,
            "lastnode": start.lastnode,
            "requester": self.node,
            "result": "recovered",
            "memory_mib": found.memory_mib,
            "fence": {key: fence_record[key] for key in ("method", "device", "by", "detail") if key in fence_record},
            "steps": {
                name: fence_record[key]
                for name, key in (("fencing", "started"), ("fenced", "finished"))
                if isinstance(fence_record.get(key), (int, float))
            }
            | {"recovered": round(now, 3)},
        }
        if isinstance(fence_record.get("started"), (int, float)):
            audit["duration_s"] = round(max(0.0, now - fence_record["started"]), 3)
        if n1 is not None:
            audit["n1"] = n1
        history = self.schema.domain_history(start.uuid) + "/" + history_key(record_id, now)
        values: dict[str, object] = {
            history: json.dumps(audit, sort_keys=True),
            self.schema.domain_key(start.uuid, S.DOMAIN_FAILEDREASON): "",
        }
        expect: dict[str, int] = {}
        create = [history]
        if found.state == "restart":
            # it is not running: a start (the runstate record: the desired state is the operator's)
            run_path = self.schema.domain_key(start.uuid, S.DOMAIN_RUNSTATE)
            values[run_path] = R.runstate_after(found.runstate, "start", found.state_version, self.node, now).to_json()
            if found.runstate_version >= 0:
                expect[run_path] = found.runstate_version
            else:
                create.append(run_path)
        # The target's memprov counts the VM only from its next keepalive: until then a
        # reservation covers it (docs/architecture.md, "Memory accounting"); the fit is checked
        # against the target's figures and reservations as they are at this commit.
        plan = placement_plan(found, peer, start.target, start.lastnode, migrates=False, message="recovery")
        state_path = self.schema.node_key(peer, S.NODE_DAEMON_STATE)
        try:
            submit_request(
                self.store,
                plan,
                found,
                requester=self.node,
                fit=True,
                also_values=values,
                also_expect={**expect, state_path: state_version},
                also_create=create,
                parent_value=f"recovery {record_id}",
            )
        except ConflictError as exc:
            if exc.path == state_path:
                log.info("node %s changed its daemon state during recovery: looking again", peer)
                return False
            log.info("VM %s changed while it was recovered; the next pass sees it", found.name)
            return True
        except RequestError as exc:
            log.info("VM %s of fenced node %s: %s; the next pass plans it again", found.name, peer, exc)
            return True
        self.migrations._prune_history(start.uuid)
        log.ok(
            "VM %s of fenced node %s: recovered on %s (home: %s)",
            found.name,
            peer,
            start.target,
            start.lastnode or start.target,
        )
        crash_point("ha:recovered-one")  # test fault injection (tests/lab/test_ha_lab.py)
        if self.metrics:
            self.metrics.recovery("recovered")
        return True

    def _not_recovered(self, uuid: str, peer: str, why: str) -> None:
        reason = f"not recovered from fenced node {peer}: {why}"[: R.MAX_REASON_BYTES]
        path = self.schema.domain_key(uuid, S.DOMAIN_FAILEDREASON)
        if self.store.find_text(path) != reason:
            self.store.commit({path: reason})
            log.error("VM %s: %s", uuid, reason)
            if self.metrics:
                self.metrics.recovery("unplaced")

    def _end_migration_between_fenced(self, uuid: str, peer: str) -> None:
        """Both sides of the VM's migration are fenced: nothing runs it, and no daemon is left to
        end the record. End it as aborted (the VM back on its source), version-checked; the next
        pass recovers it from there."""
        record, version = self.migrations.read_record(uuid)
        if record is None or peer not in (record.source, record.target):
            return
        if self.migrations.abort(
            Migration(uuid, record, version),
            f"both {record.source} and {record.target} were fenced",
            node=record.source,
        ):
            log.warning("VM %s: migration %s between fenced nodes ended", uuid, record.id)
