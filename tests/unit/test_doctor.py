"""`safespawn doctor` without a configuration checks the host anyway and says how to start one; the
example configuration it prints passes check-config. (podman itself is asked by `doctor`: these
tests read what it says, they do not need a working podman.)"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from safespawn.broker.policy import Policy, confinement_warnings
from safespawn.cli import example_config, main
from safespawn.config import parse_config
from safespawn.errors import ExitCode
from safespawn.ops.doctor import cgroup_layout


def test_the_example_config_passes_check_config_without_a_warning(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--example-config"]) == ExitCode.OK
    printed = capsys.readouterr().out
    assert printed == example_config() and "[channels.neutron-dhcp]" in printed
    cfg = tmp_path / "safespawn.toml"
    cfg.write_text(printed)
    rc = main(["--config", str(cfg), "check-config"])
    out, err = capsys.readouterr()
    # The runtime CLI is the one host check check-config makes; everything else is the file's.
    assert "configuration error" not in err and "WARNING" not in err, err
    assert rc == ExitCode.OK or "podman found" in err, (out, err)
    policy = Policy(parse_config(tomllib.loads(printed)))
    assert confinement_warnings(policy.config, policy) == []


def test_doctor_without_a_config_checks_the_host_and_says_how_to_start(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "etc" / "safespawn.toml"
    rc = main(["--config", str(missing), "doctor"])
    out = capsys.readouterr().out
    assert f"no configuration file at {missing}" in out
    for line in ("runtime podman:", "cgroups: ", "systemd is ", "network namespaces", "ip (iproute2)",
                 "images: none configured yet"):
        assert line in out, out
    assert f"safespawn doctor --example-config > {missing}" in out
    assert rc == (ExitCode.FAILED if "\nFAIL " in "\n" + out else ExitCode.OK)
    assert not missing.exists() and not missing.parent.exists()  # a check writes nothing


def test_doctor_with_a_broken_config_reports_the_config_not_the_host(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "safespawn.toml"
    cfg.write_text("[broker]\nbogus = 1\n")
    assert main(["--config", str(cfg), "doctor"]) == ExitCode.CONFIG
    out, err = capsys.readouterr()
    assert "unknown keys bogus" in err and "cgroups:" not in out


def test_doctor_with_the_example_config_creates_no_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = example_config().replace("/var/lib/safespawn", str(tmp_path / "lib"))
    cfg = tmp_path / "safespawn.toml"
    cfg.write_text(text)
    main(["--config", str(cfg), "doctor"])
    out = capsys.readouterr().out
    assert "image localhost/neutron-sidecars:latest present" in out and "state dir of neutron-dhcp not created" in out
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize(("files", "layout"), [
    (["cgroup.controllers"], "v2"),
    (["unified/cgroup.procs", "memory/", "systemd/"], "v1 hybrid"),
    (["memory/", "systemd/"], "v1"),
    ([], "unknown"),
])
def test_the_cgroup_layout_is_told_apart(tmp_path: Path, files: list[str], layout: str) -> None:
    for f in files:
        p = tmp_path / f
        if f.endswith("/"):
            p.mkdir(parents=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("")
    assert cgroup_layout(str(tmp_path)) == layout


def test_this_host_cgroup_layout_is_known() -> None:
    assert cgroup_layout() != "unknown" or not os.path.isdir("/sys/fs/cgroup")
