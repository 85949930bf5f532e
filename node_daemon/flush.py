"""Flush and ready: this node's domain state worker.

An operator (the ``pvc.cluster.node`` module) writes the node's domain state ``flush`` or
``unflush``; this worker, woken by a watch on that key, does the work and writes ``flushed`` or
``ready``. A new request while a worker runs stops it cleanly between migrations (in-flight ones
finish), then the new one starts.

Flush: every VM that should run here is migrated away (temporary migrations, so each remembers
this node as home), at most ``flush_parallel`` at once, each target chosen by the shared planner
with reservations counted; VMs that fit nowhere are shut down and marked autostart (their runstate
record: a daemon never writes a VM's desired state nor its meta). The node is ``flushed`` only when
libvirt runs nothing here that ZooKeeper assigns to it.
Ready: VMs whose home is this node come back (unmigrate), autostart VMs (the flush's mark, or the
operator's meta node_autostart not yet acted on) start, then ``ready``.

require_n1 (the cluster setting): a VM's return home that would leave the cluster unable to
restart every running VM after the loss of any one node is refused, as ``pvc.cluster.vm_migrate``
refuses an unmigrate (the VM stays where it runs, its ``lastnode`` kept, so the next ready or
unmigrate brings it home). A flush is checked when it is asked (``pvc.cluster.node`` refuses one
whose plan fails, before anything is written), and again before each wave of its migrations: a
running flush whose plan would now fail the check (the cluster changed meanwhile) stops before
that wave. The node stays ``flush``, the VMs moved so far stay where they went, and the node's
``flush_halted`` key says why (the node that could not be survived and by how much); writing
``flush`` again retries (checked again), ``unflush`` brings the VMs home. Each flush or ready
deletes that key when it starts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import (
    VMRecord,
    meta_from,
    meta_paths,
    move_runstate,
    read_node_views,
    read_vm,
    read_vms,
    wait_for_key,
    wait_until_gone,
)
from pvc_cluster_common import _records as R
from pvc_cluster_common._decode import Invalid
from pvc_cluster_common._records import MigrationRecord
from pvc_cluster_common._report import read_cluster, read_require_n1, request_n1_check, request_n1_refusal
from pvc_cluster_common._requests import REQUEST_ATTEMPTS, RequestError, RequestPlan, plan_request, submit_request
from pvc_cluster_common._selector import (
    FlushVM,
    NodeView,
    PlannedMove,
    apply_plan,
    plan_flush,
    resolve_selector,
    survives_node_failure,
)
from pvc_cluster_common._store import Attempts, ConflictError, StoreError, UnreachableError, Versioned, text_of

from .context import DaemonContext, Service
from .log import get_logger

if TYPE_CHECKING:
    from .reconciler import Reconciler

# What a request's planning sees of the nodes, changed (a node being made ready takes its VMs as
# if it were ready already); and (VM record, node views) as a caller has just read them.
NodesOverride = Callable[[dict[str, NodeView]], dict[str, NodeView]]
Known = tuple[VMRecord, dict[str, NodeView] | None]

log = get_logger(__name__)

# Outcomes of migrate_and_wait after which a VM is home (or has nothing left to do).
HOME_OR_MOOT = ("finished", "unchanged", "re-homed", "gone")
HOMECOMING_ROUNDS = 3

# The meta a flush plan (placement) and its requests (the method a record names) read.
PLANNING_META = (S.META_NODE_LIMIT, S.META_NODE_SELECTOR, S.META_MIGRATION_METHOD)


def _not_shutting_down(value: str | None) -> bool:
    """Whether a runstate record (as stored) no longer says ``shutdown``: the shutdown it asked
    for ended, or the record is gone or not valid (nothing to wait for)."""
    try:
        record = R.runstate(value, "runstate")
    except Invalid:
        return True
    return record is None or record.state != "shutdown"


class Cancelled(Exception):
    """A newer domain state stopped this flush or ready between two migrations."""


class Halted(Exception):
    """require_n1 stopped this flush before a wave: the verdict is the message."""


class NodeStateWorker(Service):
    def __init__(self, ctx: DaemonContext, reconciler: Reconciler) -> None:
        super().__init__(ctx)
        self.reconciler = reconciler
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._stopped = threading.Event()
        # target -> lock held while a request to it is submitted (see _submit); its own guard,
        # since _switch holds _lock while the worker it stops finishes its submissions
        self._submitting: dict[str, threading.Lock] = {}
        self._submitting_guard = threading.Lock()
        # libvirt's lifecycle events here, counted (see _wait_for_libvirt); notified on a cancel too
        self._libvirt_changed = threading.Condition()
        self._libvirt_events = 0

    def start(self) -> None:
        if self.hypervisor is not None:
            self.hypervisor.add_lifecycle_listener(self._on_lifecycle)
        self.store.watch_data(self.schema.node_key(self.node, S.NODE_DOMAIN_STATE), self._on_state)

    def stop(self) -> None:
        self._stopped.set()
        self._cancel.set()
        self._wake()

    def _on_lifecycle(self, _uuid: str, _event: str, _detail: int) -> None:
        """On libvirt's event thread: count the event, wake a flush waiting on libvirt."""
        with self._libvirt_changed:
            self._libvirt_events += 1
            self._libvirt_changed.notify_all()

    def _wake(self) -> None:
        with self._libvirt_changed:
            self._libvirt_changed.notify_all()

    def libvirt_mark(self) -> int:
        """The count of libvirt lifecycle events seen here so far, for _wait_for_libvirt."""
        with self._libvirt_changed:
            return self._libvirt_events

    def _wait_for_libvirt(self, mark: int, cancel: threading.Event) -> None:
        """Wait until libvirt reports a lifecycle event here after ``mark`` (libvirt_mark, taken
        before the check that found something still running), at most one keepalive interval
        (events lost across a reconnection are not waited for); Cancelled when ``cancel`` is set
        meanwhile."""
        with self._libvirt_changed:
            self._libvirt_changed.wait_for(
                lambda: cancel.is_set() or self._libvirt_events != mark, timeout=self.config.keepalive_interval_s
            )
        if cancel.is_set():
            raise Cancelled()

    def _on_state(self, value: Versioned | None) -> bool:
        if self._stopped.is_set():
            return False
        # any text can be there: it is compared, never decoded
        state = value.value if value else None
        if state in ("flush", "unflush"):
            threading.Thread(target=self._switch, args=(state,), name=f"node-{state}", daemon=True).start()
        return True

    def _switch(self, state: str) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                log.info("domain state is now %s: stopping the running worker first", state)
                self._cancel.set()
                self._wake()
                self._thread.join()
            self._cancel = threading.Event()
            target = self.flush if state == "flush" else self.ready
            self._thread = threading.Thread(
                target=self._guarded,
                args=(target, state, self._cancel),
                name="node-flush" if state == "flush" else "node-ready",
                daemon=True,
            )
            self._thread.start()

    def _guarded(self, work: Callable[[threading.Event], None], state: str, cancel: threading.Event) -> None:
        try:
            with self.store.lock(self.schema.node_lock(self.node), timeout_s=self.config.step_timeout_s):
                if self.store.find_text(self.schema.node_key(self.node, S.NODE_DOMAIN_STATE)) != state:
                    return  # superseded while we waited for the lock
                # a new flush or ready: an earlier flush's halt no longer applies
                self.store.delete([self.schema.node_key(self.node, S.NODE_FLUSH_HALTED)])
                work(cancel)
        except Cancelled:
            log.info("%s of node %s stopped before it finished", state, self.node)
        except Halted as exc:
            log.error("%s", exc)
        except StoreError as exc:
            log.error("%s of node %s failed: %s", state, self.node, exc)
        except Exception:
            log.exception("%s of node %s failed", state, self.node)

    def _set_domain_state(self, expected: str, new: str) -> None:
        path = self.schema.node_key(self.node, S.NODE_DOMAIN_STATE)
        current = self.store.find(path)
        if current and current.value == expected:
            try:
                self.store.commit({path: new}, expect_versions={path: current.version})
            except ConflictError:
                return  # changed meanwhile (an operator's new request): that one stands
            log.ok("node %s is %s", self.node, new)

    # ---- one migration, waited for -------------------------------------------------------------

    def migrate_and_wait(
        self,
        uuid: str,
        kind: str,
        target: str | None,
        nodes_override: NodesOverride | None = None,
        attempts: int = REQUEST_ATTEMPTS,
        known: Known | None = None,
    ) -> str:
        """Request one migration and wait for it to end. ``known`` = (VM record, node views) as
        the caller has just read them, for the first attempt: the request's own transaction
        re-checks what matters (the VM's node version, the target's reservations and memory).
        A request that lost a race with another one is planned again from fresh reads; every
        conflict, at any step, counts against one budget of ``attempts``."""
        budget = Attempts(attempts)
        first = known
        while True:
            try:
                return self._migrate_and_wait_once(uuid, kind, target, budget, nodes_override, first)
            except ConflictError as exc:
                if not budget.again():
                    log.warning(
                        "VM %s: request raced others %d times (last: %s); giving up for now", uuid, budget.limit, exc
                    )
                    return "conflict"
                log.info("VM %s: request raced another one (%s); planning again (%s)", uuid, exc, budget)
            first = None

    def _migrate_and_wait_once(
        self,
        uuid: str,
        kind: str,
        target: str | None,
        budget: Attempts,
        nodes_override: NodesOverride | None = None,
        known: Known | None = None,
    ) -> str:
        try:
            vm, nodes = known if known else (read_vm(self.store, uuid), None)
        except UnreachableError as exc:
            # not read is not gone: "unreadable" is tried again, like any outcome not HOME_OR_MOOT
            log.warning("VM %s: cannot be read now: %s", uuid, exc)
            return "unreadable"
        if vm is None:
            return "gone"  # read_vm says None only for a VM whose key does not exist
        nodes = dict(nodes) if nodes else read_node_views(self.store)
        if nodes_override:
            nodes.update(nodes_override(nodes))
        try:
            plan = plan_request(vm, kind, nodes, target=target, default_selector=self.config.default_selector)
        except RequestError as exc:
            if target is not None and kind == "migrate":
                # the planned target filled up meanwhile: let the selector choose again
                return self._migrate_and_wait_once(uuid, kind, None, budget, nodes_override)
            log.warning("VM %s: %s", vm.name, exc)
            return f"refused: {exc}"
        if not plan.changed:
            return "unchanged"
        if kind == "unmigrate" and plan.migrates:
            refusal = self._n1_refusal(plan, nodes_override)
            if refusal:
                log.warning(
                    "VM %s: %s; it stays on %s, and the next ready or unmigrate brings it home",
                    vm.name,
                    refusal,
                    plan.source,
                )
                return f"refused: {refusal}"
        try:
            record = self._submit(plan, vm, kind, budget)
        except RequestError as exc:
            # the target's fresh view (reservations made since our reads) refused it
            if target is not None and kind == "migrate":
                return self._migrate_and_wait_once(uuid, kind, None, budget, nodes_override)
            log.warning("VM %s: %s", vm.name, exc)
            return f"refused: {exc}"
        log.info("VM %s: %s", vm.name, plan.message)
        if record is None:
            return "re-homed"
        timeout = (
            self.config.step_timeout_s * 3 + self.config.live_timeout_s(vm.memory_mib) + self.config.shutdown_timeout_s
        )
        if not wait_until_gone(self.store, self.schema.domain_migration(uuid), timeout):
            log.warning("VM %s: migration %s still in flight after %.0f s", vm.name, record.id, timeout)
            return "timeout"
        return "finished"

    def _n1_refusal(self, plan: RequestPlan, nodes_override: NodesOverride | None) -> str | None:
        """Why require_n1 refuses ``plan`` (a running VM's move), or None (also when the policy is
        off). The check reads the whole cluster: only when the policy is on."""
        if not read_require_n1(self.store, []):
            return None
        snapshot = read_cluster(self.store)
        views = snapshot.views()
        if nodes_override:
            views.update(nodes_override(views))
        check = request_n1_check(snapshot, plan, views)
        return None if check.ok else request_n1_refusal(check, plan)

    def _running_for_fit(self, flush_vms: list[FlushVM]) -> dict[str, list[int]] | None:
        """The memory of the VMs each node runs (this node's: the VMs leaving it), for plan_flush's
        n-1 rule, which only ``fit`` uses (a balanced plan that would lose n-1 gives way to best fit
        if that keeps it, as pvc.cluster.node's check mode plans it); None (no cluster read) when
        no VM leaving uses ``fit``."""
        if not any(resolve_selector(vm.selector, self.config.default_selector) == "fit" for vm in flush_vms):
            return None
        running = read_cluster(self.store).running_memory_by_node()
        running[self.node] = [int(vm.memory_mib) for vm in flush_vms]
        return running

    def _flush_n1_halt(self, vms: list[Any], plan: list[PlannedMove]) -> str | None:
        """Under require_n1, the verdict that stops a running flush whose ``plan`` (the rest of
        it) would leave the cluster failing the n-1 check, naming the node that could not be
        survived and the shortfall; None when the plan passes or the policy is off."""
        if not read_require_n1(self.store, []):
            return None
        snapshot = read_cluster(self.store)
        flush_vms = [FlushVM(vm.uuid, vm.memory_mib, (), None, None) for vm in vms if not vm.xml_error]
        views, running = apply_plan(self.node, flush_vms, plan, snapshot.views(), snapshot.running_memory_by_node())
        check = survives_node_failure(views, running)
        if check.ok:
            return None
        moving = sum(1 for move in plan if move.target is not None)
        return (
            f"flush of {self.node} halted before moving {moving} more VM(s): once done, {check.message}"
            " (require_n1 is set; the VMs moved so far stay where they are: write domain state flush again"
            " to retry once the cluster has room, or unflush to bring them home)"
        )

    def _submit(self, plan: RequestPlan, vm: VMRecord, kind: str, budget: Attempts) -> MigrationRecord | None:
        """Submit; when only the target's reservations changed underneath (another request to
        the same target), submit again at once, within the request's ``budget``: the request
        re-reads the target's reservations and memory itself, and nothing about the VM changed.
        Any other conflict (or the last) goes back to the caller, which plans again from fresh
        reads if the budget allows.

        Every request to a target rewrites the target's reservations with a version check, so
        this daemon's own parallel requests to one target (all of them, when a ready brings its
        VMs home) would mostly fail against each other, and one could lose every time: they
        are submitted one at a time per target (a submission is one round of reads and one
        write; the migrations themselves still run in parallel)."""
        reservations = self.schema.node_reservations(plan.target)
        with self._submitting_guard:
            submitting = self._submitting.setdefault(plan.target, threading.Lock())
        while True:
            try:
                with submitting:
                    return submit_request(
                        self.store,
                        plan,
                        vm,
                        requester=f"{self.node} ({kind})",
                        target_unflushing_ok=plan.target == self.node,
                    )
            except ConflictError as exc:
                if exc.path != reservations or not budget.again():
                    raise
                log.debug(
                    "VM %s: another request to %s came first; submitting again (%s)", vm.name, plan.target, budget
                )

    def _shutdown_for_flush(self, uuid: str) -> None:
        vm = read_vm(self.store, uuid)
        if vm is None:
            return
        log.warning("VM %s fits on no other node: shutting it down and marking it autostart", vm.name)
        if not move_runstate(self.store, uuid, "shutdown", self.node, expected="start", autostart=True):
            log.info("VM %s: its state changed meanwhile; not shut down for the flush", vm.name)
            return
        # the reconciler records the end of the shutdown (state stop) in the same key
        wait_for_key(
            self.store,
            self.schema.domain_key(uuid, S.DOMAIN_RUNSTATE),
            _not_shutting_down,
            self.config.shutdown_timeout_s + self.config.step_timeout_s,
        )

    # ---- flush ------------------------------------------------------------------------------------

    def running_here(self) -> set[str]:
        """Cluster VMs libvirt runs on this node, other than VMs migrating away right now."""
        local = {ref.uuid for ref in self.reconciler.hypervisor.list_domains(active_only=True)}
        return {
            uuid
            for uuid, record in self.domains.snapshot().items()
            if uuid in local and record.migration_source != self.node
        }

    def read_vms(self, uuids: Iterable[str]) -> list[VMRecord]:
        """Fresh VM records, in one round of parallel reads."""
        return list(read_vms(self.store, uuids).values())

    def vms_to_flush(self, fresh: bool = True) -> list[VMRecord]:
        """VMs that should run here, with no migration in flight, as VM records to plan from.

        The watch-fed table says which, and where they run: it follows every VM assigned here,
        and a request made from a stale entry fails its check of the VM's ``node`` version and
        is planned again from a full read. Their meta (node_limit, selector, method) is read
        fresh, in one round for all of them. ``fresh=False``: the table's entries as they are,
        without their meta (a cheap check after a wave; a non-empty answer is confirmed from
        full reads).
        """
        candidates = {
            uuid: record
            for uuid, record in self.domains.snapshot().items()
            if record.node == self.node
            and record.state == "start"
            and record.migration is None
            and not record.left_alone
        }
        if not fresh:
            return list(candidates.values())
        return self.planning_records(candidates)

    def planning_records(self, records: dict[str, VMRecord]) -> list[VMRecord]:
        """VM records to plan and request from: the table's entries with the meta a plan and a
        request use (PLANNING_META, read fresh in one round; the others read as their defaults
        here, and whoever uses them reads them: the transfer its method and downtime, a VM that
        fits nowhere its autostart), and the name the VM's uuid where none was read.

        Every other field is the table's as it is: the plan and the request read the VM's
        placement (node and its version, lastnode), size, XML and migration fields; what they do
        not read (the state record, failedreason, stats, what the table loaded) is left as the
        table has it, not blanked, so that the record says nothing false about the VM."""
        found = self.store.get_many([path for uuid in records for path in meta_paths(self.schema, uuid, PLANNING_META)])
        return [
            replace(record, name=record.name or uuid, meta=meta_from(self.schema, uuid, found, PLANNING_META))
            for uuid, record in records.items()
        ]

    def confirmed_to_flush(self, records: Iterable[VMRecord]) -> list[VMRecord]:
        """Full fresh reads of ``records``: those still assigned here, to start, not migrating."""
        return [
            vm
            for vm in self.read_vms(record.uuid for record in records)
            if vm.node == self.node and vm.state == "start" and not vm.migration and not vm.migration_error
        ]

    def held(self) -> dict[str, str]:
        """VMs assigned here that no daemon may act on (a key that decides about them is not
        valid, e.g. a migration record: an operator clears it), with why: a flush cannot move
        them until they are fixed."""
        return {
            record.name or uuid: record.left_alone
            for uuid, record in self.domains.snapshot().items()
            if record.node == self.node and record.left_alone
        }

    def flush(self, cancel: threading.Event) -> None:
        log.system("flushing node %s", self.node)
        reported = None
        while True:
            vms = self.vms_to_flush()
            if not vms:
                # `flushed` promises that no cluster VM runs here: ask libvirt, not the records.
                # The last VMs moved are usually still here for a moment (libvirt ends the
                # source's copy after the target has resumed it, which ended the migration):
                # their stop is a lifecycle event, so the check is made again on the next one
                # rather than a keepalive interval later (up to 5 s at the end of every flush).
                mark = self.libvirt_mark()
                still = self.running_here()
                if not still:
                    break
                held = self.held()
                if (still, held) != reported:  # said once, not on every check
                    reported = (still, held)
                    log.warning(
                        "flush of %s: libvirt still runs %s here; checking again%s",
                        self.node,
                        ", ".join(sorted(still)),
                        "".join(f"; VM {name} waits for an operator: {why}" for name, why in sorted(held.items())),
                    )
                self._wait_for_libvirt(mark, cancel)
                continue
            nodes = read_node_views(self.store)
            # A VM whose XML is not valid is never migrated (its memory is not known, and the
            # target could not start it): like a VM that fits nowhere, it is shut down.
            refused = [vm for vm in vms if vm.xml_error]
            for vm in refused:
                log.error(
                    "VM %s cannot be migrated (its domain XML is not valid: %s): it is shut down for the flush",
                    vm.name,
                    vm.xml_error,
                )
            flush_vms = [
                FlushVM(vm.uuid, vm.memory_mib, vm.meta.node_limit, vm.meta.node_selector, vm.home, vm.vcpus)
                for vm in vms
                if not vm.xml_error
            ]
            plan = plan_flush(
                self.node,
                flush_vms,
                nodes,
                default_selector=self.config.default_selector,
                running_by_node=self._running_for_fit(flush_vms),
            )
            plan = [PlannedMove(vm.uuid, None, "its domain XML is not valid") for vm in refused] + plan
            halt = self._flush_n1_halt(vms, plan)
            if halt is not None:
                # the node stays `flush`; the verdict where the operator (pvc.cluster.node) reads it
                self.store.commit({self.schema.node_key(self.node, S.NODE_FLUSH_HALTED): halt})
                raise Halted(halt)
            # Each request starts from these reads; its transaction re-checks the VM and the
            # target, and a request that finds them changed re-reads and plans again.
            by_uuid = {vm.uuid: vm for vm in vms}
            with ThreadPoolExecutor(max_workers=self.config.flush_parallel, thread_name_prefix="node-flush") as pool:
                futures: list[Future[Any]] = []
                for move in plan:
                    if cancel.is_set():
                        break
                    if move.target is None:
                        futures.append(pool.submit(self._shutdown_for_flush, move.uuid))
                    else:
                        futures.append(
                            pool.submit(
                                self.migrate_and_wait,
                                move.uuid,
                                "migrate",
                                move.target,
                                known=(by_uuid[move.uuid], nodes),
                            )
                        )
                for future in futures:
                    future.result()
            if cancel.is_set():
                raise Cancelled()
            remaining = self.vms_to_flush(fresh=False)
            if remaining:
                remaining = self.confirmed_to_flush(remaining)  # the table may be an answer behind
            if remaining and {vm.uuid for vm in remaining} == {vm.uuid for vm in vms}:
                log.error(
                    "flush of %s made no progress; %d VM(s) still here (see above); retrying", self.node, len(remaining)
                )
                if cancel.wait(self.config.step_timeout_s):
                    raise Cancelled()
        self._set_domain_state("flush", "flushed")

    # ---- ready ------------------------------------------------------------------------------------

    def ready(self, cancel: threading.Event) -> None:
        log.system("making node %s ready", self.node)

        def me_ready(nodes: dict[str, NodeView]) -> dict[str, NodeView]:
            # this node is `unflush` while its VMs come back; it takes them as if ready
            return {self.node: replace(nodes[self.node], domain_state="ready")} if self.node in nodes else {}

        homecoming, autostart = [], []
        # lastnode is followed only for VMs that concern this node (reconciler._follows): read
        # it fresh for the others, in one round.
        snapshot = self.domains.snapshot()
        elsewhere = [uuid for uuid, record in snapshot.items() if record.node != self.node]
        lastnodes = self.store.get_many([self.schema.domain_key(uuid, S.DOMAIN_LASTNODE) for uuid in elsewhere])
        candidates = [
            uuid
            for uuid, record in snapshot.items()
            if record.node == self.node
            or text_of(lastnodes[self.schema.domain_key(uuid, S.DOMAIN_LASTNODE)]) == self.node
        ]
        for vm in self.read_vms(candidates):
            if vm.lastnode == self.node and vm.node != self.node:
                homecoming.append(vm)
            elif vm.node == self.node and vm.autostart and not vm.migration:
                autostart.append(vm)
        left = {}
        for _round in range(HOMECOMING_ROUNDS):
            with ThreadPoolExecutor(max_workers=self.config.flush_parallel, thread_name_prefix="node-ready") as pool:
                futures = {
                    vm.name: pool.submit(self.migrate_and_wait, vm.uuid, "unmigrate", None, me_ready)
                    for vm in homecoming
                    if not cancel.is_set()
                }
                results = {name: future.result() for name, future in futures.items()}
            if cancel.is_set():
                raise Cancelled()
            left = {name: result for name, result in results.items() if result not in HOME_OR_MOOT}
            if not left:
                break
            log.warning(
                "ready of %s: %d VM(s) not back yet (%s); trying them again",
                self.node,
                len(left),
                ", ".join(f"{name}: {result}" for name, result in sorted(left.items())),
            )
            homecoming = [vm for vm in homecoming if vm.name in left]
        if left:
            # The node is usable; these VMs keep running where they are, with lastnode still
            # naming this node, so the next ready (or an unmigrate) brings them home.
            log.error(
                "ready of %s: %d VM(s) did not come home: %s",
                self.node,
                len(left),
                ", ".join(f"{name} ({result})" for name, result in sorted(left.items())),
            )
        for vm in autostart:
            log.info("VM %s: autostart on %s", vm.name, self.node)
            try:
                if not move_runstate(self.store, vm.uuid, "start", self.node, autostart=False, use_autostart_meta=True):
                    log.warning("VM %s: autostart not recorded (its keys kept changing)", vm.name)
            except StoreError as exc:  # one VM's failed write does not keep the others from starting
                log.warning("VM %s: autostart not recorded: %s", vm.name, exc)
        self._set_domain_state("unflush", "ready")
