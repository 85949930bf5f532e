"""python -m tests.lab up --hosts N --workdir DIR | down --workdir DIR | status --workdir DIR |
power --workdir DIR --host K off|on (a lab host's power, as its simulated BMC's chassis control does it)"""

from __future__ import annotations

import argparse
import sys

from .lab import Lab, LabError

DEFAULT_WORKDIR = "/tmp/pvc-cluster/lab"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="(re)start the lab, cleaning up whatever a previous run left")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--workdir", default=DEFAULT_WORKDIR)
    up.add_argument("--prefix", default="lab", help="namespace prefix (default: lab)")
    up.add_argument("--vm-bridge", default=None, help="also create this bridge in every host namespace, for guest NICs")
    up.add_argument("--caps-cache", default=None, help="QEMU capabilities cache (default: WORKDIR/../caps-cache)")
    up.add_argument("--keep-on-failure", action="store_true", help="leave a failed lab up for inspection")
    for name, text in (
        ("down", "end every process the lab started and delete its namespaces"),
        ("status", "print one line per host"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    power = sub.add_parser("power", help="power a lab host off (kill its processes) or on (start its libvirtd)")
    power.add_argument("--workdir", default=DEFAULT_WORKDIR)
    power.add_argument("--host", type=int, required=True)
    power.add_argument("action", choices=("off", "on"))
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            lab = Lab(
                args.workdir, args.hosts, prefix=args.prefix, caps_cache=args.caps_cache, vm_bridge=args.vm_bridge
            )
            lab.up(keep_on_failure=args.keep_on_failure)
            print(lab.status_table(), flush=True)
        elif args.command == "power":
            lab = Lab.load(args.workdir)
            if not lab.state_file.exists() or not 1 <= args.host <= len(lab.hosts):
                print(f"no lab host {args.host} recorded in {lab.state_file}", file=sys.stderr)
                return 1
            host = lab.host(args.host)
            if args.action == "off":
                print(f"power off {host.name}: killed {lab.power_off(host)}", flush=True)
            else:
                lab.power_on(host)
                print(f"power on {host.name}: libvirtd started", flush=True)
        elif args.command == "down":
            lab = Lab.load(args.workdir)
            if not lab.state_file.exists():
                # nothing was brought up here (up writes lab.json before it creates anything), and
                # a default Lab would look at the namespaces of the default prefix: another lab's
                print(f"no lab recorded in {lab.state_file}: nothing to end")
                return 0
            lab.down()
        else:
            lab = Lab.load(args.workdir)
            print(lab.status_table())
            return 0 if lab.healthy() else 1
    except LabError as exc:
        print(f"lab {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
