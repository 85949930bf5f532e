"""A live cluster for the collection's integration tests: one ZooKeeper and N node daemons.

    python -m tests.support.integration_cluster --workdir DIR --config FILE [--nodes 3] -- COMMAND...

starts a standalone ZooKeeper on 127.0.0.1 and N daemons (``node1``...; real processes driving
libvirt's test driver, tests/daemon/harness.py), makes every node ready, writes FILE (the
ansible-test ``integration_config.yml``: ``pvc_zk_hosts``, ``pvc_zk_root``, ``pvc_nodes``...), runs
COMMAND, then stops the daemons and ZooKeeper (by PID) and exits with COMMAND's status. Without a
COMMAND it holds the cluster until SIGTERM or SIGINT (for working on the tests by hand).

The cluster is secured as the roles deploy one (docs/security.md): ZooKeeper enforces digest
authentication (enforce.auth) and serves its clients over TLS (a throw-away CA, the server's
certificate naming 127.0.0.1; no client certificates, as the zookeeper role's default), the daemons
connect as the nodes and each node's own identity, and every znode carries its ACL. The targets get
the operator's credentials and the CA file from FILE (``pvc_zk_username``, ``pvc_zk_password``,
``pvc_zk_tls_ca``); ``pvc_zk_hosts`` is the TLS port.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

from tests.daemon.harness import TestCluster
from tests.support.identities import OPERATOR_PASSWORD, OPERATOR_USER
from tests.support.tls import make_tls_material
from tests.support.zookeeper import ZooKeeperServer, free_port

NODE_MEMORY_MIB = 8192


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path, help="integration_config.yml to write")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--cwd", type=Path, default=None, help="directory to run COMMAND in")
    args = parser.parse_args(argv)

    stop = threading.Event()
    _stop_on_signals(stop)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tls = make_tls_material(args.workdir / "tls")
    zookeeper = ZooKeeperServer(
        workdir=args.workdir / "zookeeper",
        client_port=free_port(),  # plaintext, for the four-letter words only: enforce.auth closes sessions on it too
        secure_client_port=free_port(),
        tls=tls.zookeeper_files(),
        tls_client_auth="none",
        enforce_auth=True,
    )
    hosts = f"{zookeeper.client_address}:{zookeeper.secure_client_port}"
    cluster = None
    try:
        zookeeper.start()
        root = f"/pvc-it-{uuid.uuid4().hex[:8]}"
        # secured: the test's store is the operator (it creates the schema), each daemon the nodes
        cluster = TestCluster(hosts, root, args.workdir / "daemons", keepalive_s=0.5, zk_tls={"ca": str(tls.ca_cert)})
        nodes = [f"node{i}" for i in range(1, args.nodes + 1)]
        for node in nodes:
            cluster.add(node, memory_mib=NODE_MEMORY_MIB)
        for node in nodes:
            cluster.wait_node_state(node, "run")
            cluster.set_domain_state(node, "unflush")  # new nodes start flushed
        for node in nodes:
            cluster.wait_domain_state(node, "ready")
        config = {
            "pvc_zk_hosts": hosts,
            "pvc_zk_root": root,
            "pvc_zk_username": OPERATOR_USER,
            "pvc_zk_password": OPERATOR_PASSWORD,
            "pvc_zk_tls_ca": str(tls.ca_cert),
            "pvc_nodes": nodes,
            "pvc_node_memory_mib": NODE_MEMORY_MIB,
            "pvc_daemon_logs": str(args.workdir / "daemons"),
        }
        args.config.parent.mkdir(parents=True, exist_ok=True)
        args.config.write_text(yaml.safe_dump(config, sort_keys=True))
        print(
            f"integration cluster: ZooKeeper {hosts}{root} (TLS, authentication), nodes {', '.join(nodes)} ready "
            f"in {time.monotonic() - started:.1f} s",
            flush=True,
        )
        if not command:
            while not stop.wait(3600):
                pass
            return 0
        env = dict(os.environ, PVC_IT_ZK_ROOT=root)  # zk_cluster_root refuses to touch this root
        process = subprocess.Popen(command, cwd=args.cwd, env=env)
        threading.Thread(target=lambda: (process.wait(), stop.set()), name="command", daemon=True).start()
        stop.wait()
        if process.poll() is None:  # we were signalled: end the command first
            process.terminate()
            process.wait(timeout=60)
        if process.returncode != 0:
            print(
                f"integration cluster: the command failed ({process.returncode}); the end of each daemon's log:",
                flush=True,
            )
            for node, daemon in cluster.daemons.items():
                print(f"--- {node} ({daemon.log_path}) ---\n{daemon.log()[-4000:]}", flush=True)
        return process.returncode
    finally:
        if cluster is not None:
            cluster.close()
        zookeeper.stop()


if __name__ == "__main__":
    sys.exit(main())
