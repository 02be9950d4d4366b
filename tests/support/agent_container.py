"""A real agent container: a podman container standing in for a Neutron DHCP (or L3) agent.

    box = AgentContainer.create(root, broker, wrappers, neutron_python, mode="class")
    agent = box.start()              # `podman start -ai`: the agent script speaks over stdin/stdout
    agent("dhcp_start", ...)
    box.stop(agent); agent = box.start()   # the agent container is stopped and started again
    box.inspect()                    # podman inspect, for the assertions on privilege and mounts
    box.remove()

The image is a tiny rootfs (symlinks and /etc/passwd only); Neutron 29 comes from the host, read-only:
the Neutron venv, its base Python, and /usr (the Python's shared libraries, `ip`). It is mounted the
way docs/neutron.md says: the channel's inbox read-write with nodev,nosuid,noexec, its outbox
read-only, the data dir read-write, the wrappers directory read-only. Never a runtime socket, never
--privileged, `--cap-drop ALL` plus what the caller names, no-new-privileges. `mode="class"` runs the
agent through `safespawn-neutron` (no wrapper on PATH, no /run/netns, own pid and network namespace);
`mode="wrappers"` puts the wrappers first on PATH and kill_scripts_path there, and mounts /run/netns
(Neutron runs `ip netns exec`).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .broker import Broker
from .neutron_process import NEUTRON_TESTS, AgentProcess

PYTHON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNTIME_SOCKETS = ("/run/podman/podman.sock", "/var/run/docker.sock", "/run/docker.sock",
                   "/run/containerd/containerd.sock", "/run/crio/crio.sock")


def _rootfs(root: Path) -> Path:
    r = root / "agent-rootfs"
    if r.exists():
        return r
    for d in ("usr", "etc", "tmp", "proc", "sys", "dev", "run/netns", "opt", "root", "var/tmp", "var/lib"):
        (r / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        os.symlink(f"usr/{link}", r / link)
    (r / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/false\n")
    (r / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    os.chmod(r / "tmp", 0o1777)
    return r


def _base_python(neutron_python: str) -> Path:
    """The base interpreter's prefix the venv points at (pyvenv.cfg `home`)."""
    cfg = Path(neutron_python).parents[1] / "pyvenv.cfg"
    home = dict(line.split(" = ", 1) for line in cfg.read_text().splitlines() if " = " in line)["home"]
    return Path(home).parent


@dataclass
class AgentContainer:
    name: str
    log: Path

    @classmethod
    def create(cls, root: Path, broker: Broker, wrappers: Path, neutron_python: str, *, mode: str,
               pid_host: bool = False, caps: Sequence[str] = (), script: str = "neutron_class_agent.py") -> AgentContainer:
        assert mode in ("class", "wrappers")
        name = f"sstagent-{secrets.token_hex(4)}"
        chan = broker.channel_dir()
        venv = Path(neutron_python).parents[1]
        base = _base_python(neutron_python)
        env = {"NEUTRON_STATE_PATH": str(broker.data_dir), "SAFESPAWN_TIMEOUT": "60", "PYTHONDONTWRITEBYTECODE": "1"}
        if mode == "class":
            empty = root / "no-kill-scripts"
            empty.mkdir(exist_ok=True)
            env.update(KILL_SCRIPTS_PATH=str(empty), PATH=PYTHON_PATH)
            command = [str(wrappers / "safespawn-neutron"), neutron_python, str(NEUTRON_TESTS / script)]
        else:
            env.update(KILL_SCRIPTS_PATH=str(wrappers), PATH=f"{wrappers}:{PYTHON_PATH}")
            command = [neutron_python, str(NEUTRON_TESTS / script)]
        argv = ["podman", "create", "--interactive", f"--name={name}", "--cap-drop=ALL",
                "--security-opt=no-new-privileges", "--network=none", "--label=safespawn-test=agent",
                f"--volume={chan / 'inbox'}:{chan / 'inbox'}:rw,nodev,nosuid,noexec",
                f"--volume={chan / 'outbox'}:{chan / 'outbox'}:ro",
                f"--volume={broker.data_dir}:{broker.data_dir}:rw",
                f"--volume={wrappers}:{wrappers}:ro",
                f"--volume={NEUTRON_TESTS}:{NEUTRON_TESTS}:ro",
                "--volume=/usr:/usr:ro", f"--volume={venv}:{venv}:ro"]
        if not base.is_relative_to("/usr"):  # e.g. a pyenv build; Debian's python3 is in /usr already
            argv.append(f"--volume={base}:{base}:ro")
        argv += [f"--cap-add={c}" for c in caps]
        if pid_host:
            argv.append("--pid=host")
        if mode == "wrappers":
            # Neutron's `ip netns exec NS ...` needs the namespaces the host (here: the test) created.
            argv.append("--volume=/run/netns:/run/netns:rw,rslave")
        argv += [f"--env={k}={v}" for k, v in env.items()]
        argv += ["--rootfs", str(_rootfs(root)), *command]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
        return cls(name, root / f"{name}.log")

    def start(self) -> AgentProcess:
        return AgentProcess(["podman", "start", "--attach", "--interactive", self.name], dict(os.environ),
                            self.log, ready_timeout=180)

    def stop(self, agent: AgentProcess) -> None:
        """Stop the agent container: its agent exits (stdin closed), the container with it."""
        agent.stop(timeout=30)
        subprocess.run(["podman", "stop", "--time=5", self.name], capture_output=True, timeout=60, check=False)
        assert self.inspect()["State"]["Running"] is False

    def inspect(self) -> dict[str, Any]:
        out = subprocess.run(["podman", "inspect", self.name], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        return dict(json.loads(out)[0])

    def exec(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", "exec", self.name, *argv], capture_output=True, text=True, timeout=60)

    def remove(self) -> None:
        subprocess.run(["podman", "rm", "--force", "--time=0", self.name], capture_output=True, timeout=120,
                       check=False)


def assert_unprivileged(info: dict[str, Any], caps: Sequence[str] = ()) -> None:
    """What `podman inspect` says of an agent container: not privileged, only `caps`, no runtime socket."""
    host = info["HostConfig"]
    assert host["Privileged"] is False
    assert sorted(c.removeprefix("CAP_") for c in (info.get("EffectiveCaps") or [])) == sorted(caps)
    assert "no-new-privileges" in " ".join(host.get("SecurityOpt") or [])
    sources = [m.get("Source", "") for m in info.get("Mounts", [])]
    for sock in RUNTIME_SOCKETS:
        assert not any(s == sock or s == os.path.dirname(sock) for s in sources), f"{sock} is mounted"
    assert not any(s.endswith(".sock") for s in sources)
