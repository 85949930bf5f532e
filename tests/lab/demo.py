"""``make demo``: a 3-host lab, the rollout, six VMs, a rolling maintenance of one node, and a table
of where each VM ran before, during and after, with every migration's method and duration.

The VMs are the lab's real guests (guests.py: a Debian kernel and busybox, a disk on the lab's
shared storage), which tick on a serial console to the demo's TickCollector (ticks.py). So a
shutdown migration ends with a clean shutdown of the guest (the table says how long the guest
took), and each live migration's downtime as the guest saw it is measured from its ticks and
added to the migration's audit record (``_cluster.record_guest_downtime``, as a measurement
outside the daemons would), where ``vm_info`` shows it.

    python -m tests.lab.demo [--keep] [--workdir DIR] [--node node1]
    python -m tests.lab.demo --down [--workdir DIR]      # end a lab kept with --keep

Everything it starts is ended when it finishes (or fails, or is interrupted), unless --keep leaves
the lab up for exploring; running it again starts over.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pvc_cluster_common._cluster import find_vm, read_history

from .guests import LabGuests
from .hostviews import LAB_ANSIBLE, HostViews, ViewError
from .lab import REPO_ROOT, Lab, LabError
from .ticks import TickCollector, record_switchover

DEFAULT_WORKDIR = "/tmp/pvc-cluster/demo"
PREFIX = "demo"
BRIDGE = "vmbr0"
# name, node it is defined on, meta, what the meta means
VMS = [
    ("web-live", "node1", {"migration_method": "live"}, "live migration only"),
    ("db-shutdown", "node1", {"migration_method": "shutdown"}, "shutdown migration only"),
    ("app-limited", "node1", {"node_limit": ["node1", "node2"]}, "node1 or node2 only"),
    ("cache", "node1", {}, "default"),
    ("queue", "node2", {}, "default"),
    ("mail", "node3", {}, "default"),
]


class Demo:
    def __init__(self, workdir: str, node: str, keep: bool) -> None:
        self.workdir = Path(workdir).resolve()
        self.node = node
        self.keep = keep
        self.records = self.workdir / "records"
        self.t0 = time.monotonic()
        self.step_no = 0
        self.lab = Lab(self.workdir, hosts=3, prefix=PREFIX, log=self.say_lab)
        self.views = HostViews(self.lab, log=self.say_lab)
        self.collector = TickCollector(self.lab)
        self.guests = LabGuests(self.lab, collector=self.collector, log=self.say_lab)

    # ---- output --------------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n==> [{self.step_no}/8 +{time.monotonic() - self.t0:.0f}s] {title}", flush=True)

    @staticmethod
    def say(message: str) -> None:
        print(f"    {message}", flush=True)

    def say_lab(self, message: str) -> None:
        self.say(message)

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        ok = False
        try:
            self.setup()
            self.rollout()
            self.define_vms()
            started = self.maintenance()
            self.report(started)
            ok = True
        except (LabError, ViewError, DemoError) as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("\ndemo interrupted", file=sys.stderr, flush=True)
        finally:
            if self.keep and self.lab.state_file.exists():
                self.explain_kept()
            else:
                self.teardown()
        print(f"\ndemo {'finished' if ok else 'FAILED'} in {time.monotonic() - self.t0:.0f} s", flush=True)
        return 0 if ok else 1

    def setup(self) -> None:
        self.step(
            "A 3-host lab: network namespaces demo-n1..3 (10.77.0.1-3), each with its own libvirtd and ZooKeeper member"
        )
        Lab.preflight()
        stop_kept(self.workdir, quiet=True)  # a lab an earlier --keep left up
        self.lab.up()
        self.views.up()
        self.records.mkdir(parents=True, exist_ok=True)
        for f in self.records.glob("*.json"):
            f.unlink()
        self.say(f"inventory: {self.views.inventory_file} (hosts node1..3, the lab's connection netns)")
        self.guests.prepare()
        self.say(
            f"real guests: a Debian cloud kernel and busybox (tests/lab/guest_image.py), disks on the lab's shared "
            f"NBD storage, serial ticks to {self.collector.address[0]}:{self.collector.address[1]}"
        )

    def playbook(self, playbook: str | Path, *args: str) -> None:
        run = self.views.playbook(playbook, *args, json_output=False, progress=True, timeout=900)
        if run.returncode != 0:
            raise DemoError(f"{Path(playbook).name} failed (exit {run.returncode})")

    def rollout(self) -> None:
        self.step(
            "Rollout (playbooks/rollout.yml): ZooKeeper, libvirt, VM bridges and the node daemon on every "
            "host, then each node made ready"
        )
        self.say(
            "the lab has no systemd: the roles render every file into each host's private view, and the "
            "lab's hook restarts libvirtd and starts the daemon from the rendered unit"
        )
        self.playbook("playbooks/rollout.yml")

    def define_vms(self) -> None:
        self.step("Six small VMs with different meta (playbooks/vm_meta.yml), started")
        vms = []
        for name, node, meta, _ in VMS:
            xml = self.guests.xml(name, memory_mib=128, bridge=BRIDGE)
            vms.append({"name": name, "xml": xml, "node": node, "state": "started", **meta})
        vars_file = self.workdir / "demo-vms.yml"
        vars_file.write_text(yaml.safe_dump({"pvc_vms": vms}, sort_keys=False))
        for name, node, _, meaning in VMS:
            self.say(f"{name:12} on {node}: {meaning}")
        started = time.time()
        self.playbook("playbooks/vm_meta.yml", "--extra-vars", f"@{vars_file}")
        for name, _, _, _ in VMS:  # booted: their ACPI power button works from now on
            self.collector.wait_ticking(name, since=started - 1, timeout_s=180)
        self.say(f"all six guests booted and tick (booted in {time.time() - started:.0f} s)")

    def snapshot(self, label: str) -> None:
        self.playbook(
            LAB_ANSIBLE / "demo_snapshot.yml",
            "--extra-vars",
            json.dumps({"demo_dir": str(self.records), "demo_label": label}),
        )

    def maintenance(self) -> float:
        self.step(f"Where the VMs run before the maintenance of {self.node}")
        self.snapshot("before")
        self.step(
            f"Rolling maintenance (playbooks/maintenance.yml) of {self.node}: flush, the operator's tasks, "
            "ready, VMs back home"
        )
        started = time.time()
        self.playbook(
            "playbooks/maintenance.yml",
            "--limit",
            self.node,
            "--extra-vars",
            json.dumps(
                {"pvc_maintenance_hook": str(LAB_ANSIBLE / "demo_maintenance_hook.yml"), "demo_dir": str(self.records)}
            ),
        )
        self.record_downtimes(started)
        self.step("Where the VMs run after it")
        self.snapshot("after")
        return started

    def record_downtimes(self, started: float) -> None:
        """Each live migration's downtime as its guest saw it, from the guest's ticks, added to
        its audit record: the lab's stand-in for a measurement outside the daemons."""
        store = self.views.operator_store()
        try:
            for name, _, _, _ in VMS:
                uuid = find_vm(store, name)
                for entry in read_history(store, uuid, last=20):
                    if entry["steps"].get("requested", 0) < started - 1:
                        continue
                    if entry["result"] == "done" and entry.get("method_used") == "live":
                        switch = record_switchover(store, self.collector, uuid, name, entry)
                        if switch is None:
                            began = entry["steps"].get("transferring", 0)
                            seen = self.collector.ticks(name, since=began - 1)
                            hosts = sorted({t.host for t in seen})
                            self.say(
                                f"{name}: no switch-over {entry['source']}->{entry['target']} seen in its ticks "
                                f"for migration {entry['id']} ({len(seen)} ticks since it began, from "
                                f"{', '.join(hosts) or 'no host'}; boots {sorted({t.boot for t in seen})})"
                            )
        finally:
            store.stop()

    # ---- the table -------------------------------------------------------------------------------

    def load(self, label: str) -> dict[str, dict]:
        data = json.loads((self.records / f"{label}.json").read_text())
        return {vm["name"]: vm for vm in data["vms"]}

    def report(self, started: float) -> None:
        self.step("What happened")
        before, during, after = self.load("before"), self.load("during"), self.load("after")
        libvirt = {h.name: h.domains() for h in self.lab.hosts}
        rows = [
            ("VM", "META", "BEFORE", "DURING", "AFTER", f"MIGRATIONS DURING THE MAINTENANCE OF {self.node.upper()}")
        ]
        counts = {"live": 0, "shutdown": 0}
        downtimes: list[float] = []
        all_home = True
        for name, _, _, meaning in VMS:
            history = [
                r
                for r in reversed(after[name].get("history") or [])
                if (r.get("steps") or {}).get("requested", 0) >= started - 1
            ]
            moves = []
            for r in history:
                method = r.get("method_used") or r.get("method")
                counts[method] = counts.get(method, 0) + 1
                fallback = f" (fallback: {r['fallback_reason']})" if r.get("fallback_reason") else ""
                result = "" if r.get("result") == "done" else f" {str(r.get('result')).upper()}: {r.get('reason')}"
                seen = ""
                if method == "live" and r.get("result") == "done":
                    downtime = r.get("guest_downtime_ms")
                    seen = (
                        f", guest frozen {downtime:.0f} ms" if downtime is not None else ", guest downtime not measured"
                    )
                    if downtime is not None:
                        downtimes.append(downtime)
                elif method == "shutdown" and r.get("result") == "done":
                    seen = ", " + self.shutdown_seen(name, r)
                moves.append(
                    f"{r['source']}->{r['target']} {method} {r.get('duration_s', 0):.1f}s{seen}{fallback}{result}"
                )
            where = {
                label: _where(snap[name]) for label, snap in (("before", before), ("during", during), ("after", after))
            }
            running = [h for h, doms in libvirt.items() if name in doms]
            if running != [where["after"]]:
                where["after"] += f" (libvirt: {', '.join(running) or 'nowhere'})"
            all_home &= where["after"] == where["before"]
            rows.append((name, meaning, where["before"], where["during"], where["after"], "; ".join(moves) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print()
        for i, row in enumerate(rows):
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
        print()
        self.say(
            f"{counts.get('live', 0)} live and {counts.get('shutdown', 0)} shutdown migrations; "
            f"every VM back where it was: {'yes' if all_home else 'NO'}"
        )
        if downtimes:
            self.say(
                f"live migrations: the guests were frozen {min(downtimes):.0f} to {max(downtimes):.0f} ms at the "
                "switch-over (from their serial ticks; in each audit record as guest_downtime_ms)"
            )
        self.say(
            "shutdown migrations: the guest answers the ACPI power button with a clean power-off (busybox acpid); "
            "'clean shutdown in' is from the request to shut down to the guest's last tick"
        )
        self.say(
            f"audit records: pvc.cluster.vm_info (history), or ZooKeeper /pvc/domains/<uuid>/runtime/history; "
            f"snapshots in {self.records}"
        )
        if not all_home:
            raise DemoError("some VMs did not come back home")

    def shutdown_seen(self, name: str, record: dict) -> str:
        """How a shutdown migration went for the guest, from its ticks: how long after the source
        began the shutdown (its `transferring` step) the guest stopped ticking, and whether it
        powered itself off (the daemon's log says which) or was stopped after the timeout."""
        began = record["steps"].get("transferring")
        ended = record["steps"].get("done")
        if began is None or ended is None:
            return "shutdown not seen"
        last = [boot[-1] for boot in self.collector.boots(name, since=began - 60) if boot[-1].arrival <= ended]
        log = self.views.logs / f"node-daemon-{record['source']}.log"
        how = "clean shutdown"
        try:
            text = log.read_text(errors="replace")
            if f"VM {record['vm']}: stopped (forced) for migration" in text:
                how = "FORCED stop"
        except OSError:
            pass
        if not last or last[-1].arrival < began:
            return how
        return f"{how} in {last[-1].arrival - began:.1f}s"

    # ---- the end ---------------------------------------------------------------------------------

    def teardown(self) -> None:
        self.step_no = 7  # the last step, also after a failure or an interruption
        self.step("Teardown: every process the demo started ended by PID, namespaces deleted")
        try:
            self.collector.stop()
            self.views.down()
        finally:
            if self.lab.state_file.exists():
                self.lab.down()

    def explain_kept(self) -> None:
        env = self.views.ansible_env()
        exports = " ".join(
            f"{k}={shlex.quote(env[k])}"
            for k in ("ANSIBLE_COLLECTIONS_PATH", "ANSIBLE_INVENTORY", "ANSIBLE_CONNECTION_PLUGINS")
        )
        print(
            f"""
==> The lab is still up (KEEP=1). To explore it:
    {sys.executable} -m tests.lab status --workdir {self.workdir}
    export {exports}
    nsenter --net=/run/netns/{self.lab.ctl_netns} {REPO_ROOT}/.venv/bin/ansible localhost -m pvc.cluster.node_info -a {shlex.quote(" ".join(f"{k}={v}" for k, v in {"zk_hosts": self.views.zk_hosts, **self.views.module_zk_options()}.items()))}
    nsenter --net=/run/netns/{self.lab.ctl_netns} {REPO_ROOT}/.venv/bin/ansible-playbook -e @{self.views.play_vars_file} playbooks/maintenance.yml --limit node2
    daemon logs: {self.views.logs}
  and to end it:
    make demo-down      (or: {sys.executable} -m tests.lab.demo --down --workdir {self.workdir})""",
            flush=True,
        )


class DemoError(RuntimeError):
    pass


def _where(vm: dict) -> str:
    running = vm.get("running_on") or []
    if vm.get("state") != "start":
        return f"{vm.get('node')} ({vm.get('state')})"
    if running and running != [vm.get("node")]:
        return f"{vm.get('node')} (running on {', '.join(running)})"
    return vm.get("node") or "-"


def stop_kept(workdir: Path, quiet: bool = False) -> None:
    """End a lab the demo left up (--keep): its services, views and namespaces."""
    if not (workdir / "lab.json").exists():
        if not quiet:
            print(f"no demo lab in {workdir}")
        return
    lab = Lab.load(workdir)
    HostViews(lab).down(quiet=quiet)
    lab.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    parser.add_argument("--node", default="node1", help="the node the maintenance runs on (default node1)")
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end, for exploring")
    parser.add_argument("--down", action="store_true", help="end a lab an earlier --keep left up, and exit")
    args = parser.parse_args(argv)
    if args.down:
        try:
            stop_kept(Path(args.workdir).resolve())
        except (LabError, ViewError) as exc:
            print(f"demo --down: {exc}", file=sys.stderr)
            return 1
        return 0
    return Demo(args.workdir, args.node, args.keep).run()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.TimeoutExpired as exc:
        print(f"demo: timed out: {exc}", file=sys.stderr)
        sys.exit(1)
