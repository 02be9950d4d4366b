"""The one runner of the podman and docker CLIs (runtime/command.py): every failure is a RuntimeFailed
that names the call, and the environment and timeout are the ones given."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from safespawn.config import parse_config
from safespawn.errors import RuntimeFailed
from safespawn.runtime.command import RuntimeCli


def _fake(tmp_path: Path, body: str) -> str:
    p = tmp_path / "fakecli"
    p.write_text(f"#!{sys.executable}\nimport os, sys, time\n{body}\n")
    p.chmod(0o755)
    return str(p)


def test_a_failing_call_names_the_cli_the_subcommand_and_the_last_lines_it_printed(tmp_path: Path) -> None:
    cli = RuntimeCli("podman", _fake(tmp_path, "print('a\\nb\\nc\\nd', file=sys.stderr); sys.exit(125)"))
    with pytest.raises(RuntimeFailed) as e:
        cli.output(["run", "x"])
    assert e.value.message == "podman run failed (rc 125): b c d"
    assert cli.call(["run", "x"], check=False).returncode == 125


def test_a_missing_cli_and_a_hung_one_are_runtime_failures(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailed, match="cannot run docker"):
        RuntimeCli("docker", str(tmp_path / "absent")).output(["ps"])
    with pytest.raises(RuntimeFailed, match=r"podman ps timed out after 0.2s"):
        RuntimeCli("podman", _fake(tmp_path, "time.sleep(5)"), timeout=0.2).output(["ps"])


def test_invalid_json_is_a_runtime_failure(tmp_path: Path) -> None:
    cli = RuntimeCli("podman", _fake(tmp_path, "print('{not json')"))
    with pytest.raises(RuntimeFailed, match="podman info printed invalid JSON"):
        cli.json(["info"])


def test_the_configured_docker_cli_gets_docker_host_and_stdin_closed(tmp_path: Path) -> None:
    fake = _fake(tmp_path, "print(os.environ.get('DOCKER_HOST'), sys.stdin.read() == '')")
    cfg = parse_config({"broker": {"runtime": "docker", "docker": fake, "docker_host": "unix:///run/x.sock",
                                   "podman_timeout": 7}})
    cli = RuntimeCli.configured(cfg.broker)
    assert (cli.kind, cli.argv0, cli.timeout) == ("docker", fake, 7)
    assert cli.output(["info"]).split() == ["unix:///run/x.sock", "True"]
