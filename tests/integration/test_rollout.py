"""Rolling image upgrades with real podman: 20 dnsmasq sidecars, a second image and a broken one.

The second image is the test image with one more label (so a different image reference and id); the
broken one is an empty image, whose containers cannot start (`dnsmasq` not found).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import pytest
from support.netlab import NetnsPair

from integration.test_core import dnsmasq_argv
from safespawn.agent import client

V2 = "localhost/safespawn-test:rollout-v2"
BROKEN = "localhost/safespawn-test:rollout-broken"
N, BATCH = 20, 5


def build(tag: str, containerfile: str, tmp_path) -> str:
    d = tmp_path / tag.rsplit(":", 1)[1]
    d.mkdir()
    (d / "Containerfile").write_text(containerfile)
    subprocess.run(["podman", "build", "--pull=never", "-q", "-t", tag, "-f", str(d / "Containerfile"), str(d)],
                   check=True, capture_output=True, timeout=120)
    return tag


@pytest.fixture(scope="module")
def images(test_image, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    v2 = build(V2, f"FROM {test_image}\nLABEL safespawn.test.rollout=v2\n", tmp)
    broken = build(BROKEN, "FROM scratch\nLABEL safespawn.test.rollout=broken\n", tmp)
    return test_image, v2, broken


@pytest.fixture
def pairs():
    made = [NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}") for _ in range(N)]
    try:
        for p in made:
            p.create()
        yield made
    finally:
        for p in made:
            if p.created:
                p.destroy()


def set_image(b, old: str, new: str) -> None:
    text = b.config_path.read_text()
    assert f'image = "{old}"' in text
    b.config_path.write_text(text.replace(f'image = "{old}"', f'image = "{new}"'))
    b._engine = None  # the next sync reads the new config, as a new `safespawn sync` process would


def rollout_state(b) -> dict:
    p = b.root / "state" / b.channel / "rollout.json"
    return json.loads(p.read_text()) if p.exists() else {}


class Sampler:
    """Polls podman during the roll: how many sidecars run, and how many run image X."""

    def __init__(self, b, image: str) -> None:
        self.b, self.image = b, image
        self.samples: list[tuple[int, int]] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            cs = self.b.containers()
            running = [c for c in cs if c["State"] == "running"]
            self.samples.append((len(running), sum(1 for c in running if c["Image"] == self.image)))
            time.sleep(0.1)

    def __enter__(self) -> Sampler:
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.t.join()

    @property
    def most_down(self) -> int:
        return max(N - r for r, _ in self.samples)


class Syncer:
    """The broker's runs (as the path unit and timer would start them), every 50 ms."""

    def __init__(self, b) -> None:
        self.b = b
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.b.sync()
            time.sleep(0.05)

    def __enter__(self) -> Syncer:
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.t.join()


def wait_rollout(b, states: tuple[str, ...], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ro = rollout_state(b)
        if ro.get("state") in states:
            return ro
        time.sleep(0.1)
    raise AssertionError(f"rollout did not reach {states}: {rollout_state(b)}")


def test_an_image_change_rolls_in_batches_serves_requests_and_a_broken_image_is_rolled_back(
        make_broker, images, pairs, tmp_path):
    latest, v2, broken = images
    t0 = time.monotonic()

    def mark(what):
        print(f"{time.monotonic() - t0:7.2f}s {what}")

    prom = tmp_path / "safespawn.prom"
    b = make_broker(profiles=["dnsmasq"], image=latest, extra=f"rollout_batch = {BATCH}\nrollout_pause = 1",
                    broker_extra=f'metrics_file = "{prom}"')
    for p in pairs:
        b.write(client.start_request("dnsmasq", dnsmasq_argv(b.data_dir, p), netns=p.server_ns))
    b.sync()
    assert sum(c["State"] == "running" for c in b.containers()) == N
    # Nothing is outdated, and no rollout has run.
    st = json.loads(b.cli("status", "--json", b.channel, check=True).stdout)
    assert not any(s["outdated"] for s in st["sidecars"]) and st["rollout"]["outdated"] == 0

    mark('20 started')
    # 1. latest -> v2: batches of 5, one batch per second, requests answered meanwhile.
    set_image(b, latest, v2)
    st = json.loads(b.cli("status", "--json", b.channel, check=True).stdout)
    assert sum(s["outdated"] for s in st["sidecars"]) == N
    replies, progress = [], []
    with Sampler(b, v2) as sampler, Syncer(b):
        i = 0
        while rollout_state(b).get("state") != "done":
            p = pairs[i % N]
            i += 1
            replies.append(client.submit(str(b.channel_dir()), client.signal_request(
                "HUP", profile="dnsmasq", netns=p.server_ns), timeout=30))
            if i % 3 == 1:
                s = json.loads(b.cli("status", "--json", b.channel, check=True).stdout)["rollout"]
                progress.append((s["state"], s["replaced"], s["outdated"]))
            assert len(replies) < 500
    ro = rollout_state(b)
    assert ro["state"] == "done" and ro["replaced"] == N and ro["batches"] == N // BATCH, ro
    assert sampler.most_down <= BATCH, sampler.samples
    seen = sorted({v for _, v in sampler.samples})
    assert 0 in seen and N in seen and len([v for v in seen if 0 < v < N]) >= 2, seen  # never all at once
    assert all(upd - prev <= BATCH for (_, prev), (_, upd) in zip(sampler.samples, sampler.samples[1:],
                                                                strict=False)), "more than a batch per step"
    # Every request sent during the roll was answered: a HUP delivered, or `not_found` for the moment
    # its sidecar was being replaced.
    assert replies and all(r["ok"] or r["error"]["code"] == "not_found" for r in replies), replies
    assert sum(r["ok"] for r in replies) >= len(replies) // 2
    # `status` showed the progress: replaced counts rising while rolling, outdated falling.
    rolling = [x for x in progress if x[0] == "rolling"]
    assert rolling and any(0 < rep < N for _, rep, _ in rolling), progress
    cs = b.containers()
    assert len(cs) == N and all(c["State"] == "running" and c["Image"] == v2 for c in cs)
    pids = {c["Labels"]["safespawn.netns"]: c["Pid"] for c in cs}
    assert all(int((b.data_dir / ns / "pid").read_text()) == pid for ns, pid in pids.items()), pids

    mark(f'rolled to v2, {len(replies)} requests')
    # 2. v2 -> broken: the first batch fails, is rolled back to v2, and the rollout stops.
    set_image(b, v2, broken)
    with Sampler(b, v2) as sampler, Syncer(b):
        ro = wait_rollout(b, ("failed",))
        time.sleep(1.5)  # a pause later: still stopped, nothing more replaced
    assert ro["batches"] == 1 and len(ro["failed"]) == BATCH and "rolled back" in ro["message"], ro
    assert rollout_state(b)["batches"] == 1
    assert sampler.most_down <= BATCH
    cs = b.containers()
    assert len(cs) == N and all(c["State"] == "running" and c["Image"] == v2 for c in cs)
    st = json.loads(b.cli("status", "--json", b.channel, check=True).stdout)
    assert st["rollout"]["state"] == "failed" and sum(s["outdated"] for s in st["sidecars"]) == N
    # Rolled back or replaced, every pid file holds its container's host pid (what Neutron reads).
    pids = {c["Labels"]["safespawn.netns"]: c["Pid"] for c in cs}
    assert all(int((b.data_dir / ns / "pid").read_text()) == pid for ns, pid in pids.items()), pids
    assert f"safespawn_sidecars_outdated{{channel=\"{b.channel}\"}} {N}" in prom.read_text()
    text = b.cli("status", b.channel, check=True).stdout
    assert "rollout: failed" in text and "outdated" in text

    mark('broken rolled back')
    # 3. The operator pauses, fixes the config (back to latest), syncs: nothing moves; resumes: it rolls
    #    again (the first batch is enough to show it).
    assert b.cli("rollout", b.channel, "--pause", check=True).stdout.strip().endswith("paused")
    set_image(b, broken, latest)
    for _ in range(3):
        b.sync()
        time.sleep(0.4)
    assert rollout_state(b)["state"] == "paused"
    assert all(c["Image"] == v2 for c in b.containers())
    assert b.cli("rollout", b.channel, "--resume", check=True).returncode == 0
    with Sampler(b, latest) as sampler, Syncer(b):
        deadline = time.monotonic() + 90
        while rollout_state(b)["replaced"] < BATCH and time.monotonic() < deadline:
            time.sleep(0.1)
    ro = rollout_state(b)
    assert ro["state"] in ("rolling", "done") and ro["replaced"] >= BATCH, ro
    assert sampler.most_down <= BATCH
    assert sum(c["State"] == "running" and c["Image"] == latest for c in b.containers()) == ro["replaced"]
    mark("resumed: first batch back on latest")
