#!/usr/bin/env bash
# Runs `ansible-test sanity`, `units` or `integration` on the collection; further arguments go to
# ansible-test (e.g. `ansible-test.sh sanity --test validate-modules`, `ansible-test.sh integration vm`).
# ansible-test needs the collection at .../ansible_collections/pvc/cluster, so the collection's own
# files (not the daemon, the lab or the pytest suites: galaxy.yml build_ignore) are copied into a
# temporary tree, made a git repository (ansible-test lists files through git), and tested there.
# `integration` first starts a live cluster (ZooKeeper + 3 node daemons on libvirt's test driver,
# tests/support/integration_cluster.py), which writes tests/integration/integration_config.yml
# (pvc_zk_hosts, pvc_zk_root...) into that tree, runs the targets against it, and stops it.
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
venv="$repo/.venv"
tree=$(mktemp -d /tmp/pvc-ansible-test.XXXXXX)
trap 'rm -rf "$tree"' EXIT
dest="$tree/ansible_collections/pvc/cluster"
mkdir -p "$dest"

collection_paths=(galaxy.yml README.md meta plugins roles playbooks docs tests/config.yml tests/unit tests/integration tests/sanity)
for p in "${collection_paths[@]}"; do
  [ -e "$repo/$p" ] || continue
  mkdir -p "$dest/$(dirname "$p")"
  cp -a "$repo/$p" "$dest/$p"
done
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
printf 'tests/output/\n__pycache__/\n' >"$dest/.gitignore"
git -C "$dest" init -q
git -C "$dest" add -A
git -C "$dest" -c user.email=ci@pvc.cluster -c user.name=ci commit -qm "ansible-test tree"

export PATH="$venv/bin:$PATH"
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
    if [ -z "$(find tests/unit -name 'test_*.py' 2>/dev/null)" ]; then
      echo "ansible-test units: no unit tests in the collection yet"; exit 0
    fi
    ansible-test units --venv --python 3.11 --requirements --color no "$@" ;;
  integration)
    # --local: the modules and the inventory plugin run with .venv's Python, which has kazoo and lxml
    # pinned by pyproject.toml. The cluster helper runs from the repository (it imports tests.*).
    cd "$repo"
    "$venv/bin/python" -m tests.support.integration_cluster --workdir "$tree/cluster" \
      --config "$dest/tests/integration/integration_config.yml" --cwd "$dest" -- \
      ansible-test integration --local --python 3.11 --color no "$@" ;;
  *) echo "unknown suite: $suite" >&2; exit 2 ;;
esac
