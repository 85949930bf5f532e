"""Benchmarks (a), (a2) and (f): live migrations by our daemons against plain libvirt.

(a2) is (a) with a busy real guest (``measure(busy=True)``): a Linux guest that dirties 48 MiB/s
of a 24 MiB buffer, with ``migration_auto_converge`` (virsh: ``--auto-converge``) and libvirt's
migrate speed capped at 16 MiB/s and the maximum downtime applied on the source before each
move, for both, and each move started once the guest has run SETTLE_S on its host; each move's
downtime as the guest saw it comes from its ticks (ticks.py). (f) is ``measure_flush``: a flush
of a node running six such guests against ``virsh migrate`` loops with the same parallelism, in
alternating order.

The same running VM goes between the same two lab hosts, alternately:

* by our daemons: a move request (planned from the cluster's state, then submitted), timed from
  the submission to the VM running on the target, as the target records it (the `done` step,
  stamped when the target has seen libvirt run the VM there); the time the
  planning reads took and the time until the record is gone are kept too;
* by `virsh migrate --live --p2p --tls` with the same transport address (TLS, as the daemons
  migrate in the lab), timed from
  the command's start to the VM running on the target, as the target's libvirtd reports it (its
  `resumed` lifecycle event, which comes before the command returns: the source still cleans
  up), so that both sides are timed to the same point; the command's own duration is kept too.
  The daemons are stopped (an orderly stop; the VM keeps running) while virsh moves the VM
  behind their back, then ZooKeeper is told where it went and they start again; our move is
  made once both have written a keepalive after that (their start-up work is over).

Each pair takes the VM from node1 to node2 and back, one way each; the even pairs start with
virsh and the odd ones with our daemons, so both are timed in both directions as often.

Needs root (network namespaces) and the lab's packages; a lab with its own prefix is brought up
and taken down, so it never meets a test lab.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import read_node_views, read_vm
from pvc_cluster_common._meta import DEFAULT_MIGRATION_MAX_DOWNTIME_MS
from pvc_cluster_common._requests import plan_request, submit_request
from pvc_node_daemon.hypervisor import Hypervisor

from .cpu_use import CpuUse
from .daemons import LabCluster
from .guests import GuestPort, LabGuests
from .lab import Lab
from .ticks import TickCollector, record_switchover

# PVC_BENCH_PREFIX: the lab's namespace prefix (default "bench", workdir /tmp/pvc-cluster/bench-lab),
# so that a benchmark can run beside another engineer's on a shared machine
PREFIX = os.environ.get("PVC_BENCH_PREFIX") or "bench"
WORKDIR = Path("/tmp/pvc-cluster/bench-lab" + ("" if PREFIX == "bench" else f"-{PREFIX}"))
# the busy guest of a2 and f (as in tests/lab/test_migration_lab.py)
BUSY_GUEST = {"memory_mib": 128, "dirty_mib_s": 48, "dirty_buf_mib": 24}
BUSY_META = {S.META_MIGRATION_METHOD: "live", S.META_MIGRATION_AUTO_CONVERGE: "true"}
MIGRATE_SPEED_MIB_S = 16
# a busy guest takes tens of seconds to converge on a loaded 2-core machine: no completion
# timeout of the daemons may cut a sample short
BUSY_DAEMON_CONFIG = {"migration": {"live_timeout_base_s": 900}}


# f's daemons keep the daemon's own default intervals (node_daemon/config.py: a keepalive every
# 5 s, dead after 6), not the lab's (1 s and 4, so that a test of a timeout takes seconds). The
# virsh loops run with the daemons stopped; during our flush the daemons' periodic work
# (keepalives, HA ticks, libvirt figures, and ZooKeeper serving them) runs beside the moves on
# the same CPU-bound machine, at the lab's intervals five times what a node does by default.
# Nothing in the flush waits for a keepalive when the target has room (docs/benchmarks.md, "f,
# 2026-12-07 06:44-07:40: the per-move timelines").
FLUSH_INTERVALS = {"keepalive_s": 5.0, "dead_after": 6}

# Busy: every move of either side starts once the guest has run this long on its host (since its
# last switch-over, or its boot), by its ticks' arrival. Without it the moves did not start alike:
# in a2's alternating order the second of two moves of ours started 3-10 s after the first one's
# switch-over, virsh's 5-14 s after the last move (the daemons' stop and start in between), and
# f's first flush right after the guests booted.
SETTLE_S = 15


def settle_guest(collector: TickCollector, name: str, host: str, settle_s: float = SETTLE_S) -> None:
    """Wait until the guest ``name`` has ticked from ``host`` for ``settle_s`` seconds since its
    first tick there (of its current boot, after its last switch-over): a state of the guest, with
    a deadline (AssertionError if it does not tick from there)."""
    collector.wait_ticking(name, host=host, timeout_s=300)
    first = None
    for tick in reversed(collector.ticks(name)):
        if tick.host != host or (first is not None and tick.boot != first.boot):
            break
        first = tick
    if first is None:  # not reached: wait_ticking saw a tick from host
        raise AssertionError(f"guest {name}: no tick from {host}")
    collector.wait_ticking(name, host=host, since=first.arrival + settle_s, timeout_s=settle_s + 300)


def cap_migrate_speed(host, uuid: str) -> None:
    """libvirt's migrate speed of the VM on ``host`` (kept per domain by that libvirtd: set again
    on each source)."""
    conn = host.connect()
    try:
        conn.lookupByUUIDString(uuid).migrateSetMaxSpeed(MIGRATE_SPEED_MIB_S, 0)
    finally:
        conn.close()


def virsh_migrate(src, dst, uuid: str, auto_converge: bool, timeout_s: float) -> None:
    """Plain libvirt's move of ``uuid`` from lab host ``src`` to ``dst``, as an operator would type
    it: ``virsh migrate --live --p2p --tls`` (``--auto-converge`` with ``auto_converge``, as the
    VM's ``migration_auto_converge`` gives ours) to the libvirt URI and the transport address
    our daemons migrate to (``qemu+tls://<address>/system``, ``tcp://<address>``): the same
    VIR_MIGRATE_* flags as the daemons' (LIVE, PEER2PEER, TLS, AUTO_CONVERGE; PERSIST_DEST and
    UNDEFINE_SOURCE are not asked by either for the lab's transient domains). The one command
    line of a2 and f; raises CalledProcessError when virsh fails."""
    subprocess.run(
        [
            "virsh",
            "-q",
            "-c",
            src.libvirt_uri,
            "migrate",
            "--live",
            "--p2p",
            "--tls",
            *(["--auto-converge"] if auto_converge else []),
            uuid,
            dst.libvirt_tls_uri,
            dst.migration_uri,
        ],
        check=True,
        capture_output=True,
        timeout=timeout_s,
    )


def set_max_downtime(host, uuid: str, max_downtime_ms: int = DEFAULT_MIGRATION_MAX_DOWNTIME_MS) -> None:
    """The maximum downtime of the VM on ``host`` as our daemons apply it before they migrate it
    (``migrateSetMaxDowntime`` of the VM's ``migration_max_downtime_ms``, the default here), made
    before a virsh move too, so that both sides send QEMU the same migration parameters. (QEMU's
    own default is the same 300 ms; this makes the commands the same, not only the value.)"""
    conn = host.connect()
    try:
        conn.lookupByUUIDString(uuid).migrateSetMaxDowntime(max_downtime_ms, 0)
    finally:
        conn.close()


def libvirt_downtime_ms(host, uuid: str) -> float | None:
    """The downtime libvirt reports for the migration that brought the VM to ``host`` (the
    target keeps the completed job's statistics): from the source's pause to the target's
    resume, as libvirt measured it; None if it reports none."""
    import libvirt

    conn = host.connect()
    try:
        value = conn.lookupByUUIDString(uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED).get("downtime")
    finally:
        conn.close()
    return None if value is None else float(value)


# libvirt's statistics of the completed migration, as the target keeps them (the source's figures
# come to it with the migration): the per-move evidence of f's timelines
JOB_STATS = (
    "time_elapsed",
    "setup_time",
    "downtime",
    "memory_iteration",
    "auto_converge_throttle",
    "memory_dirty_rate",
    "memory_processed",
    "memory_bps",
)


def completed_job(host, uuid: str) -> dict[str, float]:
    """JOB_STATS of the migration that brought the VM to ``host`` (libvirt's completed job on the
    target; the keys it does not report are left out)."""
    import libvirt

    conn = host.connect()
    try:
        stats = conn.lookupByUUIDString(uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    finally:
        conn.close()
    return {key: stats[key] for key in JOB_STATS if key in stats}


def revive(cluster, collector: TickCollector, uuid: str, name: str, log=print) -> bool:
    """Make sure the busy guest is alive (it ticks) before it is moved again; if not, reset it
    (libvirt's virDomainReset: the same QEMU, a fresh boot), wait until it ticks and return True.
    A dead guest dirties nothing, so it would not be a busy guest any more. The guests run with
    GUEST_KERNEL_WORKAROUND (guests.py), and still one dies now and then after moves of either
    side (docs/benchmarks.md, "f, 2026-12-07 06:44-07:40"); the benchmark counts it
    (``revived``) rather than measure an idle guest."""
    try:
        collector.wait_ticking(name, since=time.time() - 2, timeout_s=5)
        return False
    except AssertionError:
        pass
    node = cluster.running_nodes(cluster.libvirt_states(uuid))[0]
    log(f"{name} on {node} stopped ticking (its kernel died after the last migration): reset")
    conn = cluster.host(node).connect()
    try:
        reset_at = time.time()
        conn.lookupByUUIDString(uuid).reset(0)
    finally:
        conn.close()
    collector.wait_ticking(name, host=node, since=reset_at, timeout_s=300)
    return True


def measure(pairs: int = 5, log=print, busy: bool = False) -> dict[str, list]:
    """Seconds per sample: ``ours`` (submission to running on the target), ``ours_planning``
    (the reads that plan the request), ``ours_record_gone`` (submission to the record removed),
    ``virsh`` (command start to the VM resumed on the target) and ``virsh_command``. Busy: also
    ``ours_frozen_ms`` and ``virsh_frozen_ms`` (the guest-seen downtime of each move, None where
    none was seen), ``revived_after`` (who made the move after which the guest had to be reset)
    and ``lost_writes`` (one figure: what the guest found lost since its last boot).

    Each pair moves the VM from node1 and back, one way by virsh and the other by our daemons;
    which goes first alternates, so both are timed in both directions as often."""
    lab = Lab(WORKDIR, hosts=2, prefix=PREFIX, log=log)
    lab.up()
    cluster = None
    collector = TickCollector(lab) if busy else None
    name = "bench-busy" if busy else "bench-live"
    try:
        if busy:
            guests = LabGuests(lab, collector=collector, log=log).prepare()
            cluster = LabCluster(lab, name, guests=guests, **BUSY_DAEMON_CONFIG)
            cluster.start()
            booted = time.time()
            uuid = cluster.define_vm(name, "node1", meta=BUSY_META, **BUSY_GUEST)
            cluster.wait_guest_up(uuid, "node1", since=booted)
        else:
            cluster = LabCluster(lab, name)
            cluster.start()
            # a no-OS guest, as (a) has always measured
            uuid = cluster.define_vm(
                name, "node1", meta={S.META_MIGRATION_METHOD: "live"}, memory_mib=128, guest="none"
            )
            cluster.wait_running_on("node1", uuid)
        series = {
            "ours": [],
            "ours_planning": [],
            "ours_record_gone": [],
            "virsh": [],
            "virsh_command": [],
            "ours_frozen_ms": [],
            "virsh_frozen_ms": [],
            "ours_libvirt_downtime_ms": [],
            "virsh_libvirt_downtime_ms": [],
        }
        # busy: who moved the guest before each reset that revive() had to make ("ours", "virsh")
        revived_after: list[str] = []
        movers: list[str] = []  # who made each move so far

        def by_virsh(source: str, target: str) -> None:
            # plain libvirt, daemons out of the way
            for daemon in cluster.daemons.values():
                daemon.stop()
            resumed: list[float] = []
            arrived = threading.Event()

            def on_event(domain: str, event: str, _detail: int) -> None:
                if domain == uuid and event == "resumed" and not resumed:
                    resumed.append(time.perf_counter())
                    arrived.set()

            src, dst = cluster.host(source), cluster.host(target)
            if busy:
                if revive(cluster, collector, uuid, name, log):
                    revived_after.append(movers[-1] if movers else "nobody")
                settle_guest(collector, name, source)
                cap_migrate_speed(src, uuid)
            set_max_downtime(src, uuid)  # as our daemons do before they migrate
            with Hypervisor(dst.libvirt_uri, call_timeout_s=30) as libvirt_there:
                libvirt_there.add_lifecycle_listener(on_event)
                started_wall, started = time.time(), time.perf_counter()
                virsh_migrate(src, dst, uuid, auto_converge=busy, timeout_s=900 if busy else 300)
                series["virsh_command"].append(time.perf_counter() - started)
                if not arrived.wait(30):
                    raise RuntimeError(f"libvirt on {dst.name} reported no resume of {uuid} after virsh migrate")
            series["virsh"].append(resumed[0] - started)
            if busy:
                switch = None
                try:
                    collector.wait_ticking(name, host=target, since=started_wall, timeout_s=20)
                    switch = collector.switchover_near(name, started_wall, time.time() + 1, source, target)
                except AssertionError:
                    pass  # the guest died at the switch-over (see revive): nothing to measure
                series["virsh_frozen_ms"].append(switch.frozen_ms if switch else None)
                series["virsh_libvirt_downtime_ms"].append(libvirt_downtime_ms(dst, uuid))
            movers.append("virsh")
            cluster.store.commit({cluster.schema.domain_key(uuid, S.DOMAIN_NODE): target})
            cluster.start(ready=False)
            cluster.wait_running_on(target, uuid)
            # Both daemons have just started: let each write one more keepalive first, so that
            # their start-up work (first reads of every key, first listing, first resync) is over,
            # as on daemons that have been running for a while.
            for node in cluster.nodes:
                path = cluster.schema.node_key(node, S.NODE_KEEPALIVE)
                before = cluster.store.find_text(path)
                cluster.wait(path, lambda value, before=before: value != before, 30, f"a keepalive of {node}")

        def by_daemons(target: str) -> None:
            planning = time.perf_counter()
            vm = read_vm(cluster.store, uuid)
            if busy:
                if revive(cluster, collector, uuid, name, log):
                    revived_after.append(movers[-1] if movers else "nobody")
                settle_guest(collector, name, vm.node)
                cap_migrate_speed(cluster.host(vm.node), uuid)
                planning = time.perf_counter()
            plan = plan_request(vm, "move", read_node_views(cluster.store), target=target)
            started_wall, started = time.time(), time.perf_counter()
            record = submit_request(cluster.store, plan, vm, requester="bench")
            cluster.wait_no_migration(uuid)
            series["ours_record_gone"].append(time.perf_counter() - started)
            series["ours_planning"].append(started - planning)
            final = cluster.history(uuid)[-1]
            if final["id"] != record.id or final["result"] != "done" or final.get("method_used") != "live":
                raise RuntimeError(f"our migration {record.id} did not end as a live migration: {final}")
            series["ours"].append(final["steps"]["done"] - started_wall)
            movers.append("ours")
            if busy:
                switch = record_switchover(cluster.store, collector, uuid, name, final, timeout_s=20)
                series["ours_frozen_ms"].append(switch.frozen_ms if switch else None)
                series["ours_libvirt_downtime_ms"].append(libvirt_downtime_ms(cluster.host(target), uuid))
            # The VM runs on the target from `done` on, but the source's libvirtd still ends its
            # side of the job (about 0.2 s, as virsh's own return shows); a migration of the VM
            # started before that waits for it. Wait until the source has let the VM go.
            cluster.wait_libvirt(
                uuid,
                lambda states: states[final["source"]] is None,
                60,
                f"libvirt on {final['source']} to end its side of the migration",
            )

        for pair in range(pairs):  # the VM starts and ends each pair on node1
            if pair % 2 == 0:
                by_virsh("node1", "node2")
                by_daemons("node1")
            else:
                by_daemons("node2")
                by_virsh("node2", "node1")
            seen = (
                (
                    f" (guest frozen: ours {_ms(series['ours_frozen_ms'][-1])}, virsh "
                    f"{_ms(series['virsh_frozen_ms'][-1])}; libvirt's downtime: ours "
                    f"{series['ours_libvirt_downtime_ms'][-1]} ms, virsh {series['virsh_libvirt_downtime_ms'][-1]} ms)"
                )
                if busy
                else ""
            )
            log(f"pair {pair + 1}/{pairs}: ours {series['ours'][-1]:.3f} s, virsh {series['virsh'][-1]:.3f} s{seen}")
        if busy:
            if revive(cluster, collector, uuid, name, log):
                revived_after.append(movers[-1])
            # the guest's own check of every page it dirtied, over all the moves since its boot
            status = GuestPort(cluster.host(cluster.running_nodes(cluster.libvirt_states(uuid))[0]), uuid).status()
            log(
                f"{name}: {len(revived_after)} reset(s) after a move ({', '.join(revived_after) or 'none'}); "
                f"lost writes found by the guest since its last boot: {status['lost_writes']}"
            )
            series["revived_after"] = revived_after
            series["lost_writes"] = [int(status["lost_writes"])]
        return series
    finally:
        try:
            if cluster is not None:
                cluster.close()
        finally:
            if collector is not None:
                collector.stop()
            lab.down()


def _ms(value) -> str:
    return "not seen (the guest died)" if value is None else f"{value:.0f} ms"


def timeline(moves: list[tuple[float, float, float]], began: float, ended: float) -> dict[str, float]:
    """What a run of parallel moves spent its time on. ``moves``: (started, transfer began,
    ended) of each move, unix times; ``began``/``ended``: the run's. ``parallelism``: the moves'
    summed durations over the run's; ``idle_slot_s``: the time the run's slots (its highest
    number of moves at once) had no move, summed; ``first_start_s``: from the run's start to its
    first move; ``last_end_s``: from its last move's end to the run's end; ``before_transfer_s``:
    the moves' time between their start and their transfer's, summed (ours: the protocol's steps
    before libvirt is called; virsh: nothing)."""
    events = sorted([(start, 1) for start, _, _ in moves] + [(end, -1) for _, _, end in moves])
    running, highest = 0, 0
    for _, change in events:
        running += change
        highest = max(highest, running)
    busy = sum(end - start for start, _, end in moves)
    return {
        "parallelism": round(busy / (ended - began), 3),
        "slots": highest,
        "idle_slot_s": round(highest * (ended - began) - busy, 2),
        "first_start_s": round(min(start for start, _, _ in moves) - began, 2),
        "last_end_s": round(ended - max(end for _, _, end in moves), 2),
        "before_transfer_s": round(sum(transfer - start for start, transfer, _ in moves), 2),
        "move_median_s": round(sorted(end - start for start, _, end in moves)[len(moves) // 2], 2),
    }


def move_rows(
    moves: list[tuple[float, float, float]], names: list[str], began: float, jobs: list[dict[str, float]]
) -> list[dict]:
    """Each move of a run, in the order it started: the VM, the slot it ran in (slots handed out
    as the moves started: the lowest free one), when it started, its transfer began and it ended
    (seconds from the run's start), and libvirt's statistics of its job (completed_job)."""
    order = sorted(range(len(moves)), key=lambda i: moves[i][0])
    free_at: list[float] = []  # per slot: when its last move ended
    rows = []
    for i in order:
        start, transfer, end = moves[i]
        slot = next((n for n, at in enumerate(free_at) if at <= start), len(free_at))
        if slot == len(free_at):
            free_at.append(end)
        free_at[slot] = end
        rows.append(
            {
                "vm": names[i],
                "slot": slot,
                "start_s": round(start - began, 2),
                "transfer_s": round(transfer - began, 2),
                "end_s": round(end - began, 2),
                "move_s": round(end - start, 2),
                **jobs[i],
            }
        )
    return rows


def measure_flush(vms: int, parallel: int, rounds: int, log=print) -> dict:
    """(f): seconds to move ``vms`` busy real guests off node1 to node2, by a flush of node1 by
    our daemons (``flush_parallel`` = ``parallel``; domain state `flush` written until the
    daemon writes `flushed`), and by ``parallel`` threads running ``virsh migrate --live --p2p
    --tls --auto-converge`` (virsh_migrate), each taking the next guest as soon as its last move
    returned, as the flush keeps ``parallel`` moves in flight (first command started until the
    last returned), the daemons stopped meanwhile. ``rounds`` of one flush and one virsh run
    each, ours first in even rounds and virsh first in odd ones; ``ours``/``virsh``: the seconds
    of each round. Between two timed runs the guests go back to node1, not timed: after ours
    by the daemons (node1 ready again), after virsh by virsh (the daemons still stopped; they
    start again once the guests are home, and the next flush waits for a keepalive of each).
    Before each timed run a guest that died is reset (revive). Also each run's ``timeline``
    (``ours_timeline``, ``virsh_timeline``: lists, one per round), from the migrations' audit
    records for ours and the commands' start and end for virsh, and the CPU the lab's processes
    used during it (``ours_cpu``, ``virsh_cpu``: CpuUse's figures, one per round).

    The guests' way home is not timed and is not capped on either side: the speed cap is set on
    the source of each timed run, and our daemons' return from node2 runs at libvirt's default
    speed (a few seconds per guest), so virsh's return does too; until 2026-12-07 15:30 virsh's
    return was capped (about 40 s per guest), so each side's timed run followed a differently
    made return home."""
    from concurrent.futures import ThreadPoolExecutor

    lab = Lab(WORKDIR, hosts=2, prefix=PREFIX, log=log)
    lab.up()
    cluster = None
    collector = TickCollector(lab)
    try:
        guests = LabGuests(lab, collector=collector, log=log).prepare()
        config = {
            **BUSY_DAEMON_CONFIG,
            "migration": {**BUSY_DAEMON_CONFIG["migration"], "flush_parallel": parallel},
            "intervals": FLUSH_INTERVALS,
        }
        cluster = LabCluster(lab, "bench-flush", guests=guests, **config)
        cluster.start()
        booted = time.time()
        uuids = [cluster.define_vm(f"busy-{i}", "node1", meta=BUSY_META, **BUSY_GUEST) for i in range(vms)]
        names = {uuid: f"busy-{i}" for i, uuid in enumerate(uuids)}
        for uuid in uuids:
            cluster.wait_guest_up(uuid, "node1", since=booted, timeout_s=300)
        result: dict = {
            "ours": [],
            "virsh": [],
            "ours_timeline": [],
            "virsh_timeline": [],
            "ours_moves": [],
            "virsh_moves": [],
            "ours_cpu": [],
            "virsh_cpu": [],
            "guest_resets": 0,
        }
        src, dst = cluster.host("node1"), cluster.host("node2")

        def revive_all(settle: bool = True) -> None:
            """Reset a guest that died; with ``settle``, then let every guest settle on node1."""
            result["guest_resets"] += sum(revive(cluster, collector, uuid, names[uuid], log) for uuid in uuids)
            for uuid in uuids if settle else ():
                settle_guest(collector, names[uuid], "node1")

        def ours() -> None:
            revive_all()
            for uuid in uuids:
                cap_migrate_speed(src, uuid)
            cpu = CpuUse.of_lab(lab, (daemon.pid for daemon in cluster.daemons.values() if daemon.running())).start()
            started_wall, started = time.time(), time.perf_counter()
            cluster.set_domain_state("node1", "flush")
            cluster.wait_domain_state("node1", "flushed", timeout_s=3600)
            result["ours"].append(time.perf_counter() - started)
            ended_wall = time.time()
            result["ours_cpu"].append(cpu.stop())
            for uuid in uuids:
                cluster.settle(uuid, timeout_s=300)
            moves = []
            for uuid in uuids:
                entry = next(e for e in reversed(cluster.history(uuid)) if e["source"] == "node1")
                steps = entry["steps"]
                moves.append((steps["requested"], steps.get("transferring", steps["requested"]), steps["done"]))
            result["ours_timeline"].append(timeline(moves, started_wall, ended_wall))
            jobs = [completed_job(dst, uuid) for uuid in uuids]
            result["ours_moves"].append(move_rows(moves, [names[u] for u in uuids], started_wall, jobs))
            # home again, not timed
            cluster.set_domain_state("node1", "unflush")
            cluster.wait_domain_state("node1", "ready", timeout_s=3600)
            for uuid in uuids:
                cluster.settle(uuid, timeout_s=600)
                cluster.wait_running_on("node1", uuid, timeout_s=600)

        def virsh_run(source, target, timed: bool) -> None:
            """Every guest from ``source`` to ``target`` by ``parallel`` virsh loops sharing one
            queue; ``timed``: capped at MIGRATE_SPEED_MIB_S and measured, else at libvirt's default
            speed, as our daemons' untimed return home."""
            queue = list(uuids)
            lock = threading.Lock()
            moves: list[tuple[float, float, float]] = []
            moved: list[str] = []
            for uuid in uuids:
                if timed:
                    cap_migrate_speed(source, uuid)
                set_max_downtime(source, uuid)  # as our daemons do before they migrate

            def loop() -> None:
                while True:
                    with lock:
                        if not queue:
                            return
                        uuid = queue.pop(0)
                    began = time.time()
                    virsh_migrate(source, target, uuid, auto_converge=True, timeout_s=1800)
                    with lock:
                        moves.append((began, began, time.time()))
                        moved.append(uuid)

            cpu = CpuUse.of_lab(lab).start() if timed else None  # the daemons are stopped
            started_wall, started = time.time(), time.perf_counter()
            with ThreadPoolExecutor(parallel) as pool:
                for done in [pool.submit(loop) for _ in range(parallel)]:
                    done.result()
            if cpu is not None:
                result["virsh"].append(time.perf_counter() - started)
                result["virsh_cpu"].append(cpu.stop())
                result["virsh_timeline"].append(timeline(moves, started_wall, time.time()))
                jobs = [completed_job(target, uuid) for uuid in moved]
                result["virsh_moves"].append(move_rows(moves, [names[u] for u in moved], started_wall, jobs))

        def by_virsh() -> None:
            revive_all()
            for daemon in cluster.daemons.values():
                daemon.stop()
            virsh_run(src, dst, timed=True)
            # home again by virsh, not timed; ZooKeeper still has every guest on node1
            virsh_run(dst, src, timed=False)
            cluster.start(ready=False)
            for uuid in uuids:
                cluster.wait_running_on("node1", uuid, timeout_s=600)
            # as in measure(): the daemons' start-up work is over before a flush is timed
            for node in cluster.nodes:
                path = cluster.schema.node_key(node, S.NODE_KEEPALIVE)
                before = cluster.store.find_text(path)
                cluster.wait(path, lambda value, before=before: value != before, 60, f"a keepalive of {node}")

        for round_ in range(rounds):
            for run in (ours, by_virsh) if round_ % 2 == 0 else (by_virsh, ours):
                run()
            log(
                f"f round {round_ + 1}/{rounds}: ours {result['ours'][-1]:.1f} s {result['ours_timeline'][-1]}, "
                f"virsh {result['virsh'][-1]:.1f} s {result['virsh_timeline'][-1]}; "
                f"ratio {result['ours'][-1] / result['virsh'][-1]:.3f}"
            )
            for side in ("ours", "virsh"):
                log(f"f round {round_ + 1} {side} cpu: {result[f'{side}_cpu'][-1]}")
            for side in ("ours", "virsh"):
                for row in result[f"{side}_moves"][-1]:
                    log(f"f round {round_ + 1} {side}: {row}")
        # Did the guests come through their moves whole?
        revive_all(settle=False)
        result["guest_lost_writes"] = sum(
            int(
                GuestPort(cluster.host(cluster.running_nodes(cluster.libvirt_states(uuid))[0]), uuid).status()[
                    "lost_writes"
                ]
            )
            for uuid in uuids
        )
        log(
            f"flush of {vms} busy guests, {rounds} round(s): ours {result['ours']}, virsh {result['virsh']}; "
            f"guests reset after a move: {result['guest_resets']}, lost writes they found: {result['guest_lost_writes']}"
        )
        return result
    finally:
        try:
            if cluster is not None:
                cluster.close()
        finally:
            collector.stop()
            lab.down()
