import json

import pytest

from safespawn.broker.request import normalize_signal, parse_request
from safespawn.errors import BadRequest

RID = "0123456789abcdef0123456789abcdef"


def raw(**kw):
    d = {"v": 1, "id": RID, "op": "start", "profile": "dnsmasq", "netns": "qdhcp-x", "argv": ["--no-hosts"]}
    d.update(kw)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def test_a_well_formed_start_parses_into_a_frozen_request():
    r = parse_request(raw(), RID)
    assert (r.id, r.op, r.profile, r.netns, r.argv) == (RID, "start", "dnsmasq", "qdhcp-x", ("--no-hosts",))
    with pytest.raises(AttributeError):
        r.op = "stop"  # type: ignore[misc]


@pytest.mark.parametrize("data,why", [
    (raw(extra=1), "unknown keys"),
    (raw(v=2), "version"),
    (raw(v=True), "version"),
    (raw(id="ABC"), "id"),
    (raw(op="exec"), "op"),
    (raw(argv="--no-hosts"), "argv"),
    (raw(argv=[1]), "not a string"),
    (raw(argv=["a\nb"]), "control character"),
    (raw(argv=["x" * 5000]), "longer"),
    (raw(argv=["-x"] * 300), "more than"),
    (raw(profile="../etc"), "profile"),
    (raw(netns="../../x"), "netns"),
    (raw(profile=...), "needs a profile"),
    (b'{"v":1,"v":1}', "duplicate"),
    (b'[1,[2,[3,[4]]]]', "nested"),
    (b'{"v": NaN}', "constant"),
    (b'{"v": 1.5}', "floating"),
    (b'{"v": 1' + b'0' * 50 + b'}', "integer"),
    (b'\xff\xfe', "UTF-8"),
    (b'{"v":1,\x00}', "NUL"),
    (b'{', "not valid JSON"),
    (b'"just a string"', "object"),
])
def test_malformed_requests_are_bad_requests_with_a_reason(data, why):
    with pytest.raises(BadRequest) as e:
        parse_request(data, RID)
    assert why in e.value.message


def test_the_id_must_match_the_file_name():
    with pytest.raises(BadRequest, match="file name"):
        parse_request(raw(), "f" * 32)


@pytest.mark.parametrize("given,want", [("HUP", "HUP"), ("SIGHUP", "HUP"), ("hup", "HUP"), ("1", "HUP"),
                                        (1, "HUP"), ("15", "TERM"), ("9", "KILL"), ("USR2", "USR2")])
def test_signals_are_accepted_by_name_or_number(given, want):
    assert normalize_signal(given) == want


@pytest.mark.parametrize("bad", ["STOP", "19", "SEGV", "", True, None, "999999"])
def test_other_signals_are_refused(bad):
    with pytest.raises(BadRequest):
        normalize_signal(bad)


def test_signal_and_stop_need_a_target():
    with pytest.raises(BadRequest, match="pid or a profile"):
        parse_request(json.dumps({"v": 1, "id": RID, "op": "signal", "signal": "HUP"}).encode())
    r = parse_request(json.dumps({"v": 1, "id": RID, "op": "signal", "signal": "15", "pid": 1234}).encode())
    assert (r.signal, r.pid) == ("TERM", 1234)
    with pytest.raises(BadRequest, match="pid"):
        parse_request(json.dumps({"v": 1, "id": RID, "op": "stop", "pid": 1}).encode())


def test_a_stop_by_pid_that_names_a_netns_round_trips_unchanged() -> None:
    """Found by the fuzzer: the netns of a pid-only stop was dropped by to_dict()."""
    raw = json.dumps({"v": 1, "id": "a" * 32, "op": "stop", "netns": "0", "pid": 1234}).encode()
    req = parse_request(raw)
    assert req.netns == "0"
    assert parse_request(json.dumps(req.to_dict()).encode()) == req
