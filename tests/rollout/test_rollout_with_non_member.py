"""playbooks/rollout.yml on a cluster shaped like production's: three ZooKeeper members and one more
hypervisor that is not a member (node4 is in pvc_nodes, not in pvc_coordinators). Secured as every
rollout is (TLS with host-name checks and digest authentication on ZooKeeper, TLS on libvirt), node4's
daemon gets everything it needs from the node_daemon role alone: the cluster CA's certificate, its
identities, the members' addresses. It registers, keeps alive, runs a VM, migrates it live both ways
and is flushed and made ready again.

Why a lab of its own: the session's lab (tests/lab/fixtures.py) has three hosts and the shared
rollout cluster (fixtures.py) makes every one of them a member, which the other rollout tests rely
on. A three-member ensemble with a fourth, non-member hypervisor needs four hosts, and a lab host is
cheap (a network namespace, a libvirtd and an idle ZooKeeper JVM of the lab's own ensemble), so this
module brings up a 4-host lab under a prefix of its own (beside the session's, if that one is up),
rolls the cluster out on it once, and takes it all down after its tests. A 1-member ensemble on the
session's three hosts would be cheaper still, but no production cluster runs one member, and a
non-member's client would then have no second server to fail over to; three members keep the
shape (and the TLS host-name checks across several members) that operators run. The file's name
sorts last in tests/rollout: its rollout loads the machine, and no test of the shared rollout
cluster comes after it."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pvc_cluster_common import _schema as S
from pvc_cluster_common._cluster import find_vm, read_history, wait_for_key
from tests.lab.fixtures import VM_BRIDGE, lab_workdir_and_prefix
from tests.lab.guests import domain_xml
from tests.lab.hostviews import ANSIBLE_PLAYBOOK, ROLLOUT_ZK_CA_ON_NODE, ROLLOUT_ZK_PORT, VENV_PYTHON, HostViews
from tests.lab.lab import REPO_ROOT, Lab, LabError
from tests.support import identities

from .test_rollout import _daemon_config

MEMBERS = 3
HOSTS = 4
NON_MEMBER = "node4"
VM = "nm-live"


def _lab_place() -> tuple[Path, str]:
    """This module's lab: the session's workdir and prefix with a suffix (a prefix stays short
    enough for the lab's interface names)."""
    workdir, prefix = lab_workdir_and_prefix()
    return workdir.with_name(workdir.name + "-4"), prefix[:5] + "4"


@pytest.fixture(scope="module")
def nonmember():
    """A 4-host lab with views, the cluster rolled out with node1-3 as the ensemble; everything
    ended by PID and removed at the end."""
    workdir, prefix = _lab_place()
    if (workdir / "views").exists():  # what an interrupted run left: the lab refuses foreign processes
        try:
            HostViews(Lab.load(workdir), log=lambda message: None).down(quiet=True)
        except LabError as exc:
            print(f"could not clean up the views in {workdir}: {exc}")
    try:
        Lab.preflight()
    except LabError as exc:
        pytest.fail(f"{exc}. The lab tests need a root Debian machine set up by `make setup`.", pytrace=False)
    lab = Lab(workdir, hosts=HOSTS, prefix=prefix, vm_bridge=VM_BRIDGE)
    try:
        lab.up()
    except LabError as exc:
        pytest.fail(f"lab up failed: {exc}", pytrace=False)
    try:
        views = HostViews(lab, zk_root=f"/rollout-{uuid.uuid4().hex[:10]}", members=MEMBERS)
        views.up()
        store = None
        try:
            run = views.playbook("playbooks/rollout.yml", timeout=1200)
            if run.returncode != 0:
                pytest.fail(f"the rollout failed:\n{run.failures()}", pytrace=False)
            store = views.operator_store()
            yield views, store, run
        finally:
            try:
                if store is not None:
                    store.stop()
                views.stop_services("node-daemon")
                views.stop_services()
            finally:
                views.down()
    finally:
        lab.down()


def _established(netns: str, pid: int) -> set[tuple[str, int]]:
    """The remote ends (address, port) of the TCP connections process ``pid`` holds in ``netns``."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Htnp", "state", "established"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            address, port = line.split()[3].rsplit(":", 1)
            found.add((address.strip("[]").removeprefix("::ffff:"), int(port)))
    return found


@pytest.mark.lab
@pytest.mark.timeout(1500)
def test_a_hypervisor_outside_the_ensemble_is_set_up_by_its_own_roles_and_runs_secured(nonmember):
    views, store, run = nonmember
    lab = views.lab
    members = {h.name: h for h in lab.hosts[:MEMBERS]}
    outsider = lab.host(HOSTS)
    assert outsider.name == NON_MEMBER and NON_MEMBER not in members
    services = views.services()
    assert sorted(s["node"] for s in services if s["role"] == "zookeeper") == sorted(members)
    daemons = {s["node"]: s for s in services if s["role"] == "node-daemon"}
    assert sorted(daemons) == [h.name for h in lab.hosts]
    assert run.changed().get(NON_MEMBER, 0) > 0

    # the ensemble is the three members only; node4 has none of the zookeeper role's files
    member_address = {h.address for h in members.values()}
    for name in members:
        zoo = views.view(name).read_text("/etc/zookeeper/pvc/zoo.cfg")
        servers = [line.split("=", 1)[1].split(":")[0] for line in zoo.splitlines() if line.startswith("server.")]
        assert sorted(servers) == sorted(member_address), zoo
    node4 = views.view(NON_MEMBER)
    for path in (
        "/etc/zookeeper/pvc/zoo.cfg",
        "/etc/zookeeper/pvc/tls/ca.pem",
        "/etc/systemd/system/zookeeper.service",
    ):
        assert node4.read_text(path) is None, f"{NON_MEMBER} has {path}: the zookeeper role ran there"

    # its trust: the cluster CA's certificate, installed by the node_daemon role from the controller
    ca = views.cluster_ca_dir / "ca.pem"
    assert node4.read_text(ROLLOUT_ZK_CA_ON_NODE) == ca.read_text()
    config = _daemon_config(node4)
    zk = config.zookeeper
    assert zk.hosts == views.zk_hosts == ",".join(f"{h.address}:{ROLLOUT_ZK_PORT}" for h in members.values())
    assert zk.tls and zk.tls_verify and not zk.insecure
    assert Path(zk.tls_ca).read_text() == ca.read_text()  # the file the role installed in node4's view
    assert (zk.auth_username, zk.node_password, zk.operator_digest) == (
        identities.NODES_USER,
        identities.node_password(NON_MEMBER),
        identities.operator_digest(),
    )

    # it is connected to a member's TLS port (nothing serves ZooKeeper on node4 itself)
    pid = daemons[NON_MEMBER]["pid"]
    zk_peers = {(address, port) for address, port in _established(outsider.netns, pid) if port == ROLLOUT_ZK_PORT}
    assert zk_peers and {address for address, _ in zk_peers} <= member_address, zk_peers
    listening = subprocess.run(
        ["ip", "netns", "exec", outsider.netns, "ss", "-Hltn", f"sport = :{ROLLOUT_ZK_PORT}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert listening.strip() == "", listening
    log = Path(daemons[NON_MEMBER]["log"]).read_text()
    assert f"node {NON_MEMBER} running" in log and "INSECURE" not in log

    # registered, run and ready (the rollout made it ready), and its keepalive goes on
    key = store.schema.node_key
    assert store.find_text(key(NON_MEMBER, S.NODE_DAEMON_STATE)) == "run"
    assert store.find_text(key(NON_MEMBER, S.NODE_DOMAIN_STATE)) == "ready"
    assert store.exists(key(NON_MEMBER, S.NODE_ALIVE))
    assert store.find_text(key(NON_MEMBER, S.NODE_ADDRESS)) == outsider.address
    first = store.find_text(key(NON_MEMBER, S.NODE_KEEPALIVE))
    assert first is not None
    assert wait_for_key(store, key(NON_MEMBER, S.NODE_KEEPALIVE), lambda value: value not in (None, first), 60)

    # libvirt: every node's libvirtd accepts node4's certificate, and node4's accepts every node's
    nodes = ", ".join(f'"O=pvc.cluster,CN={h.name}"' for h in lab.hosts)
    for view in views.views:
        conf = view.read_text("/etc/libvirt/libvirtd.conf")
        assert f"tls_allowed_dn_list = [ {nodes} ]" in conf, (view.host.name, conf)


# The operator's moves, with the inventory's pvc_zk_options (the operator's identity over TLS).
MOVES = """
- name: Move a VM whose home is the non-member, and flush the non-member
  hosts: localhost
  gather_facts: false
  module_defaults:
    group/pvc.cluster.all: "{{ {'zk_hosts': pvc_zk_hosts, 'zk_root': pvc_zk_root | default('/pvc')}
                               | combine(pvc_zk_options | default({})) }}"
  tasks:
    - name: Migrate it to a member
      pvc.cluster.vm_migrate:
        name: nm-live
        target_node: node1
    - name: Bring it home to the non-member
      pvc.cluster.vm_migrate:
        name: nm-live
        state: unmigrated
    - name: Flush the non-member
      pvc.cluster.node:
        name: node4
        state: flushed
    - name: Make the non-member ready again (its VM comes back)
      pvc.cluster.node:
        name: node4
        state: ready
"""


def _running_on(lab, name: str) -> list[str]:
    return sorted(h.name for h in lab.hosts if name in h.domains())


@pytest.mark.lab
@pytest.mark.timeout(1500)
def test_a_vm_at_home_on_the_non_member_migrates_live_both_ways_and_the_non_member_flushes(nonmember, tmp_path):
    views, store, _ = nonmember
    lab = views.lab
    vms = tmp_path / "vms.yml"
    vms.write_text(
        yaml.safe_dump(
            {
                "pvc_vms": [
                    {
                        "name": VM,
                        "xml": domain_xml(VM, memory_mib=64),
                        "node": NON_MEMBER,
                        "state": "started",
                        "migration_method": "live",
                    }
                ]
            }
        )
    )
    run = views.playbook("playbooks/vm_meta.yml", "--extra-vars", f"@{vms}")
    assert run.returncode == 0, run.failures()
    deadline = time.monotonic() + 60
    while _running_on(lab, VM) != [NON_MEMBER] and time.monotonic() < deadline:
        time.sleep(0.2)  # libvirt has no cross-host watch
    assert _running_on(lab, VM) == [NON_MEMBER]

    uuid_ = find_vm(store, VM)
    started = time.time()
    playbook = tmp_path / "moves.yml"
    playbook.write_text(MOVES)
    run = views.playbook(playbook, timeout=900)
    assert run.returncode == 0, run.failures()
    records = [r for r in read_history(store, uuid_, last=S.HISTORY_KEEP) if r["steps"]["requested"] >= started]
    moves = [(r["source"], r["target"], r["result"], r["method_used"]) for r in records]
    assert len(moves) == 4, records
    assert moves[:2] == [(NON_MEMBER, "node1", "done", "live"), ("node1", NON_MEMBER, "done", "live")], moves
    flushed_to = moves[2][1]
    assert moves[2] == (NON_MEMBER, flushed_to, "done", "live") and flushed_to != NON_MEMBER, moves
    assert moves[3] == (flushed_to, NON_MEMBER, "done", "live"), moves
    assert store.find_text(store.schema.node_key(NON_MEMBER, S.NODE_DOMAIN_STATE)) == "ready"
    assert _running_on(lab, VM) == [NON_MEMBER]


# The node_daemon role's default CA source, evaluated for every host of an inventory (no lab needed:
# the role's defaults file, read as the role reads it, on hosts of connection local).
CA_SOURCE = """
- name: The node_daemon role's CA source on every hypervisor
  hosts: pvc_nodes
  gather_facts: false
  tasks:
    - name: Load the role's defaults
      ansible.builtin.include_vars:
        file: "{{ pvc_lab_repo }}/roles/node_daemon/defaults/main.yml"
    - name: Write what each host would copy
      ansible.builtin.copy:
        content: "{{ node_daemon_zookeeper_tls_ca_source }}"
        dest: "{{ out_dir }}/{{ inventory_hostname }}"
        mode: "0644"
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("operator_ca", [False, True], ids=["cluster-ca", "operator-ca-on-the-members"])
def test_a_non_member_trusts_the_ca_of_the_members_certificates(tmp_path, operator_ca):
    """The operator's own ZooKeeper CA (zookeeper_tls_ca_cert), set for the members only, as the
    zookeeper role's variables usually are, is the CA every hypervisor gets, a member or not;
    without it, every hypervisor gets the cluster CA's certificate."""
    coordinators = {"hosts": {name: {} for name in ("hv1", "hv2", "hv3")}}
    if operator_ca:
        coordinators["vars"] = {"zookeeper_tls_ca_cert": "/srv/operator/zookeeper-ca.pem"}
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": str(VENV_PYTHON),
                "pvc_cluster_ca_dir": "/srv/cluster-ca",
                "pvc_lab_repo": str(REPO_ROOT),
                "out_dir": str(tmp_path / "out"),
            },
            "children": {
                "pvc_coordinators": coordinators,
                "pvc_nodes": {"hosts": {name: {} for name in ("hv1", "hv2", "hv3", "hv4")}},
            },
        }
    }
    (tmp_path / "out").mkdir()
    (tmp_path / "inventory.yml").write_text(json.dumps(inventory))
    (tmp_path / "play.yml").write_text(CA_SOURCE)
    run = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml")],
        capture_output=True,
        text=True,
        timeout=240,
        env={
            "PATH": f"{VENV_PYTHON.parent}:/usr/sbin:/usr/bin:/sbin:/bin",
            "ANSIBLE_NOCOWS": "1",
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
            "HOME": str(tmp_path),
        },
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    expected = "/srv/operator/zookeeper-ca.pem" if operator_ca else "/srv/cluster-ca/ca.pem"
    sources = {name: (tmp_path / "out" / name).read_text() for name in ("hv1", "hv2", "hv3", "hv4")}
    assert sources == dict.fromkeys(sources, expected)
