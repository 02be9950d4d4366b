"""`safespawn adopt` on a kolla-ansible host that runs Docker: real private dockerd, real netns, real DHCP.

The legacy sidecars are made the way kolla's wrappers make them with docker.sock: `docker run --rm
--privileged (see PRIVILEGED) --pid host --net host -v /run/netns:/run/netns:shared IMAGE ip netns exec NS dnsmasq -k
...`, named `<agent>_<proc>_<NS>`. (Docker's CLI entering the netns would not help: dockerd creates
the container, so the wrapper enters it inside the container.) adopt reads them through the docker
CLI at the config's DOCKER_HOST, and the confined replacement is started by the Docker runtime.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
from support import netlab
from support.netlab import NetnsPair

from .test_core import dnsmasq_argv


@pytest.fixture
def broker_runtime() -> str:
    return "docker"


# kolla's `--privileged`, as far as this test bed allows: Docker 20.10's runc fails a --privileged
# container with "unable to apply caps" because the machine's bounding set lacks CAP_SYS_RESOURCE
# (podman drops what the bounding set lacks). So: every capability Docker knows but that one, no
# seccomp or AppArmor profile. adopt does not look at the container's privileges, only its process.
PRIVILEGED = ["--cap-add=ALL", "--cap-drop=SYS_RESOURCE", "--security-opt=seccomp=unconfined",
              "--security-opt=apparmor=unconfined"]


def kolla_docker_legacy(dockerd, name: str, ns: str, image: str, data, argv: list[str], label: str) -> str:
    p = dockerd.docker("run", "--detach", "--rm", *PRIVILEGED, "--pid", "host", "--net", "host",
                       f"--label={label}", "--name", name, "-v", f"{data}:{data}",
                       "-v", "/run/netns:/run/netns:shared", image, "ip", "netns", "exec", ns, "dnsmasq", "-k", *argv)
    return p.stdout.strip()


def adopt_cli(broker, *args: str) -> dict[str, Any]:
    p = broker.cli("adopt", "--channel", broker.channel, "--from", "kolla", "--json", *args, timeout=120)
    assert p.returncode in (0, 1), p.stderr
    return json.loads(p.stdout)


def state(dockerd, name: str) -> tuple[str, str, int] | None:
    rows = dockerd.inspect(name)
    return (rows[0]["Id"], rows[0]["State"]["Status"], rows[0]["State"]["Pid"]) if rows else None


def test_kolla_docker_sidecars_are_adopted_through_the_docker_cli(make_broker, dockerd):
    b = make_broker(profiles=["dnsmasq"])
    image = b.engine.config.channel(b.channel).image
    label = f"{netlab.TEST_LABEL}={netlab.unique_name()}"
    with NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}") as ok, NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}") as bad:
        try:
            _adopt_one_refuse_one(b, dockerd, image, label, ok, bad)
        finally:
            dockerd.rm_by_label(label)


def _adopt_one_refuse_one(b, dockerd, image, label, ok, bad):
    names = {p.server_ns: f"neutron_dhcp_agent_dnsmasq_{p.server_ns}" for p in (ok, bad)}
    ok_argv = dnsmasq_argv(b.data_dir, ok)
    kolla_docker_legacy(dockerd, names[ok.server_ns], ok.server_ns, image, b.data_dir, ok_argv, label)
    # The policy refuses this one: a --dhcp-script runs a program as root on every lease.
    kolla_docker_legacy(dockerd, names[bad.server_ns], bad.server_ns, image, b.data_dir,
                        dnsmasq_argv(b.data_dir, bad) + ["--dhcp-script=/bin/true"], label)
    for p in (ok, bad):
        assert netlab.dhcp_lease(p.client_ns, p.client_if, timeout=10)["ip"] == p.host(50)
    before = {n: state(dockerd, n) for n in names.values()}
    # The legacy process really is in its netns (adopt checks the same thing through /proc).
    legacy_pid = before[names[ok.server_ns]][2]
    want = os.stat(f"/run/netns/{ok.server_ns}")
    got = os.stat(f"/proc/{legacy_pid}/ns/net")
    assert (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino)

    # --dry-run prints the plan and changes nothing.
    rows = {r["netns"]: r for r in adopt_cli(b, "--dry-run")["networks"]}
    assert sorted(rows) == sorted([ok.server_ns, bad.server_ns])
    assert rows[ok.server_ns]["state"] == "planned" and rows[ok.server_ns]["source"] == names[ok.server_ns]
    assert rows[ok.server_ns]["argv"] == ok_argv  # read from /proc; the profile adds its own -k
    assert rows[bad.server_ns]["state"] == "refused" and "dhcp-script" in rows[bad.server_ns]["reason"]
    assert {n: state(dockerd, n) for n in names.values()} == before
    assert b.containers() == [] and not (b.root / "state" / b.channel / "adopt.json").exists()

    rows = {r["netns"]: r for r in adopt_cli(b)["networks"]}
    assert rows[ok.server_ns]["state"] == "done", rows[ok.server_ns]
    assert rows[bad.server_ns]["state"] == "refused"
    # Exactly one confined Docker sidecar, for the allowed network, started through the OCI runtime.
    [side] = b.containers()
    assert side["Labels"]["safespawn.netns"] == ok.server_ns and side["State"] == "running"
    [insp] = dockerd.inspect(side["Id"])
    assert insp["HostConfig"]["Runtime"] == "safespawn" and not insp["HostConfig"]["Privileged"]
    got = os.stat(f"/proc/{side['Pid']}/ns/net")
    assert (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino)
    # The pid file Neutron reads names the confined sidecar's host pid, as after an agent's own start.
    assert int((b.data_dir / ok.server_ns / "pid").read_text().split()[0]) == side["Pid"]
    # The legacy container is gone (stopped, --rm removed it); the refused one runs untouched.
    assert state(dockerd, names[ok.server_ns]) is None
    assert state(dockerd, names[bad.server_ns]) == before[names[bad.server_ns]]
    for p in (ok, bad):
        assert netlab.dhcp_lease(p.client_ns, p.client_if, timeout=10)["ip"] == p.host(50)
