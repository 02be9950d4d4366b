"""check-config (and the broker at start: `sync`, `watch`) refuse data dirs that cannot be mounted
beside the sidecar's other mounts, naming the collision, instead of every start failing at request
time with `podman run failed (rc 125): Error: /tmp: duplicate mount destination`."""

from __future__ import annotations

from pathlib import Path

import pytest

from safespawn.broker.engine import Engine
from safespawn.broker.policy import Policy
from safespawn.cli import main
from safespawn.config import parse_config
from safespawn.errors import ConfigError, ExitCode


def write(tmp_path: Path, data_dirs: list[str], profiles: tuple[str, ...] = ("dnsmasq", "haproxy")) -> Path:
    p = tmp_path / "safespawn.toml"
    dirs = ", ".join(f'"{d}"' for d in data_dirs)
    profs = ", ".join(f'"{n}"' for n in profiles)
    p.write_text(f'[broker]\nchannels_dir = "{tmp_path}/c"\nstate_dir = "{tmp_path}/s"\n'
                 f'profiles_dir = "{tmp_path}/p"\n\n[channels.neutron-dhcp]\nimage = "localhost/x:1"\n'
                 f"profiles = [{profs}]\ndata_dirs = [{dirs}]\n")
    return p


@pytest.mark.parametrize(("data_dir", "words"), [
    ("/tmp", ["/tmp", "tmpfs", "dnsmasq", "duplicate mount destination"]),
    ("/run", ["/run", "tmpfs", "dnsmasq"]),
    ("/proc", ["/proc", "podman mounts"]),
    ("/sys/fs/x", ["/sys", "podman mounts"]),
    ("/dev", ["/dev", "podman mounts"]),
    ("/etc/hosts", ["/etc/hosts", "podman mounts"]),
])
def test_check_config_refuses_a_data_dir_that_collides_with_a_mount(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                     data_dir: str, words: list[str]) -> None:
    cfg = write(tmp_path, ["/var/lib/neutron", data_dir])
    assert main(["--config", str(cfg), "check-config"]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "configuration error" in err and "channels.neutron-dhcp.data_dirs" in err
    for w in words:
        assert w in err, (w, err)


def test_check_config_refuses_a_data_dir_listed_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(write(tmp_path, ["/var/lib/neutron", "/var/lib/neutron"])), "check-config"]) == 3
    assert "listed twice" in capsys.readouterr().err


def test_a_data_dir_below_a_tmpfs_or_beside_it_is_fine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # podman mounts /tmp first, then the volume inside it (measured: starts fine).
    cfg = write(tmp_path, ["/var/lib/neutron", "/tmp/neutron", "/var/tmp"])
    assert main(["--config", str(cfg), "check-config"]) == ExitCode.OK
    assert "OK" in capsys.readouterr().out


def test_the_collision_depends_on_the_channels_profiles(tmp_path: Path) -> None:
    # A profile without tmpfs (a custom one) can share /tmp with the host's data dir.
    prof = tmp_path / "p"
    prof.mkdir()
    (prof / "plain.toml").write_text('name = "plain"\ncommand = ["/bin/true"]\nnetns = "forbidden"\n'
                                     'key_from = "--key"\ntmpfs = []\n[args]\n"--key" = { type = "int" }\n')
    assert main(["--config", str(write(tmp_path, ["/tmp"], profiles=("plain",))), "check-config"]) == ExitCode.OK


def test_the_broker_refuses_to_start_with_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, ["/tmp"])
    for cmd in (["sync", "--all"], ["watch"], ["status"]):
        assert main(["--config", str(cfg), *cmd]) == ExitCode.CONFIG, cmd
        assert "collides with the tmpfs" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before laying anything out
    with pytest.raises(ConfigError):
        Engine(parse_config({"channels": {"x": {"image": "i:1", "profiles": ["dnsmasq"], "data_dirs": ["/tmp"]}}}))
    with pytest.raises(ConfigError):
        Policy(parse_config({"channels": {"x": {"image": "i:1", "profiles": ["radvd"], "data_dirs": ["/run"]}}}))
