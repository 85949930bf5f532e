"""pvc.cluster node daemon: registers a hypervisor in ZooKeeper, reconciles its VMs and migrates them."""
