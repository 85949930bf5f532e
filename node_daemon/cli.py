"""``pvc-node-daemon --config FILE``: load the configuration, set up logging, run the daemon.

Exit status: 0 after a clean shutdown, 1 when the daemon cannot start (libvirt or ZooKeeper
unreachable), 2 for a bad command line or configuration (one line naming the key).
"""

from __future__ import annotations

import argparse
import signal
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pvc-node-daemon", description="pvc.cluster node daemon")
    parser.add_argument("--config", "-c", required=True, help="YAML configuration file")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pvc-node-daemon: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"pvc-node-daemon: {args.config} is valid (node {config.node})")
        return 0

    from .daemon import DaemonError, NodeDaemon
    from .log import setup_logging
    from .sdnotify import notify

    log = setup_logging(debug=config.debug, stdout=config.log_stdout, file=config.log_file, colours=config.log_colours)
    daemon = NodeDaemon(config)
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    # The unit's reload (logrotate's postrotate) sends SIGHUP, which would end the process: the log
    # file reopens itself at its next line after a rotation (log.LogFileHandler), so it is ignored.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        daemon.check()
        daemon.prepare()
        daemon.run()
    except DaemonError as exc:
        log.error("cannot start: %s", exc)
        notify(f"STATUS=cannot start: {exc}")
        daemon.shutdown(timeout_s=5)
        return 1
    # run() returns once the daemon has loaded its state: under systemd (Type=notify) starting
    # or restarting the unit returns now, so whatever runs next (the rollout) sees it working.
    notify("READY=1", f"STATUS=node {config.node} running")
    daemon.wait()
    notify("STOPPING=1", f"STATUS=node {config.node} shutting down")
    daemon.shutdown(timeout_s=config.shutdown_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
