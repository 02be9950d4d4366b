"""The metrics textfile: rendering, escaping, persistence between syncs, config validation."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from safespawn.broker.metrics import ChannelMetrics, ReplyObservation, SyncObservation, render, update
from safespawn.config import parse_config
from safespawn.errors import ConfigError


def test_histogram_buckets_are_cumulative_and_count_every_observation():
    m = ChannelMetrics()
    update(m, SyncObservation(ok=True, duration=0.07, finished=10.0,
                              replies=(ReplyObservation("start", "allowed", "", 0.3), ReplyObservation("stop", "allowed", "", 400.0))))
    fams = {f.name: f for f in text_string_to_metric_families(render([("c1", m)]))}
    lat = {s.labels.get("le"): s.value for s in fams["safespawn_request_latency_seconds"].samples
           if s.name.endswith("_bucket")}
    assert lat["0.25"] == 0 and lat["0.5"] == 1 and lat["300.0"] == 1 and lat["+Inf"] == 2
    sync = {s.labels.get("le"): s.value for s in fams["safespawn_sync_duration_seconds"].samples
            if s.name.endswith("_bucket")}
    assert sync["0.05"] == 0 and sync["0.1"] == 1


def test_a_failed_sync_does_not_move_the_last_success_time():
    m = ChannelMetrics()
    update(m, SyncObservation(ok=True, duration=0.1, finished=100.0))
    update(m, SyncObservation(ok=False, duration=0.1, finished=200.0))
    assert m.last_success == 100.0 and m.syncs_ok == 1 and m.syncs_failed == 1


def test_label_values_are_escaped():
    m = ChannelMetrics(sidecars={'pro"file\\\nx|running': 1})
    fams = list(text_string_to_metric_families(render([("c1", m)])))
    side = next(f for f in fams if f.name == "safespawn_sidecars")
    assert side.samples[0].labels["profile"] == 'pro"file\\\nx'


def test_counters_survive_a_round_trip_and_a_torn_file_restarts_them(tmp_path):
    m = ChannelMetrics()
    update(m, SyncObservation(ok=True, duration=1.0, finished=5.0, replies=(ReplyObservation("start", "refused", "quota"),),
                              respawns=2, pending=3, sidecars=(("dnsmasq", "running"),)))
    p = tmp_path / "metrics.json"
    p.write_text(json.dumps(m.to_dict()))
    assert ChannelMetrics.load(str(p)).to_dict() == m.to_dict()
    p.write_text('{"requests": {"a|b|c": "x"')
    assert ChannelMetrics.load(str(p)).to_dict() == ChannelMetrics().to_dict()


@pytest.mark.parametrize("value", ["relative.prom", "/var/lib/x/../y.prom", "/var/lib/node_exporter/x.txt", "/"])
def test_metrics_file_must_be_an_absolute_prom_path(value):
    with pytest.raises(ConfigError):
        parse_config({"broker": {"metrics_file": value}})


def test_metrics_file_is_off_by_default_and_settable():
    assert parse_config({}).broker.metrics_file is None
    cfg = parse_config({"broker": {"metrics_file": "/var/lib/node_exporter/textfile/safespawn.prom"}})
    assert str(cfg.broker.metrics_file) == "/var/lib/node_exporter/textfile/safespawn.prom"
