"""The rollout's batching logic against a fake of the one runtime interface (milliseconds, no root).

The real thing, with 20 podman sidecars and a broken image, is tests/integration/test_rollout.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from safespawn.broker import rollout
from safespawn.broker.audit import AuditLog
from safespawn.broker.engine import Engine
from safespawn.broker.sidecar import SidecarSpec
from safespawn.broker.state import ChannelState, DesiredSidecar
from safespawn.config import parse_config
from safespawn.errors import RuntimeFailed
from safespawn.runtime import Container


class FakeRuntime:
    """Containers in a dict; `run` of an image named in `broken` fails, as podman's rc 127 does."""

    def __init__(self, broken: tuple[str, ...] = ()) -> None:
        self.containers: dict[str, Container] = {}
        self.broken = broken
        self.runs: list[tuple[str, str]] = []
        self.most_down = 0
        self.down: set[str] = set()

    def list(self, channel=None):
        return list(self.containers.values())

    def run(self, spec: SidecarSpec) -> str:
        self.runs.append((spec.name, spec.image))
        if spec.image in self.broken:
            raise RuntimeFailed("podman run failed (rc 127): executable file `dnsmasq` not found")
        self.containers[spec.name] = Container("id-" + spec.name, spec.name, "running", 1000 + len(self.runs),
                                               spec.labels, image=spec.image)
        self.down.discard(spec.name)
        return "id"

    def run_pid(self, name: str) -> int:
        return 0

    def remove(self, name: str) -> None:
        if self.containers.pop(name, None) is not None:
            self.down.add(name)
            self.most_down = max(self.most_down, len(self.down))

    def inspect(self, names):
        return {n: self.containers[n] for n in names if n in self.containers}

    def signal(self, name, signal):
        pass

    def stop(self, name, grace):
        self.remove(name)

    def logs(self, name, lines=20):
        return ""


def spec(name: str, image: str) -> SidecarSpec:
    return SidecarSpec(name=name, channel="c", profile="dnsmasq", key=name, netns=None, netns_path=None, image=image,
                       entrypoint=("dnsmasq", "-k"), args=(), capabilities=(), mounts=(), tmpfs=(), pid_host=False,
                       read_only=True, stop_grace=5)


@pytest.fixture
def world(tmp_path):
    def make(n: int, batch: int, pause: int, broken: tuple[str, ...] = ()):
        cfg = parse_config({"broker": {"state_dir": str(tmp_path / "state"), "start_settle_ms": 0},
                            "channels": {"c": {"image": "img:new", "profiles": ["dnsmasq"],
                                               "rollout_batch": batch, "rollout_pause": pause}}})
        rt = FakeRuntime(broken)
        engine = Engine(cfg, runtime=rt)
        state = ChannelState(str(tmp_path / "state" / "c"))
        (tmp_path / "state" / "c").mkdir(parents=True)
        names = [f"c-dnsmasq-n{i:02d}" for i in range(n)]
        for nm in names:
            old = spec(nm, "img:old")
            rt.containers[nm] = Container("id", nm, "running", 1, old.labels, image="img:old")
            state.desired[nm] = DesiredSidecar(nm, "dnsmasq", None, (), "0" * 32, 0.0)
        return engine, rt, state, names

    return make


def outdated(rt: FakeRuntime, state: ChannelState, image: str = "img:new"):
    out = []
    for nm, d in state.desired.items():
        c = rt.containers.get(nm)
        new = spec(nm, image)
        if c is not None and c.spec_hash != new.spec_hash:
            out.append((d, new, c))
    return out


def step(engine, rt, state, image="img:new"):
    b = engine.config.broker
    rollout.step(engine.runtime, engine.policy, engine.config.channel("c"), state, AuditLog(state.audit_path, "c"),
                 [], outdated(rt, state, image), workers=b.parallel_starts, settle_ms=b.start_settle_ms)
    return json.loads(open(state.path + "/rollout.json").read())


def test_a_change_is_rolled_in_batches_one_batch_per_step_never_more_down(world):
    engine, rt, state, names = world(12, batch=5, pause=0)
    ro = step(engine, rt, state)
    assert ro["state"] == "rolling" and ro["replaced"] == 5 and ro["total"] == 12
    assert [n for n, _ in rt.runs] == names[:5]  # in name order
    assert step(engine, rt, state)["replaced"] == 10
    ro = step(engine, rt, state)
    assert ro["state"] == "done" and ro["replaced"] == 12 and ro["batches"] == 3
    assert rt.most_down <= 5
    assert all(c.image == "img:new" for c in rt.containers.values())


def test_the_next_batch_waits_for_the_pause(world):
    engine, rt, state, _ = world(8, batch=3, pause=3600)
    assert step(engine, rt, state)["replaced"] == 3
    assert step(engine, rt, state)["replaced"] == 3  # within the pause: nothing more
    assert len(rt.runs) == 3


def test_a_batch_whose_new_image_fails_is_rolled_back_and_the_rollout_stops(world):
    engine, rt, state, names = world(8, batch=3, pause=0, broken=("img:new",))
    ro = step(engine, rt, state)
    assert ro["state"] == "failed" and ro["failed"] == names[:3] and "rolled back" in ro["message"]
    assert all(rt.containers[n].image == "img:old" and rt.containers[n].running for n in names)
    before = list(rt.runs)
    assert step(engine, rt, state)["state"] == "failed" and rt.runs == before  # stopped: nothing moves


def test_a_new_container_that_exits_at_once_counts_as_failed(world):
    engine, rt, state, names = world(4, batch=2, pause=0)
    real_run = rt.run

    def run_then_exit(s):
        real_run(s)
        if s.image == "img:new":
            rt.containers[s.name] = dataclasses.replace(rt.containers[s.name], state="exited", exit_code=1)
        return "id"

    rt.run = run_then_exit
    ro = step(engine, rt, state)
    assert ro["state"] == "failed" and ro["failed"] == names[:2] and "exited with code 1" in ro["message"]
    assert [rt.containers[n].image for n in names[:2]] == ["img:old", "img:old"]


def test_a_paused_rollout_holds_across_a_config_change_until_resumed(world):
    engine, rt, state, _ = world(6, batch=2, pause=0)
    rollout.RolloutState(state="paused", message="paused by the operator").save(state.path)
    assert step(engine, rt, state)["state"] == "paused" and rt.runs == []
    ro = rollout.RolloutState.load(state.path)
    ro.state = "rolling"
    ro.save(state.path)
    assert step(engine, rt, state)["replaced"] == 2


def test_an_unreadable_rollout_file_starts_over(world):
    engine, rt, state, _ = world(2, batch=5, pause=0)
    open(state.path + "/rollout.json", "w").write("{not json")
    assert step(engine, rt, state)["state"] == "done"


def test_both_runtimes_report_the_image_a_rollback_returns_to():
    from safespawn.runtime import docker

    c = docker._container({"Id": "x", "Name": "/c-dnsmasq-k", "State": {"Status": "running", "Pid": 5},
                           "Config": {"Image": "registry.example/neutron:old", "Labels": {}}})
    assert c.image == "registry.example/neutron:old"
