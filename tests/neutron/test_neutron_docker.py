"""Neutron 29's ProcessManager cycle for dnsmasq (enable -> lease, active, reload, disable) through
the wrappers and kill scripts, with Docker as the broker's runtime (a private dockerd, the OCI
runtime joining the qdhcp- netns). The test itself is test_neutron_agent.py's, unchanged; only the
`broker_runtime` fixture differs."""

from __future__ import annotations

import pytest
from test_neutron_agent import (  # noqa: F401 (fixtures and the test, run here with Docker)
    neutron,
    neutron_python,
    test_dnsmasq_lifecycle_through_neutrons_process_manager,
)

pytestmark = [pytest.mark.integration, pytest.mark.neutron]


@pytest.fixture
def broker_runtime() -> str:
    return "docker"
