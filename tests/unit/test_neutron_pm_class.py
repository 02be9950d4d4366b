"""safespawn's ProcessManager class against a stand-in Neutron and a stand-in host, in milliseconds.

The real thing (Neutron 29, a real broker, real sidecars) is tests/neutron/test_neutron_class.py; this
pins the class's own decisions: what it asks the host and when, and what a broken status does.
The stand-in Neutron is the few names the class imports, with Neutron's ProcessManager constructor
reduced to the attributes the class reads.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safespawn.agent import neutron_pm
from safespawn.broker.inbox import create_channel_dirs

FAKE_NEUTRON = {
    "neutron/__init__.py": "",
    "neutron/agent/__init__.py": "",
    "neutron/agent/linux/__init__.py": "",
    "neutron/agent/linux/external_process.py": '''
        class ProcessManager:
            def __init__(self, conf, uuid, namespace=None, service=None, pids_path=None,
                         default_cmd_callback=None, cmd_addl_env=None, pid_file=None, run_as_root=False,
                         custom_reload_callback=None, default_pre_cmd_callback=None,
                         default_post_cmd_callback=None, async_process=False):
                self.conf, self.uuid, self.namespace, self.pid_file = conf, uuid, namespace, pid_file
                self.service = service or "default-service"
                self.default_cmd_callback = default_cmd_callback
                self.default_pre_cmd_callback = default_pre_cmd_callback
                self.default_post_cmd_callback = default_post_cmd_callback
                self.custom_reload_callback = custom_reload_callback
                self.pids_path = pids_path or "/nonexistent"
            def get_pid_file_name(self):
                return self.pid_file or "%s/%s.pid.%s" % (self.pids_path, self.uuid, self.service)
            def _kill_process(self, cmd, pid):
                raise AssertionError("no command runs in the agent")
    ''',
    "neutron/common/__init__.py": "",
    "neutron/common/utils.py": '''
        import time
        class WaitTimeout(Exception):
            pass
        def wait_until_true(predicate, timeout=5, sleep=0.01):
            end = time.monotonic() + timeout
            while not predicate():
                if time.monotonic() > end:
                    raise WaitTimeout()
                time.sleep(sleep)
    ''',
    "neutron_lib/__init__.py": "",
    "neutron_lib/exceptions.py": '''
        class ProcessExecutionError(RuntimeError):
            def __init__(self, message, returncode):
                super().__init__(message)
                self.returncode = returncode
    ''',
    "oslo_log/__init__.py": "",
    "oslo_log/log.py": "import logging\ngetLogger = logging.getLogger\n",
}


@pytest.fixture
def cls(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("fake-neutron")
    for name, text in FAKE_NEUTRON.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    for m in [m for m in sys.modules if m.split(".")[0] in ("neutron", "neutron_lib", "oslo_log")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setattr(neutron_pm, "_CLASS", None)
    monkeypatch.setattr(neutron_pm, "_STATUS", {})
    monkeypatch.setenv("SAFESPAWN_TIMEOUT", "3")
    return neutron_pm.process_manager_class()


class Host:
    """Answers every request like the broker would, and publishes a status after each."""

    def __init__(self, channel: Path) -> None:
        self.channel = channel
        self.requests: list[dict[str, Any]] = []
        self.running: dict[tuple[str, str | None], int] = {}
        self.stop = threading.Event()
        self.publish()
        self.t = threading.Thread(target=self.serve, daemon=True)
        self.t.start()

    def publish(self, raw: bytes | None = None) -> None:
        now = time.time()
        doc = {"v": 1, "channel": "c", "updated": int(now), "published": now, "refresh": 60, "sidecars": [
            {"name": f"c-{p}-{ns}", "profile": p, "netns": ns, "key": ns, "state": "running", "pid": pid,
             "started": 1, "restarts": 0, "generation": f"g{pid}"} for (p, ns), pid in self.running.items()]}
        tmp = self.channel / "outbox" / ".s"
        tmp.write_bytes(raw if raw is not None else json.dumps(doc).encode())
        os.replace(tmp, self.channel / "outbox" / "status.json")

    def serve(self) -> None:
        new = self.channel / "inbox" / "new"
        while not self.stop.is_set():
            for f in sorted(new.iterdir()):
                req = json.loads(f.read_text())
                self.requests.append(req)
                reply = {"v": 1, "id": req["id"], "ok": True, "sidecar": None, "pid": None, "error": None}
                key = (req.get("profile"), req.get("netns"))
                if req["op"] == "start":
                    self.running[key] = reply["pid"] = 1000 + len(self.requests)
                elif req["op"] == "signal" and req["signal"] in ("9", "15"):
                    if self.running.pop(key, None) is None:
                        reply.update(ok=False, error={"code": "not_found", "message": "no such sidecar"})
                # The status first, then the reply: a test that publishes its own status right after
                # the reply is never overwritten by this thread.
                self.publish()
                (self.channel / "outbox" / "replies" / f"{req['id']}.json").write_text(json.dumps(reply))
                f.unlink()
            time.sleep(0.005)


@pytest.fixture
def host(tmp_path):
    create_channel_dirs(str(tmp_path / "ch"))
    h = Host(tmp_path / "ch")
    yield h
    h.stop.set()
    h.t.join(5)


def manager(cls: Any, host: Host, **kw: Any) -> Any:
    kw.setdefault("namespace", "qdhcp-n1")
    kw.setdefault("service", "dnsmasq")
    return cls(object(), "n1", channel_dir=str(host.channel), **kw)


def test_enable_sends_the_callbacks_command_as_a_start_request_and_waits_for_the_status(cls, host):
    pm = manager(cls, host, default_cmd_callback=lambda pid_file: ["dnsmasq", "--no-hosts", "", f"--pid-file={pid_file}"])
    assert not pm.active
    pm.enable(ensure_active=True)
    [req] = host.requests
    assert (req["op"], req["profile"], req["netns"]) == ("start", "dnsmasq", "qdhcp-n1")
    assert req["argv"] == ["--no-hosts", f"--pid-file={pm.get_pid_file_name()}"]  # '' dropped as the wrapper does
    assert pm.active and pm.pid == 1001
    pm.enable(ensure_active=True)
    assert len(host.requests) == 1, "active: nothing to start"


def test_reload_is_a_hup_by_profile_and_namespace_and_disable_a_stop(cls, host):
    pm = manager(cls, host, default_cmd_callback=lambda pid_file: ["dnsmasq"])
    pm.enable(ensure_active=True)
    pm.reload_cfg()
    pm.disable(sig="15")
    ops = [(r["op"], r.get("signal"), r.get("profile"), r.get("netns"), r.get("pid")) for r in host.requests]
    assert ops[1:] == [("signal", "HUP", "dnsmasq", "qdhcp-n1", None), ("signal", "15", "dnsmasq", "qdhcp-n1", None)]
    assert not pm.active
    pm.disable()
    assert len(host.requests) == 3, "nothing runs: nothing is sent"


def test_active_sends_nothing(cls, host):
    pm = manager(cls, host, default_cmd_callback=lambda pid_file: ["dnsmasq"])
    pm.enable(ensure_active=True)
    n = len(host.requests)
    assert all(pm.active for _ in range(1000))
    assert len(host.requests) == n and list((host.channel / "inbox" / "new").iterdir()) == []


def test_a_malformed_status_is_not_active_warns_once_and_a_stop_is_still_sent(cls, host, caplog):
    pm = manager(cls, host, default_cmd_callback=lambda pid_file: ["dnsmasq"])
    pm.enable(ensure_active=True)
    host.publish(b'{"v": 1, "sidecars": "no"')
    with caplog.at_level("WARNING"):
        assert [pm.active for _ in range(50)] == [False] * 50
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 1
    pm.disable(sig="9")
    assert host.requests[-1]["op"] == "signal" and host.requests[-1]["signal"] == "9"


def test_a_refusal_is_a_process_execution_error(cls, host):
    from neutron_lib import exceptions

    pm = manager(cls, host, default_cmd_callback=lambda pid_file: ["sh", "-c", "id"])
    with pytest.raises(exceptions.ProcessExecutionError, match="no sidecar profile runs 'sh'"):
        pm.enable()
    assert host.requests == []


def test_no_broker_is_a_bounded_error_not_a_hang(cls, host, monkeypatch):
    from neutron_lib import exceptions

    host.stop.set()
    host.t.join(5)
    monkeypatch.setenv("SAFESPAWN_TIMEOUT", "0.3")
    pm = manager(cls, host, default_cmd_callback=lambda pid_file: ["dnsmasq"])
    t = time.monotonic()
    with pytest.raises(exceptions.ProcessExecutionError, match="no reply from the safespawn broker"):
        pm.enable()
    assert time.monotonic() - t < 10


def test_the_vrrp_child_and_the_state_change_monitor_map_onto_their_sidecars(cls, host):
    km = manager(cls, host, namespace="qrouter-r1", service="keepalived",
                 default_cmd_callback=lambda pid_file: ["keepalived", "-P", "-p", pid_file])
    km.enable(ensure_active=True)
    vrrp = cls(object(), "r1", "qrouter-r1", pid_file=km.get_pid_file_name() + "-vrrp", channel_dir=str(host.channel))
    assert vrrp.active and vrrp.pid == km.pid
    mon = cls(object(), "r1.monitor", namespace=None, service="neutron-keepalived-state-change-monitor",
              channel_dir=str(host.channel),
              default_cmd_callback=lambda pid_file: ["neutron-keepalived-state-change", "--router_id=r1",
                                                     "--namespace=qrouter-r1", f"--pid_file={pid_file}"])
    mon.enable(ensure_active=True)
    assert host.requests[-1]["netns"] == "qrouter-r1" and mon.active


def test_install_swaps_the_module_attribute(cls):
    from neutron.agent.linux import external_process

    orig = external_process.ProcessManager
    assert neutron_pm.install(external_process) is cls
    assert external_process.ProcessManager is cls and issubclass(cls, orig)
    assert neutron_pm.install(external_process) is cls and external_process._safespawn_original is orig
