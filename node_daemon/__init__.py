"""pvc.cluster node daemon: registers a hypervisor in ZooKeeper, reconciles its VMs and migrates them."""

# Importing the logger module first makes every pvc_node_daemon logger a DaemonLogger (ok/system/tick).
from . import log as _log  # noqa: F401
