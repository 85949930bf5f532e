# -*- coding: utf-8 -*-
# Copyright: pvc.cluster developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# PRIVATE: this module is internal to the pvc.cluster collection and its node daemon.
# It may change without notice; do not import it from other collections.
"""The ZooKeeper schema of a pvc.cluster: every znode path and value vocabulary, defined once.

Used by the node daemon (installed as ``pvc_cluster_common._schema``) and by the Ansible modules
(``ansible_collections.pvc.cluster.plugins.module_utils._schema``). Standard library only.

Layout (all paths below the cluster root, default ``/pvc``; memory always in MiB)::

    /schema/version                       SCHEMA_VERSION
    /config/default_selector              cluster default node selector ("mem")
    /config/require_n1                    "true": the modules refuse an allocation (a new VM started) or a flush
                                          that would leave the cluster unable to restart every running VM after
                                          the loss of any one node (default "false": they report it only)
    /nodes/<node>/                        one per hypervisor, created by its daemon
        daemon_state                      init | run | shutdown | stop, written by the node itself (or fenced by
                                          an operator's confirm_down); a node's state as everyone reads it
                                          is this one combined with its peers' verdicts (fences/, claims/;
                                          _records.node_state, read by _cluster.read_node_states)
        libvirt                           the daemon's connection to its libvirtd: ok | down | hung
                                          (only an ok node is a migration target)
        domain_state                      ready | flush | flushed | unflush
        alive                             ephemeral; exists while the daemon's session lives
        maintenance                       "true": never fenced (the operator works on it); else "false"
        fence                             JSON record of an operator's confirm_down of this node (who, how,
                                          when, result), or of a fence by an older daemon; absent until then
        fences/<node>                     JSON record of this node's last verdict about <node> (dead,
                                          fencing, fenced, fence-failed; who, how, when, and the version of
                                          <node>'s own daemon_state it judged), written by this node's own
                                          identity only: a node's fence record is the latest of these and
                                          its own ``fence`` (_records.latest_fence_record)
        claims/<version>                  create-once: the peer that fences this node while its daemon_state
                                          has that version (or this node itself, coming back at that version);
                                          exactly one of them is created per version. The container's value
                                          is a note of the last verdict, rewritten with every verdict so that
                                          its version changes (a transaction that must not race a verdict
                                          checks it)
        keepalive                         unix time (float) of the last keepalive
        memtotal memused memfree          host memory, MiB
        memalloc                          memory of VMs running here, MiB
        memprov                           memory of every VM assigned here whatever its state, MiB
        memreserve                        host memory held back from VMs (daemon config), MiB
        vcpualloc cpuload domaincount     vCPUs of running VMs, 1-min load, running domain count
        cputotal                          host CPUs as libvirt counts them (written at registration; 0 = unknown)
        runningdomains                    JSON list of running domain UUIDs
        figures_age                       age (s) of the libvirt figures this keepalive published (memtotal,
                                          memused, memfree, memalloc, vcpualloc, domaincount, runningdomains)
        figures_stale                     true when they are older than two keepalive intervals (libvirt slow
                                          or hung): they are the last ones read, never zeros
        address                           how peers reach this node: an IP address or a host name, from
                                          which each peer builds the URIs with its own templates
        libvirt_uri transport_uri         this node's own URIs, for people to read (never opened by a peer)
        reservations/<uuid>               memory (MiB) held for an in-flight incoming migration
        flush_halted                      why this node's running flush stopped (require_n1: the node whose
                                          failure could not be survived, and by how much); absent otherwise,
                                          deleted when a flush or ready starts
        recovery_n1                       written by this node's daemon when an HA recovery it made left the
                                          cluster failing the n-1 check (which fenced node, how many VMs, the
                                          verdict); absent otherwise, deleted by its next recovery that keeps
                                          n-1
    /domains/<uuid>/                      one per VM; the znode's data is the VM name
        xml                               libvirt domain XML: the source of truth
        state                             desired VM state (VM_STATES), written by the operator only
        node                              node the VM is assigned to (or being migrated to)
        lastnode                          home node to return to after a temporary migration, or ""
        failedreason                      libvirt's reason for the last failure, or ""
        meta/<key>                        META_KEYS (see _meta.py for values and defaults)
        runtime/                          what the node daemons write freely (see "ACLs" below)
            stats                         JSON statistics of the running VM (written by its node)
            runstate                      JSON record of a state the daemons moved the VM to (a restart
                                          done, a shutdown ended, a start failed, a flush's shutdown
                                          and autostart), valid for one version of ``state`` only:
                                          the VM's state is this record's while ``state`` keeps the
                                          version it names, else ``state`` (_records.effective_state)
            migration                     JSON record of the in-flight migration (absent when none)
            history/<seq>                 JSON audit records of finished migrations (last N kept)
    /locks/nodes/<node>                   a lock:    one flush/ready of a node at a time
    /locks/fence/<node>                   a lock:    the one live daemon that fences and recovers a dead node

Locks live under /locks, never on data keys, so that data keys never grow lock children. A VM's
placement takes no lock: every write of its ``node`` is version-checked in its transaction.

ACLs (a secured cluster; ``acl_rule``): ZooKeeper's ACLs are per znode and not inherited, and
deleting or creating a znode is a permission on its *parent*. Two identities: the **operator**
(modules, inventory) has every permission everywhere; the **nodes** (one identity shared by every
node daemon) read everything and write only what the daemons must write. A node daemon also
authenticates as its **own node** identity, the only node identity that writes its node's keys
(its ``daemon_state`` and ``domain_state`` included: a peer's verdict about a dead node goes under
the peer's own ``fences/<node>``, and the nodes may only create a claim in the node's ``claims/``).
So that a node identity can delete a VM's migration record without being able to delete (and
re-create) the VM's XML, the keys the daemons create and delete live in ``runtime/``.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
DEFAULT_ROOT = "/pvc"

# ---- vocabularies ---------------------------------------------------------------------------

# dead: its keepalives stopped (a peer's verdict); fencing: a peer is powering it off; fenced: its
# power is confirmed off (by its fence device, or by an operator with confirm_down), so its VMs may run
# elsewhere; fence-failed: the fence failed or could not be confirmed, so nothing is recovered.
# A node writes only init, run, shutdown and stop itself; the others are its peers' verdicts (under
# their own fences/<node>), which every reader combines with the node's own state (_records.node_state).
# An operator's confirm_down writes fenced into the node's own key; an older daemon wrote the others.
DAEMON_STATES = ("init", "run", "shutdown", "stop", "dead", "fencing", "fenced", "fence-failed")
# The states in which a node's daemon is not running and its peers' fencer acts on it, weakest first:
# of several verdicts about one version of a node's state, the strongest decides.
FENCE_STATES = ("dead", "fencing", "fence-failed", "fenced")
DOMAIN_STATES = ("ready", "flush", "flushed", "unflush")
# The node daemon's connection to its libvirtd: ok; down (no connection: libvirtd gone, refusing,
# or it closed the connection); hung (libvirtd accepts but does not answer within the call timeout).
LIBVIRT_HEALTH = ("ok", "down", "hung")
LIBVIRT_OK = "ok"
# start: run on `node`; restart: stop then start; shutdown: clean shutdown (timeout, then forced);
# stop: forced stop; disable: stopped and administratively disabled; fail: could not be started
# (see failedreason). A migration does not change the state: it is the `migration` record.
VM_STATES = ("start", "restart", "shutdown", "stop", "disable", "fail")
# States that leave a VM not running once reconciled.
VM_STOPPED_STATES = ("shutdown", "stop", "disable", "fail")

# ---- node keys ------------------------------------------------------------------------------

NODE_DAEMON_STATE = "daemon_state"
NODE_DOMAIN_STATE = "domain_state"
NODE_ALIVE = "alive"
NODE_MAINTENANCE = "maintenance"
NODE_FENCE = "fence"
NODE_KEEPALIVE = "keepalive"
NODE_MEMTOTAL = "memtotal"
NODE_MEMUSED = "memused"
NODE_MEMFREE = "memfree"
NODE_MEMALLOC = "memalloc"
NODE_MEMPROV = "memprov"
NODE_MEMRESERVE = "memreserve"
NODE_VCPUALLOC = "vcpualloc"
NODE_CPULOAD = "cpuload"
NODE_DOMAINCOUNT = "domaincount"
NODE_CPUTOTAL = "cputotal"
NODE_RUNNINGDOMAINS = "runningdomains"
NODE_FIGURES_AGE = "figures_age"
NODE_FIGURES_STALE = "figures_stale"
NODE_RESERVATIONS = "reservations"
NODE_ADDRESS = "address"
NODE_LIBVIRT_URI = "libvirt_uri"
NODE_TRANSPORT_URI = "transport_uri"
NODE_LIBVIRT = "libvirt"
NODE_FENCES = "fences"
NODE_FLUSH_HALTED = "flush_halted"
NODE_RECOVERY_N1 = "recovery_n1"
NODE_CLAIMS = "claims"

# Keys every node has, with the value a newly registered node starts with.
# New nodes start `flushed`: they take VMs only after an operator (or the rollout) makes them ready.
NODE_DEFAULTS = {
    NODE_DAEMON_STATE: "init",
    NODE_DOMAIN_STATE: "flushed",
    NODE_MAINTENANCE: "false",
    NODE_KEEPALIVE: "0",
    NODE_MEMTOTAL: "0",
    NODE_MEMUSED: "0",
    NODE_MEMFREE: "0",
    NODE_MEMALLOC: "0",
    NODE_MEMPROV: "0",
    NODE_MEMRESERVE: "0",
    NODE_VCPUALLOC: "0",
    NODE_CPULOAD: "0",
    NODE_DOMAINCOUNT: "0",
    NODE_CPUTOTAL: "0",
    NODE_RUNNINGDOMAINS: "[]",
    NODE_FIGURES_AGE: "0",
    NODE_FIGURES_STALE: "true",  # nothing read from libvirt yet (and after a restart, until the first keepalive)
    NODE_ADDRESS: "",
    NODE_LIBVIRT_URI: "",
    NODE_TRANSPORT_URI: "",
    NODE_LIBVIRT: LIBVIRT_OK,  # a daemon registers after it has connected to libvirt
}

# ---- domain keys ----------------------------------------------------------------------------

DOMAIN_XML = "xml"
DOMAIN_STATE = "state"
DOMAIN_NODE = "node"
DOMAIN_LASTNODE = "lastnode"
DOMAIN_FAILEDREASON = "failedreason"
DOMAIN_STATS = "stats"
DOMAIN_META = "meta"
DOMAIN_MIGRATION = "migration"
DOMAIN_HISTORY = "history"
DOMAIN_RUNTIME = "runtime"
DOMAIN_RUNSTATE = "runstate"
# Domain keys that live in the domain's runtime/ container (see Schema.domain_key).
DOMAIN_RUNTIME_KEYS = (DOMAIN_STATS, DOMAIN_MIGRATION, DOMAIN_HISTORY, DOMAIN_RUNSTATE)

META_MIGRATION_METHOD = "migration_method"
META_NODE_SELECTOR = "node_selector"
META_NODE_LIMIT = "node_limit"
META_NODE_AUTOSTART = "node_autostart"
META_MIGRATION_MAX_DOWNTIME_MS = "migration_max_downtime_ms"
# how a live migration of a guest that dirties memory faster than it is sent converges
# (_meta.py; docs/migration-protocol.md, "Busy guests")
META_MIGRATION_AUTO_CONVERGE = "migration_auto_converge"
META_KEYS = (
    META_MIGRATION_METHOD,
    META_NODE_SELECTOR,
    META_NODE_LIMIT,
    META_NODE_AUTOSTART,
    META_MIGRATION_MAX_DOWNTIME_MS,
    META_MIGRATION_AUTO_CONVERGE,
)

# How many finished migration records are kept per VM.
HISTORY_KEEP = 20


# ---- ACLs -------------------------------------------------------------------------------------

# ZooKeeper's permission bits
PERM_READ = 1
PERM_WRITE = 2
PERM_CREATE = 4
PERM_DELETE = 8
PERM_ADMIN = 16
PERM_ALL = PERM_READ | PERM_WRITE | PERM_CREATE | PERM_DELETE | PERM_ADMIN
# What a daemon may do where it may do everything: all but changing ACLs.
PERM_RWCD = PERM_READ | PERM_WRITE | PERM_CREATE | PERM_DELETE
# VM keys outside runtime/ that the node daemons write: placement (node, lastnode; a migration
# request moves it, a recovery too) and the reason of the last failure. Never the XML, the desired
# state or the meta: what a daemon changes of a VM's state is its runtime/runstate record.
NODE_WRITTEN_DOMAIN_KEYS = (DOMAIN_NODE, DOMAIN_LASTNODE, DOMAIN_FAILEDREASON)
# Keys of a node its peers wrote before the verdicts moved to the peers' own fences/<node> (older
# clusters: their ACL let the nodes write them; Schema.acl_rules_accepted accepts it, with a warning).
LEGACY_PEER_WRITTEN_NODE_KEYS = (NODE_DAEMON_STATE, NODE_DOMAIN_STATE)


class AclRule:
    """Who may do what on one znode: ``nodes`` are the permissions of the shared node identity,
    ``own_node`` the node whose own identity may read, write, create and delete there (None:
    none). The operator always has every permission."""

    __slots__ = ("nodes", "own_node")

    def __init__(self, nodes: int, own_node: str | None = None) -> None:
        self.nodes = nodes
        self.own_node = own_node

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AclRule) and (self.nodes, self.own_node) == (other.nodes, other.own_node)

    def __repr__(self) -> str:
        return f"AclRule(nodes={self.nodes}, own_node={self.own_node!r})"


def _join(*parts: str) -> str:
    for part in parts:
        if not part or "/" in part:
            raise ValueError(f"invalid znode name {part!r}: must be non-empty and contain no '/'")
    return "/" + "/".join(parts)


class Schema:
    """Every znode path of one cluster, below its root.

    Paths are methods, never strings assembled by callers, so that the layout has one definition.
    """

    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        root = "/" + root.strip("/") if root.strip("/") else ""
        self.root = root

    def _p(self, *parts: str) -> str:
        return self.root + _join(*parts)

    # cluster
    def schema_version(self) -> str:
        return self._p("schema", "version")

    def config(self, key: str) -> str:
        return self._p("config", key)

    def default_selector(self) -> str:
        return self.config("default_selector")

    def require_n1(self) -> str:
        return self.config("require_n1")

    def nodes(self) -> str:
        return self._p("nodes")

    def domains(self) -> str:
        return self._p("domains")

    def base_paths(self) -> tuple[str, ...]:
        """Container znodes that must exist before anything else is written."""
        return (
            self.root or "/",
            self._p("schema"),
            self._p("config"),
            self.nodes(),
            self.domains(),
            self._p("locks"),
            self._p("locks", "nodes"),
            self._p("locks", "fence"),
        )

    # nodes
    def node(self, node: str) -> str:
        return self._p("nodes", node)

    def node_key(self, node: str, key: str) -> str:
        return self._p("nodes", node, key)

    def node_reservations(self, node: str) -> str:
        return self._p("nodes", node, NODE_RESERVATIONS)

    def node_reservation(self, node: str, uuid: str) -> str:
        return self._p("nodes", node, NODE_RESERVATIONS, uuid)

    def node_fences(self, node: str) -> str:
        return self._p("nodes", node, NODE_FENCES)

    def node_fence_record(self, fencer: str, node: str) -> str:
        """``fencer``'s record of its last verdict about ``node`` (under ``fencer``'s own keys)."""
        return self._p("nodes", fencer, NODE_FENCES, node)

    def node_claims(self, node: str) -> str:
        return self._p("nodes", node, NODE_CLAIMS)

    def node_claim(self, node: str, version: int) -> str:
        """The create-once claim of the version ``version`` of ``node``'s daemon_state."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"invalid daemon_state version {version!r}")
        return self._p("nodes", node, NODE_CLAIMS, str(version))

    # domains
    def domain(self, uuid: str) -> str:
        return self._p("domains", uuid)

    def domain_key(self, uuid: str, key: str) -> str:
        if key in DOMAIN_RUNTIME_KEYS:
            return self._p("domains", uuid, DOMAIN_RUNTIME, key)
        return self._p("domains", uuid, key)

    def domain_runtime(self, uuid: str) -> str:
        return self._p("domains", uuid, DOMAIN_RUNTIME)

    def domain_meta(self, uuid: str, key: str | None = None) -> str:
        if key is None:
            return self._p("domains", uuid, DOMAIN_META)
        return self._p("domains", uuid, DOMAIN_META, key)

    def domain_migration(self, uuid: str) -> str:
        return self.domain_key(uuid, DOMAIN_MIGRATION)

    def domain_history(self, uuid: str) -> str:
        return self.domain_key(uuid, DOMAIN_HISTORY)

    # locks
    def node_lock(self, node: str) -> str:
        return self._p("locks", "nodes", node)

    def fence_lock(self, node: str) -> str:
        return self._p("locks", "fence", node)

    # ACLs
    def acl_rule(self, path: str) -> AclRule:
        """The ACL rule of a znode of this cluster (see "ACLs" in the module's docstring).

        The one definition of who may write what; the store applies it to every znode it creates
        and ``ensure_schema`` checks it on the base paths. A path outside the cluster, or one the
        layout does not name, is the operator's alone (the nodes may read it)."""
        if self.root and path != self.root and not path.startswith(self.root + "/"):
            return AclRule(PERM_READ)
        parts = [part for part in path[len(self.root) :].split("/") if part]
        depth = len(parts)
        top = parts[0] if parts else ""
        if top == "nodes" and depth == 1:
            return AclRule(PERM_READ | PERM_CREATE)  # a daemon registers its node
        if top == "nodes":
            node = parts[1]
            if depth >= 3 and parts[2] == NODE_RESERVATIONS:
                # any node reserves memory on a migration's target (rewriting the container's value
                # with a version check, which serialises requests to one target), and any node
                # ends that migration
                return AclRule(PERM_RWCD, node if depth == 3 else None)
            if depth == 3 and parts[2] == NODE_CLAIMS:
                # a peer claims a version of the node's state (creates a claim, never deletes one)
                # and notes its verdict in the container's value (so that its version changes)
                return AclRule(PERM_READ | PERM_WRITE | PERM_CREATE, node)
            # its own keys, daemon_state, domain_state, fences/ and each claim included: its own
            # identity writes them (a claim, once created, no peer alters or deletes)
            return AclRule(PERM_READ, node)
        if top == "domains" and depth >= 3:
            key = parts[2]
            if key == DOMAIN_RUNTIME:
                return AclRule(PERM_RWCD)
            if depth == 3 and key in NODE_WRITTEN_DOMAIN_KEYS:
                return AclRule(PERM_READ | PERM_WRITE)
            return AclRule(PERM_READ)  # the XML, the desired state, the meta: the operator's
        if top == "domains" and depth == 2:
            return AclRule(PERM_READ | PERM_CREATE)  # runtime/ of a VM defined before it existed
        if top == "locks" and depth >= 2:
            # lock znodes are created on first use, contenders are created and deleted by anyone
            return AclRule(PERM_READ | PERM_CREATE | PERM_DELETE if depth == 2 else PERM_RWCD)
        return AclRule(PERM_READ)

    def acl_rules_accepted(self, path: str) -> tuple[AclRule, ...]:
        """Older rules of ``path`` that a check accepts with a warning (``_store.check_acls``):
        the ACL a znode was created with stays until an operator sets it again
        (docs/security.md, "Upgrading")."""
        if self.root and not path.startswith(self.root + "/"):
            return ()
        parts = [part for part in path[len(self.root) :].split("/") if part]
        if len(parts) == 3 and parts[0] == "nodes" and parts[2] in LEGACY_PEER_WRITTEN_NODE_KEYS:
            return (AclRule(PERM_READ | PERM_WRITE, parts[1]),)
        return ()
