"""The Ansible role deploys a Docker host: the runtime setting, and safespawn's OCI runtime registered
in dockerd's daemon.json, idempotently.

The dockerd is the test session's private one (tests/support/dockerd.py), never the machine's:
`safespawn_docker_daemon_json` points at that daemon's own --config-file and the "Reload dockerd"
handler sends SIGHUP to its pid, which is what `systemctl reload docker` does on a real host (check
mode is test_ansible.py's, for the podman host; it is left out here to keep the suite's time). Shown:
- a run merges `runtimes.NAME.path` into daemon.json, keeps every other key, reloads dockerd, and
  dockerd then lists the runtime; safespawn.toml says runtime = "docker";
- a second run changes nothing (and does not reload dockerd);
- the deployed host works end to end: `safespawn doctor` with the deployed config joins a probe
  container to a fresh netns through the registered runtime, and a wrapper request under
  `ip netns exec` is served by systemd alone with a dnsmasq sidecar in Docker that hands out a lease.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from support.netlab import NetnsPair, dhcp_lease

from .test_ansible import Host, ansible_bin, changed_tasks, manager, ok, wheel  # noqa: F401 (fixtures)
from .test_core import dnsmasq_argv

OCI_NAME = "safespawn-role"


@pytest.fixture(scope="module")
def docker_host(manager, ansible_bin, wheel, test_image, dockerd):  # noqa: F811
    h = Host(manager.root / "dockerhost", f"ssd{uuid.uuid4().hex[:8]}", manager, ansible_bin, wheel, test_image)
    daemon_json = dockerd.root / "daemon.json"
    original = daemon_json.read_text()
    # Another key the role must keep, beside the session's own `safespawn` runtime.
    daemon_json.write_text(json.dumps({**json.loads(original), "log-level": "info"}) + "\n")
    extra = {
        "safespawn_runtime": "docker",
        "safespawn_docker": "/usr/bin/docker",
        "safespawn_docker_host": dockerd.host,
        "safespawn_docker_oci_runtime": OCI_NAME,
        "safespawn_docker_daemon_json": str(daemon_json),
        "safespawn_docker_reload_command": ["kill", "-HUP", str(dockerd.proc.pid)],
    }
    h.extra = extra  # type: ignore[attr-defined]
    try:
        yield h
    finally:
        daemon_json.write_text(original)  # the session's daemon as it was, for the tests after this module
        os.kill(dockerd.proc.pid, signal.SIGHUP)
        dockerd.rm_by_label(f"safespawn.channel={h.channel}")
        # The deployed safespawn takes its units down (the role's absent path is test_ansible.py's).
        if (h.venv / "bin" / "safespawn").exists():
            subprocess.run([str(h.venv / "bin" / "safespawn"), "--config", str(h.config_dir / "safespawn.toml"),
                            "uninstall", "--scope", "user"], capture_output=True, timeout=120, check=False,
                           env=h.manager.env)


def play(h: Host, *args: str):
    return h.play(*args, **h.extra)  # type: ignore[attr-defined]


def runtimes(dockerd) -> dict:
    return json.loads(dockerd.docker("info", "--format={{json .Runtimes}}").stdout)


def test_the_role_registers_the_oci_runtime_and_reloads_dockerd(docker_host, dockerd):
    p = play(docker_host)
    ok(p)
    assert {"Write daemon.json with the OCI runtime registered", "Reload dockerd"} <= set(changed_tasks(p))
    daemon = json.loads((dockerd.root / "daemon.json").read_text())
    assert daemon["log-level"] == "info"
    assert daemon["runtimes"][OCI_NAME] == {"path": f"{docker_host.venv}/bin/safespawn-oci-runtime"}
    assert set(daemon) == {"log-level", "runtimes"} and set(daemon["runtimes"]) == {"safespawn", OCI_NAME}
    deadline = time.monotonic() + 20
    while OCI_NAME not in runtimes(dockerd):
        assert time.monotonic() < deadline, "dockerd did not reload daemon.json"
        time.sleep(0.2)
    assert "safespawn" in runtimes(dockerd)  # the entry that was there before is still registered
    text = (docker_host.config_dir / "safespawn.toml").read_text()
    assert 'runtime = "docker"' in text and f'docker_oci_runtime = "{OCI_NAME}"' in text
    assert f'docker_host = "{dockerd.host}"' in text


def test_a_second_run_changes_nothing(docker_host):
    p = play(docker_host)
    assert ok(p)["changed"] == 0, changed_tasks(p)


def test_the_deployed_docker_host_joins_netns_and_serves_a_wrapper_request(docker_host, dockerd):
    cfg = str(docker_host.config_dir / "safespawn.toml")
    d = subprocess.run([str(docker_host.venv / "bin" / "safespawn"), "--config", cfg, "doctor"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert "ok   a dnsmasq container joins a fresh netns through the OCI runtime" in d.stdout, d.stdout
    data = docker_host.data_dir
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o755)
    with NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}") as pair:
        argv = dnsmasq_argv(data, pair)
        env = dict(os.environ, PATH=f"{docker_host.wrappers_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
                   SAFESPAWN_TIMEOUT="60")
        p = subprocess.run(["ip", "netns", "exec", pair.server_ns, "dnsmasq", *argv], capture_output=True,
                           text=True, env=env, timeout=90, check=False)
        assert p.returncode == 0, (p.stdout, p.stderr)
        [c] = dockerd.ps(f"safespawn.channel={docker_host.channel}")
        assert c["State"] == "running"
        got, want = os.stat(f"/proc/{c['Pid']}/ns/net"), os.stat(Path("/run/netns") / pair.server_ns)
        assert (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino)
        assert dhcp_lease(pair.client_ns, pair.client_if, timeout=10)["ip"] == pair.host(50)
        dockerd.rm_by_label(f"safespawn.channel={docker_host.channel}")
