"""The node daemon's YAML configuration: one typed definition with defaults and validation.

Example (every key but ``node`` and ``zookeeper.hosts`` is optional)::

    node: node1                        # this hypervisor's name in the cluster
    zookeeper:
      hosts: "10.0.0.1:2181,10.0.0.2:2181,10.0.0.3:2181"
      root: /pvc                       # cluster root znode
      timeout_s: 10                    # connect and session timeout
      auth:                            # required unless insecure: true (docs/security.md)
        username: nodes                # the identity every node daemon shares
        password: secret
        node_password: secret2         # this node's own identity (its username is the node's name)
        operator_digest: "operator:base64(sha1(operator:password))"   # who may do anything
        previous_password: null        # while the nodes' password is rotated: the former one
        previous_node_password: null   # while this node's own password is rotated: the former one
      tls: {enabled: false, ca: /etc/pvc/ca.pem, cert: /etc/pvc/node.pem, key: /etc/pvc/node.key, verify: true}
    insecure: false                    # true: an open cluster (no ZooKeeper authentication, open ACLs)
    libvirt:
      uri: qemu:///system              # how this daemon reaches its own libvirtd
      call_timeout_s: 30               # bound on every libvirt call that can block
    migration:
      # How this daemon reaches a peer, rendered with the peer's {node} name and its published
      # {address}: libvirt_uri_template is the libvirt connection for a peer-to-peer migration
      # there, transport_uri_template the address QEMU streams memory to. No URI is ever read
      # from ZooKeeper. tls: live migrations ask for VIR_MIGRATE_TLS (QEMU's memory stream in
      # TLS, with the certificates of qemu.conf's migrate_tls_x509_cert_dir); off only with a
      # libvirt set up without TLS (docs/security.md).
      libvirt_uri_template: "qemu+tls://{address}/system"
      transport_uri_template: "tcp://{address}"
      tls: true
      address: null                    # published for peers (IP address or host name; default: node name)
      step_timeout_s: 60               # how long a side waits for its peer's next step
      live_timeout_base_s: 60          # live migration completion timeout = base + per_gib * GiB
      live_timeout_per_gib_s: 30
      flush_parallel: 2                # migrations in flight at once during a flush
      default_selector: mem
    intervals:
      keepalive_s: 5
      dead_after: 6                    # keepalives missed before peers mark a node dead: 30 s by
                                       # default (keepalive_s x dead_after), then fenced at once;
                                       # the window must exceed 2/3 of zookeeper.timeout_s plus one
                                       # keepalive_s (check_detection_window)
      shutdown_timeout_s: 180          # clean VM shutdown before a forced stop
    memory:
      reserve_mib: 1024                # host memory never given to VMs
    log:
      file: /var/log/pvc/node-daemon.log   # null: no file
      stdout: true
      colours: null                    # null: only when stdout is a terminal
      debug: false
    metrics:
      enabled: false
      address: 127.0.0.1
      port: 9650
    fencing:                           # how this daemon fences a dead peer (docs/high-availability.md)
      timeout_s: 10                    # bound on each call of a fence device
      nodes:                           # per node: its fence device (never read from ZooKeeper)
        node2: {method: ipmi, address: 10.0.1.2, port: 623, username: admin, password: secret,
                interface: lanplus, cipher_suite: 3, action: off}
        node3: {method: agent, agent: /usr/sbin/fence_ipmilan, action: off,
                options: {ip: 10.0.1.3, username: admin, password: secret, lanplus: 1}}
    domain_policy:                     # what a VM's XML may contain (docs/security.md); each key
      storage_roots: [/var/lib/libvirt/images, ...]   # given replaces its default
      emulators: [/usr/bin/qemu-system-x86_64, /usr/bin/kvm, /usr/libexec/qemu-kvm]
      devices: [emulator, disk, controller, interface, ...]
      interface_types: [bridge, network]
      disk_protocols: [rbd]
      namespaces: []                   # XML namespaces accepted outside <metadata>
      seclabel: false                  # per-domain <seclabel> overrides
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from pvc_cluster_common import _decode
from pvc_cluster_common._domain_policy import DomainPolicy, PolicyError
from pvc_cluster_common._schema import DEFAULT_ROOT
from pvc_cluster_common._meta import CONCRETE_SELECTORS
from pvc_cluster_common._store import ConnectionOptions

from .fencing import ACTIONS as FENCE_ACTIONS
from .fencing import METHODS as FENCE_METHODS
from .fencing import FenceDevice


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key and what is accepted."""


@dataclass(frozen=True)
class Config:
    node: str
    zookeeper: ConnectionOptions
    libvirt_uri: str = "qemu:///system"
    libvirt_call_timeout_s: float = 30.0
    libvirt_uri_template: str = "qemu+tls://{address}/system"
    transport_uri_template: str = "tcp://{address}"
    migration_tls: bool = True
    address: str | None = None
    step_timeout_s: float = 60.0
    live_timeout_base_s: float = 60.0
    live_timeout_per_gib_s: float = 30.0
    flush_parallel: int = 2
    default_selector: str = "mem"
    keepalive_interval_s: float = 5.0
    dead_after: int = 6
    shutdown_timeout_s: float = 180.0
    memory_reserve_mib: int = 1024
    log_file: str | None = None
    log_stdout: bool = True
    log_colours: bool | None = None
    debug: bool = False
    metrics_enabled: bool = False
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9650
    domain_policy: DomainPolicy = field(default_factory=DomainPolicy)
    fence_timeout_s: float = 10.0
    fence_devices: dict[str, Any] = field(default_factory=dict, repr=False)  # node name -> FenceDevice
    source: str = field(default="", compare=False)

    @property
    def published_address(self) -> str:
        """How peers reach this node (the node key ``address``): ``migration.address``, else the
        node name."""
        return self.address or self.node

    def peer_libvirt_uri(self, peer: str, address: str) -> str:
        """The libvirt URI of node ``peer`` at ``address`` (an address already decoded: an IP
        address or a host name), built from this daemon's own template: a URI read from
        ZooKeeper is never opened (``qemu+ext`` would run a command, ``tcp://elsewhere`` send a
        VM's memory elsewhere)."""
        return self.libvirt_uri_template.format(node=peer, address=_uri_host(address))

    def peer_transport_uri(self, peer: str, address: str) -> str:
        """Where QEMU streams a live migration to ``peer`` (see peer_libvirt_uri)."""
        return self.transport_uri_template.format(node=peer, address=_uri_host(address))

    @property
    def advertised_libvirt_uri(self) -> str:
        return self.peer_libvirt_uri(self.node, self.published_address)

    @property
    def advertised_transport_uri(self) -> str:
        return self.peer_transport_uri(self.node, self.published_address)

    def live_timeout_s(self, memory_mib: int) -> float:
        """Completion timeout of a live migration, growing with the memory to copy."""
        return self.live_timeout_base_s + self.live_timeout_per_gib_s * memory_mib / 1024.0


def _uri_host(address: str) -> str:
    """An address as the host part of a URI (an IPv6 address in brackets)."""
    return f"[{address}]" if ":" in address else address


# ---- the detection window ---------------------------------------------------------------------

# A ZooKeeper client whose server goes silent (its host partitioned: no reset arrives) notices at
# its read timeout, kazoo's 2/3 of the session timeout, and only then moves to another server.
FAILOVER_SHARE = Fraction(2, 3)
ZK_TIMEOUT_MIN_S = 1.0  # the least zookeeper.timeout_s accepted


def _exact(value: float) -> Fraction:
    """A configured number as the decimal it was written as (0.1 is 1/10, not its binary float)."""
    return Fraction(repr(value))


def min_dead_after(keepalive_s: float, zk_timeout_s: float) -> int:
    """The smallest ``intervals.dead_after`` that ``check_detection_window`` accepts."""
    # k * d > 2/3 T + k  <=>  d > 2/3 T / k + 1
    bound = FAILOVER_SHARE * _exact(zk_timeout_s) / _exact(keepalive_s) + 1
    return math.floor(bound) + 1


def check_detection_window(keepalive_s: float, dead_after: int, zk_timeout_s: float) -> None:
    """Refuse a detection window (``keepalive_s x dead_after``) that a healthy node can miss.

    A daemon whose ZooKeeper server is partitioned writes no keepalive until kazoo's read timeout
    (2/3 of ``zookeeper.timeout_s``) has passed and it has moved to another server; its last
    keepalive before the cut may be up to one interval old already, and its next one comes up to
    an interval after the move. So the window must exceed 2/3 of the session timeout plus one
    keepalive interval, or its peers fence a healthy node (docs/high-availability.md,
    "Detection"). Raises ConfigError naming both values, the rule and the fix."""
    window = _exact(keepalive_s) * dead_after
    failover = FAILOVER_SHARE * _exact(zk_timeout_s)
    needed = failover + _exact(keepalive_s)
    if window > needed:
        return
    # the largest session timeout this window allows: T < 3/2 (window - k)
    max_timeout = float((window - _exact(keepalive_s)) * 3 / 2)
    lower = (
        f" or lower zookeeper.timeout_s below {max_timeout:g} s"
        if max_timeout > ZK_TIMEOUT_MIN_S
        else f" (no zookeeper.timeout_s from its minimum, {ZK_TIMEOUT_MIN_S:g} s, is short enough)"
    )
    raise ConfigError(
        f"intervals: the detection window keepalive_s x dead_after = {keepalive_s:g} s x {dead_after} = "
        f"{float(window):g} s is too short for zookeeper.timeout_s = {zk_timeout_s:g} s: it must be longer "
        f"than 2/3 of zookeeper.timeout_s ({float(failover):.3g} s, a ZooKeeper client's failover after a "
        f"silent partition) plus one keepalive interval ({keepalive_s:g} s) = {float(needed):.3g} s, or "
        "peers can fence a healthy node whose daemon sat on a partitioned ZooKeeper server; raise "
        f"intervals.dead_after to at least {min_dead_after(keepalive_s, zk_timeout_s)}{lower} "
        "(docs/high-availability.md, Detection)"
    )


# ---- reading --------------------------------------------------------------------------------

_MISSING = object()


class _Section:
    """Typed access to one mapping of the YAML document, naming keys by their dotted path."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'the document'}: expected a mapping, got {type(data).__name__}")
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def section(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.data.get(name), self.key(name))

    def get(
        self,
        name: str,
        kind: str,
        default: Any = _MISSING,
        *,
        choices: tuple[str, ...] = (),
        minimum: float | None = None,
        nullable: bool = False,
    ) -> Any:
        self.used.add(name)
        value = self.data.get(name, _MISSING)
        if value is _MISSING or (value is None and not nullable):
            if default is _MISSING:
                raise ConfigError(f"{self.key(name)}: required key is missing ({_accepts(kind, choices, minimum)})")
            return default
        if value is None:
            return None
        return _convert(self.key(name), value, kind, choices, minimum)

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise ConfigError(f"{self.key(str(unknown[0]))}: unknown key (accepted here: {known})")


def _accepts(kind: str, choices: tuple[str, ...], minimum: float | None) -> str:
    if choices:
        return "accepted: " + ", ".join(choices)
    text = {
        "str": "a non-empty string",
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "name": "a node name of letters, digits, '.', '_' or '-'",
    }[kind]
    if minimum is not None:
        text += f" >= {minimum:g}"
    return "accepted: " + text


def _convert(key: str, value: Any, kind: str, choices: tuple[str, ...], minimum: float | None) -> Any:
    accepted = _accepts(kind, choices, minimum)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not a boolean ({accepted})")
    if kind in ("int", "float"):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind == "int" and not isinstance(value, int))
        ):
            raise ConfigError(f"{key}: {value!r} is not {'an integer' if kind == 'int' else 'a number'} ({accepted})")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}: {value!r} is too small ({accepted})")
        return float(value) if kind == "float" else value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: {value!r} is not a non-empty string ({accepted})")
    if kind == "name":
        try:
            _decode.node_name(value, key)
        except _decode.Invalid:
            raise ConfigError(f"{key}: {value!r} is not a valid node name ({accepted})") from None
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not valid ({accepted})")
    return value


_OPTION_NAME = r"[a-z][a-z0-9_-]{0,63}"


def _fence_devices(nodes: _Section) -> dict[str, Any]:
    """``fencing.nodes``: node name -> FenceDevice, each checked (see fencing.py)."""
    import re

    devices = {}
    for name in list(nodes.data):
        key = nodes.key(str(name))
        try:
            _decode.node_name(name, key)
        except _decode.Invalid:
            raise ConfigError(
                f"{key}: {name!r} is not a valid node name (accepted: a node name of letters, digits, '.', '_' or '-')"
            ) from None
        entry = nodes.section(name)
        method = entry.get("method", "str", choices=FENCE_METHODS)
        action = entry.get("action", "str", "off", choices=FENCE_ACTIONS)
        if method == "ipmi":
            address = entry.get("address", "str")
            try:
                _decode.address(address, entry.key("address"))
            except _decode.Invalid:
                raise ConfigError(
                    f"{entry.key('address')}: {address!r} is not valid (accepted: an IP address or a host name)"
                ) from None
            device = FenceDevice(
                node=name,
                method=method,
                action=action,
                address=address,
                port=entry.get("port", "int", 623, minimum=1),
                username=entry.get("username", "str"),
                password=entry.get("password", "str"),
                interface=entry.get("interface", "str", "lanplus", choices=("lanplus", "lan")),
                cipher_suite=entry.get("cipher_suite", "int", 3, minimum=0),
                ipmitool=entry.get("ipmitool", "str", "ipmitool"),
            )
            if device.port > 65535:
                raise ConfigError(f"{entry.key('port')}: {device.port} is too large (accepted: 1 to 65535)")
        else:
            agent = entry.get("agent", "str")
            if not agent.startswith("/"):
                raise ConfigError(
                    f"{entry.key('agent')}: {agent!r} is not an absolute path (accepted: the path of a "
                    "fence agent, e.g. /usr/sbin/fence_ipmilan)"
                )
            options = entry.section("options")
            pairs = []
            for option, value in options.data.items():
                options.used.add(option)
                if not isinstance(option, str) or not re.fullmatch(_OPTION_NAME, option) or option == "action":
                    raise ConfigError(
                        f"{options.key(str(option))}: not a valid option name (accepted: lower-case "
                        "letters, digits, '_' and '-'; not action, which the daemon sets)"
                    )
                if isinstance(value, bool) or not isinstance(value, (str, int, float)) or "\n" in str(value):
                    raise ConfigError(
                        f"{options.key(option)}: {value!r} is not valid (accepted: a string or a number on one line)"
                    )
                pairs.append((option, str(value)))
            device = FenceDevice(node=name, method=method, action=action, agent=agent, options=tuple(pairs))
        entry.reject_unknown()
        devices[name] = device
    return devices


def parse_config(data: Any, source: str = "") -> Config:
    """Build a Config from a parsed YAML document, or raise ConfigError (one line)."""
    top = _Section(data, "")
    node = top.get("node", "name")

    zk = top.section("zookeeper")
    auth = zk.section("auth")
    tls = zk.section("tls")
    options = ConnectionOptions(
        hosts=zk.get("hosts", "str"),
        root=zk.get("root", "str", DEFAULT_ROOT),
        timeout_s=zk.get("timeout_s", "float", 10.0, minimum=ZK_TIMEOUT_MIN_S),
        auth_username=auth.get("username", "str", None),
        auth_password=auth.get("password", "str", None),
        tls=tls.get("enabled", "bool", False),
        tls_ca=tls.get("ca", "str", None),
        tls_cert=tls.get("cert", "str", None),
        tls_key=tls.get("key", "str", None),
        tls_verify=tls.get("verify", "bool", True),
        node_name=node,
        node_password=auth.get("node_password", "str", None),
        operator_digest=auth.get("operator_digest", "str", None),
        previous_password=auth.get("previous_password", "str", None),
        previous_node_password=auth.get("previous_node_password", "str", None),
        insecure=top.get("insecure", "bool", False),
    )
    for section in (auth, tls):
        section.reject_unknown()
    zk.reject_unknown()
    try:
        options.validate()
    except ValueError as exc:
        raise ConfigError(f"zookeeper: {exc}") from None

    lv = top.section("libvirt")
    mig = top.section("migration")
    iv = top.section("intervals")
    mem = top.section("memory")
    log = top.section("log")
    met = top.section("metrics")
    policy = top.section("domain_policy")
    fencing = top.section("fencing")
    fence_timeout_s = fencing.get("timeout_s", "float", 10.0, minimum=1)
    fence_devices = _fence_devices(fencing.section("nodes"))
    fencing.reject_unknown()
    try:
        domain_policy = DomainPolicy.from_options(policy.data, "domain_policy")
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    config = Config(
        node=node,
        zookeeper=options,
        libvirt_uri=lv.get("uri", "str", "qemu:///system"),
        libvirt_call_timeout_s=lv.get("call_timeout_s", "float", 30.0, minimum=1),
        libvirt_uri_template=mig.get("libvirt_uri_template", "str", "qemu+tls://{address}/system"),
        transport_uri_template=mig.get("transport_uri_template", "str", "tcp://{address}"),
        migration_tls=mig.get("tls", "bool", True),
        address=mig.get("address", "str", None),
        step_timeout_s=mig.get("step_timeout_s", "float", 60.0, minimum=1),
        live_timeout_base_s=mig.get("live_timeout_base_s", "float", 60.0, minimum=1),
        live_timeout_per_gib_s=mig.get("live_timeout_per_gib_s", "float", 30.0, minimum=0),
        flush_parallel=mig.get("flush_parallel", "int", 2, minimum=1),
        default_selector=mig.get("default_selector", "str", "mem", choices=CONCRETE_SELECTORS),
        keepalive_interval_s=iv.get("keepalive_s", "float", 5.0, minimum=0.1),
        dead_after=iv.get("dead_after", "int", 6, minimum=2),
        shutdown_timeout_s=iv.get("shutdown_timeout_s", "float", 180.0, minimum=0),
        memory_reserve_mib=mem.get("reserve_mib", "int", 1024, minimum=0),
        log_file=log.get("file", "str", None),
        log_stdout=log.get("stdout", "bool", True),
        log_colours=log.get("colours", "bool", None, nullable=True),
        debug=log.get("debug", "bool", False),
        metrics_enabled=met.get("enabled", "bool", False),
        metrics_address=met.get("address", "str", "127.0.0.1"),
        metrics_port=met.get("port", "int", 9650, minimum=1),
        domain_policy=domain_policy,
        fence_timeout_s=fence_timeout_s,
        fence_devices=fence_devices,
        source=source,
    )
    if config.address is not None:
        try:
            _decode.address(config.address, "migration.address")
        except _decode.Invalid:
            raise ConfigError(
                f"migration.address: {config.address!r} is not valid (accepted: an IP address or a host name)"
            ) from None
    check_detection_window(config.keepalive_interval_s, config.dead_after, config.zookeeper.timeout_s)
    if config.metrics_port > 65535:
        raise ConfigError(f"metrics.port: {config.metrics_port} is too large (accepted: 1 to 65535)")
    for name, template in (
        ("migration.libvirt_uri_template", config.libvirt_uri_template),
        ("migration.transport_uri_template", config.transport_uri_template),
    ):
        try:
            template.format(node="n", address="a")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"{name}: {template!r} is not a valid template (accepted fields: {{node}}, {{address}}; {exc})"
            ) from None
    for section in (lv, mig, iv, mem, log, met):
        section.reject_unknown()
    top.reject_unknown()
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate the YAML file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    return parse_config(data, str(path))
