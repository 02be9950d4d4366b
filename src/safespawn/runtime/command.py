"""The container runtime's command line, called one way by everyone: the runtimes (podman.py,
docker.py), the cgroup host detection, adopt and doctor.

An argv list after the CLI's path (never a shell string), stdin closed, output captured, an explicit
timeout, the environment given (podman's without $INVOCATION_ID: conmon.py; docker's with the
configured DOCKER_HOST). Every failure to run it is a RuntimeFailed saying which call failed:

    cli = RuntimeCli("podman", "/usr/bin/podman", timeout=60)
    cli.output(["ps", "--all", "--format=json"])          # its stdout; RuntimeFailed unless rc 0
    cli.call(["rm", "--force", "--", name], check=False)  # the CompletedProcess: the caller reads rc
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import RuntimeFailed

if TYPE_CHECKING:
    from ..config import BrokerConfig


def docker_env(docker_host: str) -> dict[str, str]:
    """This process's environment, with `[broker] docker_host` as DOCKER_HOST when it names one."""
    env = dict(os.environ)
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    return env


class RuntimeCli:
    """`kind` ("podman" or "docker") names the CLI in messages; `argv0` is the program run; `env`
    None runs it with this process's environment."""

    def __init__(self, kind: str, argv0: str, timeout: float = 60, env: Mapping[str, str] | None = None) -> None:
        self.kind, self.argv0, self.timeout = kind, argv0, timeout
        self.env = dict(env) if env is not None else None

    @classmethod
    def configured(cls, broker: BrokerConfig, podman_env: Mapping[str, str] | None = None) -> RuntimeCli:
        """The CLI `[broker] runtime` names, with its path, per-call timeout and, for docker, the
        configured DOCKER_HOST; `podman_env` for podman (None: this process's environment)."""
        if broker.runtime == "docker":
            return cls("docker", broker.docker, broker.podman_timeout, docker_env(broker.docker_host))
        return cls("podman", broker.podman, broker.podman_timeout, podman_env)

    def call(self, args: Sequence[str], timeout: float | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `argv0 ARGS`; with `check`, a non-zero exit is a RuntimeFailed with the last lines of
        what it printed."""
        limit = timeout or self.timeout
        try:
            p = subprocess.run([self.argv0, *args], capture_output=True, text=True, timeout=limit, check=False,
                               stdin=subprocess.DEVNULL, env=self.env)
        except subprocess.TimeoutExpired:
            raise RuntimeFailed(f"{self.kind} {args[0]} timed out after {limit}s") from None
        except OSError as e:
            raise RuntimeFailed(f"cannot run {self.kind}: {e}") from None
        if check and p.returncode != 0:
            err = (p.stderr.strip() or p.stdout.strip()).splitlines()
            raise RuntimeFailed(f"{self.kind} {args[0]} failed (rc {p.returncode}): {' '.join(err[-3:])[:500]}")
        return p

    def output(self, args: Sequence[str], timeout: float | None = None) -> str:
        """The stdout of a call that must succeed."""
        return self.call(args, timeout).stdout

    def json(self, args: Sequence[str], timeout: float | None = None) -> Any:
        """The JSON a call that must succeed prints (an empty output is null)."""
        out = self.output(args, timeout)
        try:
            return json.loads(out) if out.strip() else None
        except ValueError as e:
            raise RuntimeFailed(f"{self.kind} {args[0]} printed invalid JSON: {e}") from None
