"""Nothing lost: podman failures, a full disk, a crash mid-sync. Real podman and netns throughout;
failures are injected around the real podman (a wrapper that fails on demand) or with a real
full filesystem (a small tmpfs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest
from support.broker import Broker
from support.netlab import netns_add, netns_delete

from safespawn.agent import client


@pytest.fixture
def netns():
    name = f"qdhcp-{uuid.uuid4()}"
    netns_add(name)
    yield name
    netns_delete(name)


def argv_for(data, ns):
    d = data / ns
    d.mkdir(exist_ok=True)
    return ["--no-hosts", "--no-resolv", f"--pid-file={d}/pid", f"--dhcp-leasefile={d}/leases", "--interface=lo",
            "--bind-dynamic", "--conf-file=/dev/null"]


@pytest.fixture
def flaky_podman(tmp_path):
    """The real podman, except that while FAIL exists every call fails as podman does (rc 125)."""
    flag = tmp_path / "FAIL"
    script = tmp_path / "podman"
    script.write_text(f"#!/bin/sh\nif [ -e {flag} ]; then echo 'Error: injected failure' >&2; exit 125; fi\n"
                      f"exec {shutil.which('podman')} \"$@\"\n")
    script.chmod(0o755)
    return script, flag


def test_podman_failing_answers_runtime_failed_and_loses_nothing(tmp_path, test_image, flaky_podman, netns):
    script, flag = flaky_podman
    with Broker.make(tmp_path / "b", image=test_image, broker_extra=f'podman = "{script}"') as b:
        flag.touch()
        reqs = [client.start_request("dnsmasq", argv_for(b.data_dir, netns), netns=netns),
                client.signal_request("HUP", pid=4000001)]
        for r in reqs:
            b.write(r)
        result = b.sync()
        assert result.errors  # reported to the operator
        for r in reqs:
            reply = b.reply(r["id"])
            assert reply["ok"] is False and reply["error"]["code"] == "runtime_failed", reply
            assert "injected failure" in reply["error"]["message"]
        assert b.pending() == [] and b.containers() == [] and b.desired() == {}
        # podman is back: the next request is served.
        flag.unlink()
        ok = b.request(client.start_request("dnsmasq", argv_for(b.data_dir, netns), netns=netns))
        assert ok["ok"], ok
        assert len(b.containers()) == 1


def test_podman_failing_during_reconcile_leaves_the_desired_sidecar_to_the_next_run(tmp_path, test_image,
                                                                                   flaky_podman, netns):
    script, flag = flaky_podman
    with Broker.make(tmp_path / "b", image=test_image, broker_extra=f'podman = "{script}"') as b:
        r = b.request(client.start_request("dnsmasq", argv_for(b.data_dir, netns), netns=netns))
        assert r["ok"]
        subprocess.run(["podman", "rm", "-f", "-t", "0", r["sidecar"]], check=True, capture_output=True)
        flag.touch()
        assert b.sync().errors
        assert list(b.desired()) == [r["sidecar"]]  # not forgotten
        flag.unlink()
        b.sync()
        assert [c["State"] for c in b.containers()] == ["running"]


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path):
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_fails_the_sync_but_loses_no_request_and_leaks_no_sidecar(small_fs, test_image, netns):
    with Broker.make(small_fs / "b", image=test_image) as b:
        req = client.start_request("dnsmasq", argv_for(b.data_dir, netns), netns=netns)
        b.write(req)
        filler = fill(small_fs)
        with pytest.raises(OSError) as e:
            b.sync()
        assert e.value.errno == 28  # ENOSPC
        assert b.pending() == [f"{req['id']}.json"]  # still there
        assert b.reply(req["id"]) is None
        os.unlink(filler)
        b._engine = None
        b.sync()
        reply = b.reply(req["id"])
        assert reply["ok"], reply
        assert b.pending() == []
        assert [c["State"] for c in b.containers()] == ["running"]
        assert list(b.desired()) == [reply["sidecar"]]


def test_a_flood_does_not_swallow_a_request_claimed_before_a_crash(tmp_path, test_image):
    import hashlib
    import time

    from safespawn.broker.state import ChannelState

    with Broker.make(tmp_path / "b", image=test_image, extra="max_pending = 2") as b:
        reqs = [client.signal_request("HUP", pid=4000100 + i) for i in range(5)]
        for r in reqs:
            b.write(r)
            time.sleep(0.01)  # distinct mtimes: the last ones are the "excess"
        # The newest request had been claimed by a sync that then crashed.
        claimed = reqs[-1]
        raw = (b.channel_dir() / "inbox" / "new" / f"{claimed['id']}.json").read_bytes()
        with ChannelState.locked(str(b.root / "state"), b.channel) as st:
            st.claim([(claimed["id"], hashlib.sha256(raw).hexdigest())])
        b.sync()
        replies = {r["id"]: b.reply(r["id"]) for r in reqs}
        assert all(replies.values()), replies  # every request got its one reply
        assert replies[claimed["id"]]["error"]["code"] != "quota"
        assert [replies[r["id"]]["error"]["code"] for r in reqs[2:4]] == ["quota", "quota"]
        assert b.pending() == []
