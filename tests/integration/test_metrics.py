"""`[broker] metrics_file`: a Prometheus textfile written atomically after each sync.

Parsed with prometheus_client's own text parser (a test dependency only); every value is checked
against what the test did, with real podman and a real dnsmasq sidecar.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.netlab import NetnsPair

from integration.test_core import dnsmasq_argv, qdhcp
from safespawn.agent import client


def samples(path):
    text = path.read_text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(smp, name, **labels):
    return smp.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def pair():
    with NetnsPair(server_ns=qdhcp()) as p:
        yield p


def test_metrics_file_counts_what_the_broker_did(make_broker, tmp_path, pair):
    prom = tmp_path / "textfile" / "safespawn.prom"
    b = make_broker(profiles=["dnsmasq"], broker_extra=f'metrics_file = "{prom}"')
    ch = b.channel
    before = time.time()
    ok = b.request(client.start_request("dnsmasq", dnsmasq_argv(b.data_dir, pair), netns=pair.server_ns))
    assert ok["ok"], ok
    # Two refusals by policy, one by not_found, one quarantined entry, one replay.
    bad = client.start_request("dnsmasq", ["--dhcp-script=/bin/sh"], netns=pair.server_ns)
    assert b.request(bad)["error"]["code"] == "policy_denied"
    assert b.request(client.start_request("haproxy", [], netns=pair.server_ns))["error"]["code"] == "policy_denied"
    assert b.request(client.signal_request("HUP", pid=999999))["error"]["code"] == "not_found"
    b.write_raw("junk.json", b"{}")
    replay = client.start_request("dnsmasq", ["--dhcp-script=/bin/sh"], netns=pair.server_ns)
    b.request(replay)
    b.write(replay)  # the same request again: answered from the ledger
    b.sync()
    # A dead sidecar is respawned by reconcile.
    subprocess.run(["podman", "rm", "-f", "-t", "0", ok["sidecar"]], check=True, capture_output=True, timeout=60)
    b.sync()
    smp = samples(prom)

    assert value(smp, "safespawn_requests_total", channel=ch, op="start", decision="allowed", code="") == 1
    assert value(smp, "safespawn_requests_total", channel=ch, op="start", decision="refused",
                 code="policy_denied") == 3
    assert value(smp, "safespawn_requests_total", channel=ch, op="signal", decision="refused",
                 code="not_found") == 1
    assert value(smp, "safespawn_requests_total", channel=ch, op="unknown", decision="quarantined",
                 code="bad_request") == 1
    assert value(smp, "safespawn_requests_total", channel=ch, op="unknown", decision="replayed", code="") == 1
    assert value(smp, "safespawn_respawns_total", channel=ch) == 1
    assert value(smp, "safespawn_respawn_failures_total", channel=ch) == 0
    assert value(smp, "safespawn_sidecars", channel=ch, profile="dnsmasq", state="running") == 1
    assert value(smp, "safespawn_pending_requests", channel=ch) == 0
    syncs = 7  # five request() calls and two sync() calls above
    assert value(smp, "safespawn_syncs_total", channel=ch, result="ok") == syncs
    assert value(smp, "safespawn_sync_duration_seconds_count", channel=ch) == syncs
    assert value(smp, "safespawn_sync_duration_seconds_bucket", channel=ch, le="+Inf") == syncs
    # Every answered request has a latency; junk.json carries no id and gets no reply.
    assert value(smp, "safespawn_request_latency_seconds_count", channel=ch) == 6
    assert 0 < value(smp, "safespawn_request_latency_seconds_sum", channel=ch) < 60
    last = value(smp, "safespawn_last_success_timestamp_seconds", channel=ch)
    assert before <= last <= time.time()
    # The state dir keeps the counters between the separate processes that systemd starts.
    r = b.cli("sync", ch, check=True)
    assert r.returncode == 0
    assert value(samples(prom), "safespawn_syncs_total", channel=ch, result="ok") == syncs + 1


def test_pending_requests_and_a_failed_respawn_are_exported(make_broker, tmp_path, pair, test_image):
    prom = tmp_path / "safespawn.prom"
    b = make_broker(profiles=["dnsmasq"], broker_extra=f'metrics_file = "{prom}"',
                    extra="max_requests_per_run = 2")
    ok = b.request(client.start_request("dnsmasq", dnsmasq_argv(b.data_dir, pair), netns=pair.server_ns))
    assert ok["ok"], ok
    # The sidecar dies and a foreign container (no safespawn label) takes its name: the respawn fails.
    name = ok["sidecar"]
    subprocess.run(["podman", "rm", "-f", "-t", "0", name], check=True, capture_output=True, timeout=60)
    subprocess.run(["podman", "create", "--name", name, test_image, "true"], check=True, capture_output=True,
                   timeout=60)
    try:
        for _ in range(5):
            b.write(client.signal_request("HUP", pid=999999))
        b.sync()
        smp = samples(prom)
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=60)
    assert value(smp, "safespawn_pending_requests", channel=b.channel) == 3
    assert value(smp, "safespawn_requests_total", channel=b.channel, op="signal", decision="refused",
                 code="not_found") == 2
    assert value(smp, "safespawn_respawn_failures_total", channel=b.channel) == 1
    assert value(smp, "safespawn_respawns_total", channel=b.channel) == 0
    assert value(smp, "safespawn_sidecars", channel=b.channel, profile="dnsmasq", state="absent") == 1
    assert value(smp, "safespawn_syncs_total", channel=b.channel, result="ok") == 2


READER = r"""
import json, os, sys, time
from prometheus_client.parser import text_string_to_metric_families
path, stop = sys.argv[1], sys.argv[2]
reads, inodes, bad = 0, set(), []
while not os.path.exists(stop):
    try:
        with open(path) as f:
            inodes.add(os.fstat(f.fileno()).st_ino)
            text = f.read()
    except FileNotFoundError:
        continue
    reads += 1
    try:
        fams = {m.name for m in text_string_to_metric_families(text)}
        if not text.endswith("\n") or "safespawn_last_success_timestamp_seconds" not in fams:
            bad.append(text[-200:])
    except Exception as e:
        bad.append(repr(e))
print(json.dumps({"reads": reads, "inodes": len(inodes), "bad": bad[:5]}))
"""


def test_a_reader_never_sees_a_half_written_metrics_file(make_broker, tmp_path):
    # A separate process reads and parses the file as fast as it can while syncs rewrite it.
    prom = tmp_path / "safespawn.prom"
    stop = tmp_path / "stop"
    b = make_broker(profiles=["dnsmasq"], channels=2, broker_extra=f'metrics_file = "{prom}"')
    b.sync()
    reader = subprocess.Popen([sys.executable, "-c", READER, str(prom), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(6):
            for ch in [b.channel, *b.extra_channels]:
                b.write(client.signal_request("HUP", pid=999999), channel=ch)
                b.sync(ch)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    seen = json.loads(out)
    assert seen["reads"] > 20 and seen["inodes"] > 1, seen  # replaced by rename, not rewritten in place
    assert seen["bad"] == [], seen["bad"]
    # No temp file is left where node_exporter would read it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".prom")) == ["safespawn.prom"]
    final = samples(prom)
    for ch in [b.channel, *b.extra_channels]:
        assert value(final, "safespawn_requests_total", channel=ch, op="signal", decision="refused",
                     code="not_found") == 6


def test_an_agent_set_mtime_cannot_poison_the_latency_histogram(make_broker, tmp_path):
    # The agent owns inbox/new and so the request files' mtimes: one in the future counts as 0 s,
    # one from 1970 is not observed; both requests are still counted and answered.
    prom = tmp_path / "safespawn.prom"
    b = make_broker(profiles=["dnsmasq"], broker_extra=f'metrics_file = "{prom}"')
    rids = [b.write(client.signal_request("HUP", pid=999999)) for _ in range(3)]
    new = b.channel_dir() / "inbox" / "new"
    os.utime(new / f"{rids[0]}.json", (4102444800, 4102444800))  # 2100-01-01
    os.utime(new / f"{rids[1]}.json", (1, 1))
    b.sync()
    smp = samples(prom)
    assert all(b.reply(r) is not None for r in rids)
    assert value(smp, "safespawn_requests_total", channel=b.channel, op="signal", decision="refused",
                 code="not_found") == 3
    assert value(smp, "safespawn_request_latency_seconds_count", channel=b.channel) == 2
    assert 0 <= value(smp, "safespawn_request_latency_seconds_sum", channel=b.channel) < 60
    assert value(smp, "safespawn_request_latency_seconds_bucket", channel=b.channel, le="0.05") >= 1
