"""Parent process of a lab libvirtd: `python reaper.py /usr/sbin/libvirtd ARGS...`.

libvirt daemonizes QEMU (double fork), so a guest's QEMU is an orphan. When a guest stops, libvirt
polls kill(pid, 0) every 200 ms until the process is gone, and a zombie still counts. On this
machine PID 1 reaps orphans ~1 s late, which made every destroy/shutdown take ~1.5 s. This process
is a child subreaper: orphans below it are re-parented here and reaped at once. It forwards
SIGTERM/SIGINT/SIGHUP to libvirtd and exits with libvirtd's status once libvirtd has exited.
"""

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    child = os.fork()
    if child == 0:
        os.execv(sys.argv[1], sys.argv[1:])

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.wait()  # blocks; EINTR from a forwarded signal is retried (PEP 475)
        except ChildProcessError:
            return 0
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # killed by signal N: 128+N, like a shell


if __name__ == "__main__":
    sys.exit(main())
