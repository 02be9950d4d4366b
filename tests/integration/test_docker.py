"""The Docker runtime, end to end: a private dockerd, real containers, real netns, real DHCP.

The core specification of tests/integration/test_core.py runs again here, unchanged, with the
`broker` fixture switched to Docker (`broker_runtime` below): a real lease from the dnsmasq sidecar,
idempotent start and replace, HUP, TERM/KILL, the sidecar outliving requester and broker, the
refusals, and 100 concurrent requests each answered once. The rest of the file covers what is
Docker's own: the OCI runtime that puts the sidecar into its netns (ociruntime.py), given hostile
values directly and through requests, and check-config/doctor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support import netlab

from safespawn import client

from .test_core import (  # noqa: F401 (the imported tests run here again, with the Docker broker)
    dnsmasq_argv,
    pair,
    qdhcp,
    test_100_concurrent_requests_from_separate_processes_each_get_exactly_one_reply,
    test_a_failing_program_is_reported_with_its_output,
    test_hup_makes_dnsmasq_reread_its_hosts_file,
    test_refused_requests_get_a_coded_reply_and_create_nothing,
    test_same_start_changes_nothing_and_changed_arguments_replace,
    test_sidecar_outlives_the_requesting_process_and_the_broker,
    test_start_runs_dnsmasq_that_hands_out_a_real_lease,
    test_stop_by_profile_and_netns,
    test_term_and_kill_remove_the_container_and_its_desired_state,
)


@pytest.fixture
def broker_runtime() -> str:
    return "docker"


def test_the_dnsmasq_sidecar_runs_in_the_requested_netns_through_the_oci_runtime(broker, pair, dockerd):
    r = broker.request(client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair), netns=pair.server_ns))
    assert r["ok"], r
    [insp] = dockerd.inspect(r["sidecar"])
    assert insp["HostConfig"]["Runtime"] == "safespawn"
    assert insp["HostConfig"]["NetworkMode"] == "none"
    want = os.stat(f"/run/netns/{pair.server_ns}")
    got = os.stat(f"/proc/{r['pid']}/ns/net")
    assert (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino)
    host = os.stat("/proc/self/ns/net")  # the broker's (the host's) own
    assert (got.st_dev, got.st_ino) != (host.st_dev, host.st_ino)
