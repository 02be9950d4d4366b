import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.broker import TEST_IMAGE, Broker  # noqa: E402
from support.dockerd import PrivateDockerd  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath) or "/neutron/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def test_image() -> str:
    """The local sidecar image built from the host's binaries (scripts/build-test-image)."""
    subprocess.run(["bash", str(REPO / "scripts" / "build-test-image"), TEST_IMAGE], check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    return TEST_IMAGE


@pytest.fixture(scope="session")
def dockerd(test_image, tmp_path_factory):
    """One private dockerd for the session (tests/support/dockerd.py), with safespawn's OCI runtime
    registered and the test image loaded; stopped at the end. Never the machine's own daemon."""
    oci_runtime = Path(sys.executable).with_name("safespawn-oci-runtime")
    assert oci_runtime.exists(), f"{oci_runtime} is missing: pip install -e . in the venv"
    with PrivateDockerd.start(oci_runtime=str(oci_runtime)) as d:
        d.load_image(test_image)
        yield d


@pytest.fixture
def broker_runtime() -> str:
    """The runtime the `broker` and `make_broker` fixtures use. A test module overrides this fixture
    with "docker" to run the same specification through a real dockerd (tests/integration/test_docker.py)."""
    return "podman"


def _runtime_kw(request, broker_runtime: str) -> dict:
    return {"dockerd": request.getfixturevalue("dockerd")} if broker_runtime == "docker" else {}


@pytest.fixture
def broker(tmp_path, test_image, request, broker_runtime):
    """A real broker with one dnsmasq channel; its sidecars are removed afterwards."""
    with Broker.make(tmp_path / "broker", profiles=["dnsmasq"], image=test_image,
                     **_runtime_kw(request, broker_runtime)) as b:
        yield b


@pytest.fixture
def make_broker(tmp_path, test_image, request, broker_runtime):
    made = []
    runtime_kw = _runtime_kw(request, broker_runtime)

    def make(**kw):
        kw.setdefault("image", test_image)
        for k, v in runtime_kw.items():
            kw.setdefault(k, v)
        b = Broker.make(tmp_path / f"broker{len(made)}", **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("safespawn's tests drive real podman and netns: run them as root")
