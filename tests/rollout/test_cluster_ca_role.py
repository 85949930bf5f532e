"""The cluster_ca role's renewal of the certificates it issues (roles/cluster_ca/README.md,
"Rotating"), run for real by ansible-playbook on the controller (no lab): a second run keeps the
certificate, a renewal (asked for, or one near its expiry) issues a new key and certificate from
the same CA, and after a change of CA every certificate is issued again from the new one, which
the old one no longer verifies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.lab import REPO_ROOT

pytestmark = pytest.mark.timeout(600)

PLAY = """
- name: Issue a certificate from the cluster CA
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Issue it
      ansible.builtin.include_role:
        name: pvc.cluster.cluster_ca
        tasks_from: issue
      vars:
        cluster_ca_issue_name: node1-libvirt
        cluster_ca_issue_common_name: node1
        cluster_ca_issue_dns_names: [node1]
        cluster_ca_issue_ip_addresses: [10.0.0.1]
"""


@pytest.fixture
def run(tmp_path):
    collections = tmp_path / "collections" / "ansible_collections" / "pvc"
    collections.mkdir(parents=True)
    (collections / "cluster").symlink_to(REPO_ROOT)
    playbook = tmp_path / "issue.yml"
    playbook.write_text(PLAY)
    ca_dir = tmp_path / "ca"

    def run_playbook(**extra: object) -> subprocess.CompletedProcess:
        env = dict(
            os.environ,
            ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "collections"),
            ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
            ANSIBLE_NOCOWS="1",
        )
        args = ["-e", f"pvc_cluster_ca_dir={ca_dir}", "-e", f"ansible_python_interpreter={sys.executable}"]
        for key, value in extra.items():
            args += ["-e", f"{key}={value}"]
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "ansible-playbook"),
                "-i",
                "localhost,",
                "-c",
                "local",
                *args,
                str(playbook),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return done

    run_playbook.ca_dir = ca_dir  # type: ignore[attr-defined]
    return run_playbook


def _verifies(ca: Path, cert: Path) -> bool:
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True).returncode == 0


def test_certificates_are_renewed_and_reissued_after_a_change_of_ca(run, tmp_path):
    ca_dir = run.ca_dir
    cert, key, ca = ca_dir / "issued/node1-libvirt.pem", ca_dir / "issued/node1-libvirt.key", ca_dir / "ca.pem"

    run()
    first = (cert.read_bytes(), key.read_bytes())
    assert _verifies(ca, cert)

    run()  # nothing to renew: the same key and certificate
    assert (cert.read_bytes(), key.read_bytes()) == first

    run(pvc_cluster_ca_renew="true")  # asked for: a new key and certificate, from the same CA
    renewed = (cert.read_bytes(), key.read_bytes())
    assert renewed[0] != first[0] and renewed[1] != first[1]
    assert _verifies(ca, cert)

    run(cluster_ca_renew_days=900)  # valid for 825 days: within 900, so issued again
    assert cert.read_bytes() != renewed[0]
    near = cert.read_bytes()
    run()
    assert cert.read_bytes() == near

    # a change of CA: the old CA moved away, the certificates it issued left in issued/
    old_ca = tmp_path / "old-ca.pem"
    os.replace(ca, old_ca)
    os.replace(ca_dir / "ca-key.pem", tmp_path / "old-ca-key.pem")
    run()
    assert ca.read_bytes() != old_ca.read_bytes()
    assert _verifies(ca, cert) and not _verifies(old_ca, cert)
