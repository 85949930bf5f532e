"""``make demo``: a 3-host lab, the rollout, six VMs, a rolling maintenance of one node, and a table
of where each VM ran before, during and after, with every migration's method and duration.

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

from .guests import domain_xml
from .hostviews import LAB_ANSIBLE, LAB_DAEMON_VARS, HostViews, ViewError
from .lab import REPO_ROOT, Lab, LabError

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
        self.step("A 3-host lab: network namespaces demo-n1..3 (10.77.0.1-3), each with its own libvirtd "
                  "and ZooKeeper member")
        Lab.preflight()
        stop_kept(self.workdir, quiet=True)   # a lab an earlier --keep left up
        self.lab.up()
        self.views.up()
        self.records.mkdir(parents=True, exist_ok=True)
        for f in self.records.glob("*.json"):
            f.unlink()
        self.say(f"inventory: {self.views.inventory_file} (hosts node1..3, the lab's connection netns)")

    def playbook(self, playbook: str | Path, *args: str) -> None:
        run = self.views.playbook(playbook, *args, json_output=False, progress=True, timeout=900)
        if run.returncode != 0:
            raise DemoError(f"{Path(playbook).name} failed (exit {run.returncode})")

    def rollout(self) -> None:
        self.step("Rollout (playbooks/rollout.yml): ZooKeeper, libvirt, VM bridges and the node daemon on every "
                  "host, then each node made ready")
        self.say("the lab has no systemd: the roles render every file into each host's private view, and the "
                 "lab's hook restarts libvirtd and starts the daemon from the rendered unit")
        self.playbook("playbooks/rollout.yml")

    def define_vms(self) -> None:
        self.step("Six small VMs with different meta (playbooks/vm_meta.yml), started")
        vms = []
        for name, node, meta, _ in VMS:
            xml = domain_xml(name, memory_mib=64, bridge=BRIDGE)
            vms.append({"name": name, "xml": xml, "node": node, "state": "started", **meta})
        vars_file = self.workdir / "demo-vms.yml"
        vars_file.write_text(yaml.safe_dump({"pvc_vms": vms}, sort_keys=False))
        for name, node, _, meaning in VMS:
            self.say(f"{name:12} on {node}: {meaning}")
        self.playbook("playbooks/vm_meta.yml", "--extra-vars", f"@{vars_file}")

    def snapshot(self, label: str) -> None:
        self.playbook(LAB_ANSIBLE / "demo_snapshot.yml", "--extra-vars",
                      json.dumps({"demo_dir": str(self.records), "demo_label": label}))

    def maintenance(self) -> float:
        self.step(f"Where the VMs run before the maintenance of {self.node}")
        self.snapshot("before")
        self.step(f"Rolling maintenance (playbooks/maintenance.yml) of {self.node}: flush, the operator's tasks, "
                  "ready, VMs back home")
        started = time.time()
        self.playbook("playbooks/maintenance.yml", "--limit", self.node, "--extra-vars",
                      json.dumps({"pvc_maintenance_hook": str(LAB_ANSIBLE / "demo_maintenance_hook.yml"),
                                  "demo_dir": str(self.records)}))
        self.step("Where the VMs run after it")
        self.snapshot("after")
        return started

    # ---- the table -------------------------------------------------------------------------------

    def load(self, label: str) -> dict[str, dict]:
        data = json.loads((self.records / f"{label}.json").read_text())
        return {vm["name"]: vm for vm in data["vms"]}

    def report(self, started: float) -> None:
        self.step("What happened")
        before, during, after = self.load("before"), self.load("during"), self.load("after")
        libvirt = {h.name: h.domains() for h in self.lab.hosts}
        rows = [("VM", "META", "BEFORE", "DURING", "AFTER", f"MIGRATIONS DURING THE MAINTENANCE OF {self.node.upper()}")]
        counts = {"live": 0, "shutdown": 0}
        all_home = True
        for name, _, _, meaning in VMS:
            history = [r for r in reversed(after[name].get("history") or [])
                       if (r.get("steps") or {}).get("requested", 0) >= started - 1]
            moves = []
            for r in history:
                method = r.get("method_used") or r.get("method")
                counts[method] = counts.get(method, 0) + 1
                fallback = f" (fallback: {r['fallback_reason']})" if r.get("fallback_reason") else ""
                result = "" if r.get("result") == "done" else f" {str(r.get('result')).upper()}: {r.get('reason')}"
                moves.append(f"{r['source']}->{r['target']} {method} {r.get('duration_s', 0):.1f}s{fallback}{result}")
            where = {label: _where(snap[name]) for label, snap in (("before", before), ("during", during), ("after", after))}
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
        self.say(f"{counts.get('live', 0)} live and {counts.get('shutdown', 0)} shutdown migrations; "
                 f"every VM back where it was: {'yes' if all_home else 'NO'}")
        self.say("the lab's guests have no OS, so they ignore the ACPI shutdown: a shutdown migration waits "
                 f"the daemon's shutdown timeout ({LAB_DAEMON_VARS['node_daemon_shutdown_timeout_s']} s here), then "
                 "stops the VM and starts it on the target")
        self.say(f"audit records: pvc.cluster.vm_info (history), or ZooKeeper /pvc/domains/<uuid>/history; "
                 f"snapshots in {self.records}")
        if not all_home:
            raise DemoError("some VMs did not come back home")

    # ---- the end ---------------------------------------------------------------------------------

    def teardown(self) -> None:
        self.step_no = 7   # the last step, also after a failure or an interruption
        self.step("Teardown: every process the demo started ended by PID, namespaces deleted")
        try:
            self.views.down()
        finally:
            if self.lab.state_file.exists():
                self.lab.down()

    def explain_kept(self) -> None:
        env = self.views.ansible_env()
        exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("ANSIBLE_COLLECTIONS_PATH", "ANSIBLE_INVENTORY",
                                                                       "ANSIBLE_CONNECTION_PLUGINS"))
        print(f"""
==> The lab is still up (KEEP=1). To explore it:
    {sys.executable} -m tests.lab status --workdir {self.workdir}
    export {exports}
    nsenter --net=/run/netns/{self.lab.ctl_netns} {REPO_ROOT}/.venv/bin/ansible localhost -m pvc.cluster.node_info -a zk_hosts={self.lab.zk_hosts}
    nsenter --net=/run/netns/{self.lab.ctl_netns} {REPO_ROOT}/.venv/bin/ansible-playbook -e @{self.views.play_vars_file} playbooks/maintenance.yml --limit node2
    daemon logs: {self.views.logs}
  and to end it:
    make demo-down      (or: {sys.executable} -m tests.lab.demo --down --workdir {self.workdir})""", flush=True)


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
