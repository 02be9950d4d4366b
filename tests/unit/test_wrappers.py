"""`safespawn wrappers install` and the client functions the wrappers and kill scripts run.

The generated scripts run inside agent images (Python 3.9+, standard library only); here they run
as real subprocesses against a channel directory answered by a minimal replier thread.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.vermin import VERMIN

from safespawn.agent import client
from safespawn.broker.inbox import create_channel_dirs
from safespawn.cli import main
from safespawn.ops import wrappers

CLIENT_PY = Path(client.__file__)
EXPECTED = {
    "safespawn_client.py", "dnsmasq", "haproxy", "keepalived", "radvd", "neutron-keepalived-state-change",
    "dnsmasq-kill", "haproxy-kill", "keepalived-kill", "radvd-kill", "neutron-keepalived-state-change-monitor-kill",
}


def test_install_writes_wrappers_kill_scripts_and_the_client(tmp_path: Path) -> None:
    changed = wrappers.install(str(tmp_path / "w"), "neutron-dhcp", "/var/lib/safespawn/channels/neutron-dhcp")
    # Plus safespawn-neutron, its hook and the ProcessManager class (tests/unit/test_neutron_pm.py).
    launcher = {"safespawn-neutron", "safespawn_neutron.py", "safespawn-neutron.d/sitecustomize.py"}
    assert set(changed) == EXPECTED | launcher
    assert {p.name for p in (tmp_path / "w").iterdir()} == EXPECTED | {"safespawn-neutron", "safespawn_neutron.py",
                                                                        "safespawn-neutron.d"}
    for name in EXPECTED - {"safespawn_client.py"}:
        p = tmp_path / "w" / name
        assert p.stat().st_mode & 0o777 == 0o755
        text = p.read_text()
        assert text.startswith("#!/usr/bin/env python3\n")
        assert "CHANNEL_DIR = '/var/lib/safespawn/channels/neutron-dhcp'" in text
        entry = "kill_main" if name.endswith("-kill") else "wrapper_main"
        profile = wrappers.KILL_SCRIPTS.get(name) or wrappers.PROGRAMS[name]
        assert f"client.{entry}({profile!r}, CHANNEL_DIR)" in text
    assert (tmp_path / "w" / "safespawn_client.py").read_text() == CLIENT_PY.read_text()
    assert (tmp_path / "w" / "safespawn_client.py").stat().st_mode & 0o777 == 0o644


def test_install_is_idempotent_and_repairs_what_changed(tmp_path: Path) -> None:
    target = str(tmp_path / "w")
    wrappers.install(target, "ch", "/c/ch")
    assert wrappers.install(target, "ch", "/c/ch") == []
    (tmp_path / "w" / "radvd-kill").write_text("#!/bin/sh\nkill \"$@\"\n")
    os.chmod(tmp_path / "w" / "dnsmasq", 0o777)
    assert sorted(wrappers.install(target, "ch", "/c/ch")) == ["dnsmasq", "radvd-kill"]
    assert wrappers.install(target, "ch", "/c/other") and "'/c/other'" in (tmp_path / "w" / "haproxy").read_text()


def test_kill_script_names_are_the_ones_neutron_29_looks_up() -> None:
    # ProcessManager.get_kill_cmd: "<service>-kill"; the services of Neutron 29's drivers.
    assert set(wrappers.KILL_SCRIPTS) == {f"{s}-kill" for s in (
        "dnsmasq", "haproxy", "keepalived", "radvd", "neutron-keepalived-state-change-monitor")}


def test_cli_install_takes_the_channel_dir_from_the_config_or_the_flag(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "safespawn.toml"
    cfg.write_text(f'[broker]\nchannels_dir = "{tmp_path}/chans"\n'
                   '[channels.neutron-l3]\nimage = "x:1"\nprofiles = ["keepalived"]\n')
    monkeypatch.setenv("SAFESPAWN_CONFIG", str(cfg))
    assert main(["wrappers", "install", "--channel", "neutron-l3", str(tmp_path / "a")]) == 0
    assert f"CHANNEL_DIR = '{tmp_path}/chans/neutron-l3'" in (tmp_path / "a" / "keepalived").read_text()
    assert main(["wrappers", "install", "--channel", "neutron-l3", "--channel-dir", "/agent/sees/it",
                 "--python", "/usr/bin/python3.9", str(tmp_path / "b")]) == 0
    text = (tmp_path / "b" / "keepalived").read_text()
    assert text.startswith("#!/usr/bin/python3.9\n") and "CHANNEL_DIR = '/agent/sees/it'" in text
    assert main(["wrappers", "install", "--channel", "x", "--channel-dir", "relative", str(tmp_path / "c")]) == 2


# -- Python 3.9 ------------------------------------------------------------------------------------

def _generated(tmp_path: Path) -> list[Path]:
    wrappers.install(str(tmp_path), "ch", "/var/lib/safespawn/channels/ch")
    return sorted(p for p in tmp_path.rglob("*") if p.is_file())


def test_client_and_generated_scripts_parse_as_python_3_9(tmp_path: Path) -> None:
    for f in [CLIENT_PY, *_generated(tmp_path)]:
        ast.parse(f.read_text(), filename=str(f), feature_version=(3, 9))


def test_vermin_finds_nothing_newer_than_3_9(tmp_path: Path) -> None:
    files = [str(CLIENT_PY)] + [str(p) for p in _generated(tmp_path)]
    p = subprocess.run([*VERMIN, "--target=3.9-", "--violations", "--no-tips", "--no-parse-comments", *files],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_client_imports_only_the_standard_library() -> None:
    tree = ast.parse(CLIENT_PY.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


# -- the scripts against a channel -----------------------------------------------------------------

@pytest.fixture
def channel(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]], Callable[..., None]]]:
    """A channel dir whose requests a thread answers with `answer(request) -> reply fields`."""
    chan = tmp_path / "chan"
    create_channel_dirs(str(chan))
    seen: list[dict[str, Any]] = []
    answers: list[Callable[[dict[str, Any]], dict[str, Any]]] = [lambda r: {"ok": True}]
    stop = threading.Event()

    def serve() -> None:
        new = chan / "inbox" / "new"
        while not stop.is_set():
            for f in sorted(new.iterdir()):
                req = json.loads(f.read_text())
                seen.append(req)
                reply = {"v": 1, "id": req["id"], "ok": False, "sidecar": None, "pid": None, "error": None}
                reply.update(answers[-1](req))
                (chan / "outbox" / "replies" / f"{req['id']}.json").write_text(json.dumps(reply))
                f.unlink()
            time.sleep(0.01)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield chan, seen, answers.append
    stop.set()
    t.join()


def _run(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SAFESPAWN_TIMEOUT": "10", **(env or {})}, cwd="/")


def test_kill_script_turns_sig_pid_into_a_signal_request(tmp_path: Path, channel) -> None:
    chan, seen, _ = channel
    wrappers.install(str(tmp_path / "w"), "ch", str(chan))
    p = _run(tmp_path / "w" / "dnsmasq-kill", "HUP", "4242")
    assert p.returncode == 0, p.stderr
    [req] = seen
    assert (req["op"], req["signal"], req["pid"], req["profile"]) == ("signal", "HUP", 4242, "dnsmasq")
    p = _run(tmp_path / "w" / "neutron-keepalived-state-change-monitor-kill", "15", "77")
    assert p.returncode == 0 and seen[-1]["profile"] == "neutron-keepalived-state-change"
    assert seen[-1]["signal"] == "15"


def test_kill_script_of_an_unknown_pid_says_no_such_process(tmp_path: Path, channel) -> None:
    chan, _, answer = channel
    answer(lambda r: {"error": {"code": "not_found", "message": "no sidecar of channel ch has pid 9"}})
    wrappers.install(str(tmp_path / "w"), "ch", str(chan))
    p = _run(tmp_path / "w" / "haproxy-kill", "9", "999")
    # Neutron's ProcessManager._kill_process ignores a failure whose output says "No such process".
    assert p.returncode == 1 and "No such process" in p.stderr
    answer(lambda r: {"error": {"code": "policy_denied", "message": "signal USR1 is not allowed"}})
    p = _run(tmp_path / "w" / "haproxy-kill", "USR1", "999")
    assert p.returncode == 1 and "No such process" not in p.stderr and "policy_denied" in p.stderr
    assert _run(tmp_path / "w" / "haproxy-kill", "9").returncode == 2


def test_wrapper_forwards_the_arguments_and_reports_a_refusal(tmp_path: Path, channel) -> None:
    chan, seen, answer = channel
    wrappers.install(str(tmp_path / "w"), "ch", str(chan))
    p = _run(tmp_path / "w" / "haproxy", "-f", "/var/lib/neutron/ns-metadata-proxy/x.conf")
    assert p.returncode == 0, p.stderr
    assert seen[-1]["argv"] == ["-f", "/var/lib/neutron/ns-metadata-proxy/x.conf"]
    assert seen[-1]["profile"] == "haproxy" and seen[-1]["netns"] is None  # not in a named netns here
    answer(lambda r: {"error": {"code": "policy_denied", "message": "option '--dhcp-script' is not allowed"}})
    p = _run(tmp_path / "w" / "dnsmasq", "", "--dhcp-script=/bin/sh")
    assert p.returncode == 1 and "refused by safespawn: policy_denied" in p.stderr
    assert seen[-1]["argv"] == ["--dhcp-script=/bin/sh"], "the empty argument Neutron may pass is dropped"


def test_wrapper_waits_for_the_pid_file_neutron_reads_next(tmp_path: Path, channel) -> None:
    chan, seen, answer = channel
    pid_file = tmp_path / "pid"

    def started(req: dict[str, Any]) -> dict[str, Any]:
        threading.Timer(0.5, lambda: pid_file.write_text("1234\n")).start()
        return {"ok": True, "sidecar": "x", "pid": 1234}

    answer(started)
    wrappers.install(str(tmp_path / "w"), "ch", str(chan))
    t0 = time.monotonic()
    p = _run(tmp_path / "w" / "radvd", "-C", "/x/radvd.conf", "-p", str(pid_file), "-m", "syslog")
    assert p.returncode == 0 and time.monotonic() - t0 >= 0.5 and pid_file.read_text() == "1234\n"
    pid_file.unlink()
    # Already running with the same arguments (the host changed nothing) after Neutron removed the
    # pid file: the wrapper writes the pid the host reported, or Neutron would never see it active.
    answer(lambda r: {"ok": True, "sidecar": "x", "pid": 4321})
    p = _run(tmp_path / "w" / "keepalived", "-P", "-p", str(pid_file), env={"SAFESPAWN_PID_FILE_WAIT": "0.2"})
    assert p.returncode == 0 and "wrote its pid 4321" in p.stderr and pid_file.read_text() == "4321\n"
    pid_file.unlink()
    answer(lambda r: {"ok": True, "sidecar": "x", "pid": None})
    p = _run(tmp_path / "w" / "keepalived", "-P", "-p", str(pid_file), env={"SAFESPAWN_PID_FILE_WAIT": "0.2"})
    assert p.returncode == 0 and "has no pid" in p.stderr and not pid_file.exists()
    assert [f.name for f in tmp_path.iterdir() if "safespawn-" in f.name] == []


def test_state_change_wrapper_takes_its_netns_from_namespace(tmp_path: Path, channel) -> None:
    chan, seen, _ = channel
    wrappers.install(str(tmp_path / "w"), "ch", str(chan))
    ns = "qrouter-2e1da884-816a-5f99-9ee7-1081672c961f"
    p = _run(tmp_path / "w" / "neutron-keepalived-state-change", "--router_id", ns[8:], "--namespace", ns,
             env={"SAFESPAWN_PID_FILE_WAIT": "0"})
    assert p.returncode == 0, p.stderr
    assert seen[-1]["netns"] == ns and seen[-1]["profile"] == "neutron-keepalived-state-change"


def test_no_broker_is_reported_and_the_request_withdrawn(tmp_path: Path) -> None:
    chan = tmp_path / "chan"
    create_channel_dirs(str(chan))
    wrappers.install(str(tmp_path / "w"), "ch", str(chan))
    p = _run(tmp_path / "w" / "dnsmasq-kill", "HUP", "1", env={"SAFESPAWN_TIMEOUT": "0.3"})
    assert p.returncode == client.EXIT_NO_BROKER and "no reply from the safespawn broker" in p.stderr
    assert os.listdir(chan / "inbox" / "new") == []


def test_option_value_reads_both_spellings() -> None:
    argv = ["--pid-file=/a", "-p", "/b", "--namespace", "qrouter-x", "-p"]
    assert client.option_value(argv, "--pid-file") == "/a"
    assert client.option_value(argv, "-p") == "/b"
    assert client.option_value(argv, "--namespace") == "qrouter-x"
    assert client.option_value(argv, "--nothing") is None


def test_cli_install_takes_the_channel_dir_from_an_explicit_config_without_touching_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "safespawn.toml"
    cfg.write_text(f'[broker]\nchannels_dir = "{tmp_path}/given"\n'
                   '[channels.neutron-l3]\nimage = "x:1"\nprofiles = ["keepalived"]\n')
    monkeypatch.delenv("SAFESPAWN_CONFIG", raising=False)
    before = dict(os.environ)
    assert main(["--config", str(cfg), "wrappers", "install", "--channel", "neutron-l3", str(tmp_path / "a")]) == 0
    assert f"CHANNEL_DIR = '{tmp_path}/given/neutron-l3'" in (tmp_path / "a" / "keepalived").read_text()
    assert dict(os.environ) == before  # the config is passed as a value, not through the environment


def test_the_haproxy_wrapper_names_the_configs_pidfile_on_the_command_line(tmp_path):
    from safespawn.agent import client

    cfg = tmp_path / "net.conf"
    cfg.write_text("global\n    log /dev/log local0 debug\n    pidfile     /var/lib/neutron/external/pids/net.pid\n"
                   "    daemon\n")
    assert client.haproxy_pid_file_args(["-f", str(cfg)]) == \
        ["-f", str(cfg), "-p", "/var/lib/neutron/external/pids/net.pid"]
    # Already named, no config, no pidfile line: unchanged (the host's policy still checks -p).
    assert client.haproxy_pid_file_args(["-f", str(cfg), "-p", "/x"]) == ["-f", str(cfg), "-p", "/x"]
    assert client.haproxy_pid_file_args(["-f", str(tmp_path / "missing")]) == ["-f", str(tmp_path / "missing")]
    cfg.write_text("global\n    daemon\n")
    assert client.haproxy_pid_file_args(["-f", str(cfg)]) == ["-f", str(cfg)]


@pytest.mark.parametrize("swapped", ["inbox/tmp", "inbox/new"])
def test_a_symlinked_inbox_folder_never_makes_the_client_write_elsewhere(tmp_path, swapped):
    """`safespawn submit` runs the client as root on the host: the agent owns inbox/, so it can put a
    symlink in place of inbox/tmp or inbox/new; the client must refuse, not write or rename there."""
    from safespawn.agent import client

    ch = tmp_path / "ch"
    for d in ("inbox/tmp", "inbox/new", "outbox/replies"):
        (ch / d).mkdir(parents=True)
    victim = tmp_path / "etc"
    victim.mkdir()
    os.rename(ch / swapped, tmp_path / "moved")
    os.symlink(victim, ch / swapped)
    with pytest.raises(OSError):
        client._write_request(str(ch), client.start_request("dnsmasq", ["--no-hosts"]))
    assert list(victim.iterdir()) == []
