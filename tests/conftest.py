import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.broker import TEST_IMAGE, Broker  # noqa: E402


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


@pytest.fixture
def broker(tmp_path, test_image):
    """A real broker with one dnsmasq channel; its sidecars are removed afterwards."""
    with Broker.make(tmp_path / "broker", profiles=["dnsmasq"], image=test_image) as b:
        yield b


@pytest.fixture
def make_broker(tmp_path, test_image):
    made = []

    def make(**kw):
        kw.setdefault("image", test_image)
        b = Broker.make(tmp_path / f"broker{len(made)}", **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("safespawn's tests drive real podman and netns: run them as root")
