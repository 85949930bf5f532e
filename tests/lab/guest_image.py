"""The lab's real Linux guest, built from Debian packages only, and cached.

    python -m tests.lab.guest_image [--cache DIR]     # build (or find) it; prints the kernel and initrd

* the kernel: ``linux-image-cloud-amd64``'s dependency (``linux-image-<abi>-cloud-amd64``: the ABI
  number changes with Debian's security updates, so it is resolved each time), fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x``. Its serial console and initrd support
  are built in; the virtio drivers, the ACPI button and evdev are modules, copied into the image
  and loaded at boot (``/etc/modules``, in dependency order: the image has no depmod data);
* the initramfs (``cpio -H newc``, gzip): ``busybox-static`` (fetched the same way), our ``/init``
  (tests/lab/guest/init), busybox ``acpid`` with a handler for the power button
  (tests/lab/guest/power-button) and ``pvc-guest`` (tests/lab/guest/pvc-guest.c, compiled
  statically with the machine's gcc): the guest's PID 1, which ticks, dirties memory and powers
  off cleanly (its header says how).

It boots under QEMU TCG to ``pvc-guest: ready`` on its console in about 3 s.

The cache (default /tmp/pvc-cluster/guest) holds one directory per recipe: the name is a hash of
the package versions and of every input file, so a change of any of them builds a new image and a
second call with nothing changed only asks apt-cache for two versions (a fraction of a second).
Builds are serialised by an flock on the cache, made in a temporary directory and renamed into
place, so concurrent callers never see half an image.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GUEST_SOURCES = Path(__file__).resolve().parent / "guest"
DEFAULT_CACHE = Path("/tmp/pvc-cluster/guest")
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# insmod order: each module after the ones it needs
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_balloon",
    "virtio_console",
    "virtio_blk",
    "button",
    "evdev",
)
BUSYBOX_APPLETS = ("sh", "mount", "mkdir", "cat", "echo", "insmod", "acpid", "poweroff", "reboot", "sync")
# What a cached build holds (the manifest is written last: its presence marks a complete build).
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"


class GuestBuildError(RuntimeError):
    """The guest image cannot be built; the message says which step failed and why."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: its kernel and initramfs, and what they were made from."""

    kernel: Path
    initrd: Path
    kernel_release: str  # e.g. 6.1.0-57-cloud-amd64
    packages: dict  # Debian package -> version
    key: str  # the cache directory's name

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        return cls(
            kernel=directory / KERNEL_FILE,
            initrd=directory / INITRD_FILE,
            kernel_release=manifest["kernel_release"],
            packages=manifest["packages"],
            key=directory.name,
        )


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{what}: {' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc


APT_LISTS = Path("/var/lib/apt/lists")


def resolve_packages(cache: Path | None = None) -> dict[str, str]:
    """The Debian packages of the guest and their candidate versions, from apt's local lists (one
    apt-cache call; an `apt-get update` first only when the lists do not know the packages).
    With ``cache``, the answer is kept there and reused while apt's lists are unchanged (an
    apt-cache call takes over half a second)."""
    remembered = cache / "packages.json" if cache else None
    try:
        lists = APT_LISTS.stat().st_mtime_ns
    except OSError:
        lists = None
    if remembered is not None and lists is not None:
        try:
            known = json.loads(remembered.read_text())
            if known.get("lists_mtime_ns") == lists:
                return known["packages"]
        except (OSError, ValueError, KeyError):
            pass
    packages = _ask_apt()
    if remembered is not None and lists is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = remembered.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"lists_mtime_ns": APT_LISTS.stat().st_mtime_ns, "packages": packages}))
        os.replace(tmp, remembered)
    return packages


def _ask_apt() -> dict[str, str]:
    for attempt in (1, 2):
        proc = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", KERNEL_METAPACKAGE, BUSYBOX_PACKAGE],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            break
        if attempt == 2:
            raise GuestBuildError(
                f"apt-cache does not know {KERNEL_METAPACKAGE} and {BUSYBOX_PACKAGE} even after "
                f"apt-get update: {proc.stderr.strip()}"
            )
        _run(["apt-get", "update", "-qq"], "updating apt's package lists")
    packages: dict[str, str] = {}
    kernel = None
    for stanza in proc.stdout.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(": ")
            if sep and not line.startswith(" "):
                fields[key] = value.strip()
        if fields.get("Package") == BUSYBOX_PACKAGE:
            packages[BUSYBOX_PACKAGE] = fields["Version"]
        elif fields.get("Package") == KERNEL_METAPACKAGE:
            # Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)
            depends = [d.strip() for d in fields.get("Depends", "").split(",")]
            kernel = next((d for d in depends if d.startswith("linux-image-") and "cloud-amd64" in d), None)
            packages[KERNEL_METAPACKAGE] = fields["Version"]
    if kernel is None or BUSYBOX_PACKAGE not in packages:
        raise GuestBuildError(
            f"cannot tell the kernel package from apt-cache show {KERNEL_METAPACKAGE}: {proc.stdout[:500]}"
        )
    name, _, version = kernel.partition(" ")
    packages[name] = version.strip("(=) ") or packages[KERNEL_METAPACKAGE]
    return packages


def recipe_key(packages: dict[str, str]) -> str:
    """A hash of everything the image is made from: the package versions and every input file."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps({"packages": packages, "modules": MODULES, "applets": BUSYBOX_APPLETS}, sort_keys=True).encode()
    )
    for path in sorted(GUEST_SOURCES.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def build(cache: str | Path = DEFAULT_CACHE, log=None) -> GuestImage:
    """The guest image for today's packages and sources: from the cache, or built into it."""
    cache = Path(cache)
    packages = resolve_packages(cache)
    key = recipe_key(packages)
    final = cache / key
    if (final / MANIFEST_FILE).exists():
        _used(final)
        return GuestImage.load(final)
    with _locked(cache):
        if (final / MANIFEST_FILE).exists():  # built by another process meanwhile
            return GuestImage.load(final)
        (log or (lambda _m: None))(f"building the lab's guest image {key} from {', '.join(sorted(packages))}")
        with tempfile.TemporaryDirectory(prefix=f".build-{key}-", dir=cache) as tmp:
            out = _build_into(Path(tmp), packages)
            os.rename(out, final)
        # Other recipes not used for a day: gone. One used lately may be another worktree's
        # (its guest sources differ), which would only build it again.
        for old in cache.iterdir():
            if old.is_dir() and old.name != key and not old.name.startswith(".") and _unused_since(old) > KEEP_UNUSED_S:
                shutil.rmtree(old, ignore_errors=True)
    return GuestImage.load(final)


KEEP_UNUSED_S = 86400


def _used(directory: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(directory / MANIFEST_FILE)


def _unused_since(directory: Path) -> float:
    try:
        return time.time() - (directory / MANIFEST_FILE).stat().st_mtime
    except OSError:
        return float("inf")  # no manifest: not a complete build


def _build_into(tmp: Path, packages: dict[str, str]) -> Path:
    debs = tmp / "debs"
    debs.mkdir()
    kernel_package = next(p for p in packages if p.startswith("linux-image-") and p != KERNEL_METAPACKAGE)
    wanted = [f"{kernel_package}={packages[kernel_package]}", f"{BUSYBOX_PACKAGE}={packages[BUSYBOX_PACKAGE]}"]
    # apt-get download as root warns that it downloads unsandboxed (the _apt user cannot write
    # here); harmless.
    _run(["apt-get", "download", "-qq", *wanted], "downloading the guest's packages", cwd=debs)
    unpacked = tmp / "unpacked"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
    release = kernel_package.removeprefix("linux-image-")
    vmlinuz = unpacked / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        raise GuestBuildError(f"{kernel_package} has no boot/vmlinuz-{release}")

    root = tmp / "root"
    for sub in ("bin", "dev", "proc", "sys", "run", "tmp", "etc/acpi/PWRF", "lib/modules"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(unpacked / "bin" / "busybox", root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    module_dir = unpacked / "lib" / "modules" / release / "kernel"
    found = {p.stem: p for p in module_dir.rglob("*.ko")}
    missing = [m for m in MODULES if m not in found]
    if missing:
        raise GuestBuildError(f"{kernel_package} lacks the modules {', '.join(missing)} (as plain .ko files)")
    for module in MODULES:
        shutil.copy2(found[module], root / "lib" / "modules" / f"{module}.ko")
    (root / "etc" / "modules").write_text("\n".join(MODULES) + "\n")
    _install(GUEST_SOURCES / "init", root / "init")
    # busybox acpid's default action for the power button (event PWRF) is the file PWRF/00000080
    # in its configuration directory
    _install(GUEST_SOURCES / "power-button", root / "etc" / "acpi" / "PWRF" / "00000080")
    _run(
        [
            "gcc",
            "-O2",
            "-static",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(root / "bin" / "pvc-guest"),
            str(GUEST_SOURCES / "pvc-guest.c"),
        ],
        "compiling pvc-guest (needs gcc and libc6-dev)",
    )

    out = tmp / "out"
    out.mkdir()
    shutil.copy2(vmlinuz, out / KERNEL_FILE)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    # text=False: the archive is binary; the file list goes in on stdin, one path a line
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=root,
        input=("\n".join(["."] + files) + "\n").encode(),
        capture_output=True,
    )
    if cpio.returncode != 0:
        raise GuestBuildError(f"packing the initramfs with cpio failed: {cpio.stderr.decode(errors='replace')}")
    with gzip.open(out / INITRD_FILE, "wb", compresslevel=6) as handle:
        handle.write(cpio.stdout)
    (out / MANIFEST_FILE).write_text(
        json.dumps({"kernel_release": release, "packages": packages, "modules": list(MODULES)}, indent=2) + "\n"
    )
    return out


def _install(source: Path, dest: Path) -> None:
    shutil.copy2(source, dest)
    dest.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.guest_image", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = parser.parse_args(argv)
    try:
        image = build(args.cache, log=print)
    except GuestBuildError as exc:
        print(f"guest image: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel} ({image.kernel_release})\ninitrd {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
