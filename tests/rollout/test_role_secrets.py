"""No secret reaches the output of a run with --diff: every role of the collection rendered on a lab
host with every secret option set (and changed, so that a diff would show both values), and the
output of both runs searched for them.

What is a secret comes from the roles' own argument specs: an option with ``no_log: true`` is one
(its value), and SECRET_FILES names the options that point at a controller file whose content is one
(a private key the role copies). An option whose name says secret (SECRET_NAME) must be one of the
two, or be listed in NOT_SECRET with the reason, so that a new secret option cannot go unchecked."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import yaml

from tests.lab.lab import REPO_ROOT

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

PLAYBOOK = Path(__file__).resolve().parent / "playbooks" / "secrets_diff.yml"
ROLES = REPO_ROOT / "roles"
SECRET_NAME = re.compile(r"(password|passphrase|secret|token|_key)$")
# controller files whose content is a secret (the role copies them to the node)
SECRET_FILES = {"libvirt_tls_server_key", "libvirt_tls_client_key"}
# controller files holding a private key that the role reads (in a no_log task) into a key store it
# installs: option -> (the option of the CA certificate, the option of the certificate). They need a
# real key: the test makes one, and its first line of base64 is the marker.
KEY_STORE_FILES = {"zookeeper_tls_key": ("zookeeper_tls_ca_cert", "zookeeper_tls_cert")}
# names that look secret and are not: option -> why
NOT_SECRET = {
    "node_daemon_zookeeper_tls_key": "a path on the node; the role neither reads nor copies the key",
}
# controller files the roles need beside the secret ones (certificates: public)
PUBLIC_FILES = {"libvirt_tls_ca_cert", "libvirt_tls_server_cert", "libvirt_tls_client_cert"}
# where the playbook's roles write what holds each secret, to check it was really rendered
RENDERED = {
    "node_daemon_zookeeper_password": "/etc/pvc/node-daemon-secrets.yaml",
    "node_daemon_zookeeper_node_password": "/etc/pvc/node-daemon-secrets.yaml",
    "node_daemon_zookeeper_previous_password": "/etc/pvc/node-daemon-secrets.yaml",
    "node_daemon_zookeeper_previous_node_password": "/etc/pvc/node-daemon-secrets.yaml",
    "node_daemon_fence_password": "/etc/pvc/node-daemon-secrets.yaml",
    "libvirt_sasl_password": "/etc/libvirt-secrets-sasl/auth.conf",
    "libvirt_tls_server_key": "/etc/pki-secrets-tls/libvirt/private/serverkey.pem",
    "libvirt_tls_client_key": "/etc/pki-secrets-tls/libvirt/private/clientkey.pem",
    "zookeeper_tls_keystore_password": "/etc/zookeeper/secrets/tls/keystore.pass",
}
# where the key of each KEY_STORE_FILES option ends up (a PKCS#12 key store, with the password above)
KEY_STORES = {"zookeeper_tls_key": ("/etc/zookeeper/secrets/tls/keystore.p12", "zookeeper_tls_keystore_password")}
# settings the secrets need to be used at all
# (a secured daemon needs its three identities: the operator's is a digest id, not a secret)
_NODE_DAEMON_AUTH = {
    "node_daemon_zookeeper_username": "pvc",
    "node_daemon_insecure": False,
    "node_daemon_zookeeper_operator_digest": "operator:xA4hvVgXoKlTR45WxaPaWB6IutA=",
}
ENABLERS = {
    "node_daemon_zookeeper_password": _NODE_DAEMON_AUTH,
    "node_daemon_zookeeper_node_password": _NODE_DAEMON_AUTH,
    "node_daemon_zookeeper_previous_password": _NODE_DAEMON_AUTH,
    "node_daemon_zookeeper_previous_node_password": _NODE_DAEMON_AUTH,
    "node_daemon_fence_password": {
        "node_daemon_fence": {"method": "ipmi", "address": "10.77.0.250", "username": "admin"}
    },
}


def role_options() -> dict[str, dict[str, dict]]:
    """role -> option -> its argument spec (every entry point)."""
    found = {}
    for spec_file in sorted(ROLES.glob("*/meta/argument_specs.yml")):
        specs = yaml.safe_load(spec_file.read_text())["argument_specs"]
        options = {}
        for entry in specs.values():
            options.update(entry.get("options", {}))
        found[spec_file.parent.parent.name] = options
    return found


def secret_options() -> tuple[set[str], set[str]]:
    """(options whose value is a secret, options naming a file whose content is one)."""
    values, files = set(), set()
    for options in role_options().values():
        for name, spec in options.items():
            if spec.get("no_log"):
                values.add(name)
            elif name in SECRET_FILES:
                files.add(name)
    return values, files


def test_every_option_named_like_a_secret_is_treated_as_one():
    unclassified = []
    for role, options in role_options().items():
        for name, spec in options.items():
            if (
                SECRET_NAME.search(name)
                and not spec.get("no_log")
                and name not in SECRET_FILES | KEY_STORE_FILES.keys() | NOT_SECRET.keys()
            ):
                unclassified.append(f"{role}: {name}")
    assert not unclassified, (
        "options that look like secrets: mark them no_log: true in meta/argument_specs.yml (a value), add them to "
        f"SECRET_FILES (a file whose content is secret) or to NOT_SECRET with the reason: {unclassified}"
    )
    assert set(RENDERED) == set().union(*secret_options()), "RENDERED must say where each secret ends up"
    assert set(KEY_STORES) == set(KEY_STORE_FILES), "KEY_STORES must say where each key store file ends up"


def _secrets_vars(tmp_path: Path, round_: str, host) -> tuple[Path, list[str]]:
    """An extra-vars file setting every secret to a fresh marker; the markers."""
    from tests.support.tls import make_tls_material

    values, files = secret_options()
    markers, extra = [], {"secrets_host": host.name, "secrets_ca_dir": str(tmp_path / round_ / "zookeeper-ca")}
    for name in sorted(values):
        marker = f"S3CRET-{round_}-{name}-{uuid.uuid4().hex[:8]}"
        markers.append(marker)
        extra[name] = marker
        extra.update(ENABLERS.get(name, {}))
    directory = tmp_path / round_
    directory.mkdir()
    for name in sorted(PUBLIC_FILES):  # the role only copies them: any content will do
        path = directory / f"{name}.pem"
        path.write_text("-----BEGIN CERTIFICATE-----\npublic\n-----END CERTIFICATE-----\n")
        extra[name] = str(path)
    extra["libvirt_tls_allowed_dn_list"] = ["*"]  # needed with the operator's own certificates
    extra["secrets_ca_dir"] = str(tmp_path / "cluster-ca")  # the cluster_ca role's, on the controller
    for name in sorted(files):
        marker = f"S3CRET-{round_}-{name}-{uuid.uuid4().hex[:8]}"
        markers.append(marker)
        path = directory / f"{name}.pem"
        path.write_text(f"-----BEGIN PRIVATE KEY-----\n{marker}\n-----END PRIVATE KEY-----\n")
        extra[name] = str(path)
    for name, (ca_option, cert_option) in sorted(KEY_STORE_FILES.items()):
        material = make_tls_material(directory / name, names=(host.name,), ips=(host.address,))
        markers.append(material.client_key.read_text().splitlines()[1])
        extra.update(
            {name: str(material.client_key), ca_option: str(material.ca_cert), cert_option: str(material.client_cert)}
        )
    path = directory / "secrets.yml"
    path.write_text(yaml.safe_dump(extra))
    return path, markers


def test_no_secret_appears_in_a_diff_run_of_any_role(cluster, tmp_path):
    host = cluster.lab.host(1)
    view = cluster.views.view(host)
    values, files = secret_options()
    assert values and files
    runs, all_markers = [], []
    for round_ in ("first", "rotated"):
        extra, markers = _secrets_vars(tmp_path, round_, host)
        all_markers += markers
        run = cluster.playbook(PLAYBOOK, "--diff", "-v", "--extra-vars", f"@{extra}", json_output=False)
        assert run.returncode == 0, run.failures()
        runs.append(run)
        # the secrets were really rendered, so their absence from the output means something
        for name, path in RENDERED.items():
            marker = next(m for m in markers if f"-{name}-" in m)
            assert marker in (view.read_text(path) or ""), f"{name} was not rendered into {path}"
        for name, (store, password_option) in KEY_STORES.items():
            password = next(m for m in markers if f"-{password_option}-" in m)
            given = yaml.safe_load(extra.read_text())[KEY_STORE_FILES[name][1]]
            fingerprint = view.run(["openssl", "x509", "-in", given, "-noout", "-fingerprint"]).stdout
            held = view.run(
                f"openssl pkcs12 -in {store} -passin env:P -nokeys -clcerts | openssl x509 -noout -fingerprint",
                env={"P": password, "PATH": "/usr/bin:/bin"},
            )
            assert held.stdout == fingerprint, f"{name}: {store} does not hold the given key's certificate"
    output = "\n".join((r.proc.stdout or "") + (r.proc.stderr or "") for r in runs)
    # --diff took effect: the files without secrets show their content
    assert "+++ after" in output and "server.1=" in output, output[-3000:]
    for role in role_options():
        assert f"[pvc.cluster.{role} : " in output, f"role {role} did not run"
    # the keys the cluster_ca role made on the controller (the CA's and the host's)
    for key in (
        tmp_path / "cluster-ca" / "ca-key.pem",
        tmp_path / "cluster-ca" / "issued" / f"{host.name}-secrets.key",
    ):
        body = "".join(key.read_text().splitlines()[1:-1])
        all_markers += [body[i : i + 40] for i in range(0, len(body) - 40, 40)]
    leaked = [m for m in all_markers if m in output]
    assert not leaked, f"secrets in the output of a --diff run: {leaked}"
