#!/usr/bin/env bash
# Installs everything pvc.cluster's tests, lab and demo need on a Debian 12 machine, as root.
# Idempotent: a second run only checks. Called by `make setup` (and so by `make test` / `make demo`).
set -euo pipefail

APT_PACKAGES=(
  zookeeper                 # the cluster store (started by our scripts, never by systemd)
  libvirt-dev pkg-config    # to build libvirt-python from its sdist
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients   # libvirtd per lab host (NOT libvirt-daemon-system: it pulls systemd)
  qemu-system-x86           # the lab's guests, software emulation (TCG)
  iproute2                  # network namespaces, veth, bridges
  procps                    # sysctl
  sasl2-bin                 # saslpasswd2 / sasldblistusers2: the libvirt role's SASL mode, run in the rollout tests
  python3-libvirt           # Debian's libvirt binding, which the node_daemon role's venv uses (rollout tests)
  logrotate                 # checks the node_daemon role's logrotate rule (rollout tests)
  systemd                   # systemd-analyze verify on the units the roles render; nothing here runs systemd
  shellcheck                # ansible-test sanity lints our shell scripts
  openipmi ipmitool         # simulated BMCs (ipmi_sim) and the IPMI client the node daemon fences with (issue #16)
  cpio gcc libc6-dev        # the lab's real guest: its initramfs, and pvc-guest compiled statically (tests/lab/guest_image.py)
  spin                      # checks the protocols' Promela model (models/ha.pml, make test-model; gcc compiles its verifier)
  ganeti-htools             # Ganeti's hail: bench p compares our selectors with it; tests/common/test_bench_hail.py runs it
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd refuses to start its QEMU driver unless the libvirt-qemu user *and* group exist,
# even when qemu.conf says user=root (the default is resolved before the config is read).
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g kvm -G libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
echo "setup-host: ok"
