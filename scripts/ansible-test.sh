#!/usr/bin/env bash
# Runs `ansible-test sanity`, `units` or `integration` on the collection as users get it: built with
# `ansible-galaxy collection build` (galaxy.yml's build_ignore leaves the daemon, the lab and the
# pytest suites out), installed from that tarball into a fresh collections path, and tested there.
# Further arguments go to ansible-test (e.g. `ansible-test.sh sanity --test validate-modules`,
# `ansible-test.sh integration vm`).
# The artifact is checked first: every file it holds must be under one of SHIPPED below, so that a
# new development file is left out (build_ignore) rather than shipped unnoticed.
# `integration` first starts a live cluster (ZooKeeper + 3 node daemons on libvirt's test driver,
# tests/support/integration_cluster.py), which writes tests/integration/integration_config.yml
# (pvc_zk_hosts, pvc_zk_root...) into the installed copy, runs the targets against it, and stops it.
# PVC_ANSIBLE_VENV names the virtual environment whose ansible-core builds and tests (default: the
# repository's .venv; `make test-oldest-ansible` uses one with the oldest ansible-core we support).
set -euo pipefail
suite=${1:?usage: ansible-test.sh sanity|units|integration [ansible-test arguments]}
shift
# One ansible-test at a time on this machine: its venv cache in ~/.ansible/test is shared, and two
# runs that build the same venv at once break each other.
if [ -z "${PVC_ANSIBLE_TEST_LOCKED:-}" ]; then
  export PVC_ANSIBLE_TEST_LOCKED=1
  exec flock /tmp/pvc-ansible-test.lock bash "$0" "$suite" "$@"
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${PVC_ANSIBLE_VENV:-$repo/.venv}
tree=$(mktemp -d /tmp/pvc-ansible-test.XXXXXX)
trap 'rm -rf "$tree"' EXIT
export PATH="$venv/bin:$PATH"
export ANSIBLE_COLLECTIONS_PATH="$tree/collections"

# What a built collection may contain (paths relative to its root; a directory ends in /).
SHIPPED=(MANIFEST.json FILES.json README.md LICENSE CHANGELOG.rst requirements.txt bindep.txt
         meta/ plugins/ roles/ playbooks/ docs/ changelogs/ tests/config.yml tests/unit/ tests/integration/ tests/sanity/)

ansible-galaxy collection build --output-path "$tree/dist" "$repo" >/dev/null
tarball=$(echo "$tree"/dist/pvc-cluster-*.tar.gz)
ansible-galaxy collection install --offline --no-deps -p "$tree/collections" "$tarball" >/dev/null
dest="$tree/collections/ansible_collections/pvc/cluster"
"$venv/bin/python" - "$dest" "${SHIPPED[@]}" <<'PY'
import json, sys
dest, shipped = sys.argv[1], sys.argv[2:]
files = [f["name"] for f in json.load(open(f"{dest}/FILES.json"))["files"] if f["ftype"] == "file"]
unexpected = [f for f in files if not any(f == s or (s.endswith("/") and f.startswith(s)) for s in shipped)]
if unexpected:
    sys.exit("the built collection holds files it must not ship (add them to build_ignore in galaxy.yml, or to "
             "SHIPPED in scripts/ansible-test.sh if users need them):\n  " + "\n  ".join(sorted(unexpected)))
print(f"ansible-test.sh: built and installed {len(files)} files of pvc.cluster from {sys.argv[1]}")
PY

# --venv keeps ansible-test's own tool versions out of our pinned .venv. It bootstraps each venv with
# a get-pip script it would download from a host this machine cannot reach; this stand-in uses the
# ensurepip that ships with Python instead (in a subprocess, so /etc/pip.conf keeps applying).
pip_version=$("$venv/bin/python" -c 'from ansible_test._internal.python_requirements import PIP_VERSION as v; print(v)' 2>/dev/null \
  || "$venv/bin/python" -c 'import re,ansible_test,os;s=open(os.path.join(os.path.dirname(ansible_test.__file__),"_internal","python_requirements.py")).read();print(re.search(r"pip=.([0-9.]+).",s).group(1))')
stub="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
mkdir -p "$(dirname "$stub")"
cat >"$stub" <<'PY'
import subprocess, sys
args = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]
subprocess.check_call([sys.executable, '-m', 'ensurepip', '--upgrade'])
subprocess.check_call([sys.executable, '-m', 'pip', 'install'] + args)
PY
cd "$dest"
case "$suite" in
  sanity)
    ansible-test sanity --venv --python 3.11 --requirements --color no "$@" ;;
  units)
    ansible-test units --venv --python 3.11 --requirements --color no "$@" ;;
  integration)
    # --local: the modules and the inventory plugin run with the venv's Python, which has kazoo and
    # lxml. The cluster helper runs from the repository (it imports tests.*) with the repository's venv.
    cd "$repo"
    "$repo/.venv/bin/python" -m tests.support.integration_cluster --workdir "$tree/cluster" \
      --config "$dest/tests/integration/integration_config.yml" --cwd "$dest" -- \
      ansible-test integration --local --python 3.11 --color no "$@" ;;
  *) echo "unknown suite: $suite" >&2; exit 2 ;;
esac
