"""safespawn-oci-runtime: put a Docker sidecar into its named network namespace, then exec runc.

Docker cannot join a named netns (`--network ns:/run/netns/X` gives "not found"). This program is
registered with dockerd as an OCI runtime (daemon.json `runtimes`, or `dockerd --add-runtime
safespawn=/usr/local/bin/safespawn-oci-runtime`); the Docker runtime of safespawn starts every sidecar
with `--runtime=safespawn --network=none` and names the netns in two environment variables of the
container, SAFESPAWN_NETNS and SAFESPAWN_PROFILE, which Docker writes into the bundle's config.json.

dockerd (through containerd's shim) runs it as root with runc's own command line:

    safespawn-oci-runtime --root R --log L --log-format json create --bundle B --pid-file P ID

For `create` (and `run`) it reads B/config.json and, as a checklist:
1. finds SAFESPAWN_NETNS and SAFESPAWN_PROFILE (each at most once) in the process environment;
2. checks the netns exactly as the policy checks a request's: the profile's pattern, a plain entry
   of the netns folder that is no link, a network namespace, not the host's own (policy.open_netns);
3. sets the path of the container's one network namespace entry to that open, checked file
   (/proc/PID/fd/N of this very process, which is runc once exec'd, so no rename can swap it);
4. adds nosuid,nodev,noexec to every bind mount (Docker's -v has no such options);
5. for a process that is not uid 0 (each channel's own sidecar uid), makes the capabilities Docker
   granted it (its bounding set: all Docker writes for a non-root user) effective, permitted,
   inheritable and ambient, as podman does for `--user`: otherwise the program has none after its
   execve ("dnsmasq: process is missing required capability NET_ADMIN");
6. writes config.json back atomically and execs runc with every argument untouched.
Every other subcommand (start, state, kill, delete, ...) is runc's at once. Nothing here adds a
device, a mount or a namespace, nor a capability outside the bounding set Docker wrote: the
container gets no more than Docker granted it.
A value that fails a check stops the create with an error; Docker then reports the start as failed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, NoReturn

ENV_NETNS = "SAFESPAWN_NETNS"
ENV_PROFILE = "SAFESPAWN_PROFILE"
ENV_RUNC = "SAFESPAWN_OCI_RUNC"  # in dockerd's environment, not the container's
RUNC_PATHS = ("/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc", "/usr/local/bin/runc")
# runc's global options that take a value (everything before the subcommand).
VALUED_GLOBALS = frozenset({"--root", "--log", "--log-format", "--criu", "--rootless"})
BIND_HARDENING = ("nosuid", "nodev", "noexec")
MAX_CONFIG_BYTES = 4 << 20
EXIT_REFUSED = 3
PROFILE_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,63}")


class Refused(Exception):
    """A config.json value this program will not pass on to runc."""


def runc_path() -> str:
    explicit = os.environ.get(ENV_RUNC)
    if explicit:
        return explicit
    for p in RUNC_PATHS:
        if os.access(p, os.X_OK):
            return p
    return "runc"


def parse_runc_argv(argv: list[str]) -> tuple[str | None, str | None, str | None]:
    """(subcommand, bundle dir, --log file) from runc's command line; bundle defaults to the cwd."""
    i, log = 0, None
    while i < len(argv):
        a = argv[i]
        if a in VALUED_GLOBALS:
            if a == "--log" and i + 1 < len(argv):
                log = argv[i + 1]
            i += 2
            continue
        if a.startswith("-"):
            if a.startswith("--log="):
                log = a.partition("=")[2]
            i += 1
            continue
        break
    if i >= len(argv):
        return None, None, log
    sub, rest = argv[i], argv[i + 1:]
    bundle = None
    for j, a in enumerate(rest):
        if a in ("--bundle", "-b") and j + 1 < len(rest):
            bundle = rest[j + 1]
        elif a.startswith("--bundle="):
            bundle = a.partition("=")[2]
    return sub, bundle or os.getcwd(), log


def _env_values(env: list[Any], key: str) -> list[str]:
    return [e.partition("=")[2] for e in env if isinstance(e, str) and e.partition("=")[0] == key]


def netns_fd(config: dict[str, Any]) -> int | None:
    """The checked, open netns the container names, or None if it names none."""
    from ..broker.policy import host_netns_ids, load_profile, open_netns
    from ..config import BrokerConfig, config_path, load_config
    from ..errors import ConfigError, SafespawnError

    process = config.get("process")
    env = process.get("env") if isinstance(process, dict) else None
    env = env if isinstance(env, list) else []
    names, profiles = _env_values(env, ENV_NETNS), _env_values(env, ENV_PROFILE)
    if not names and not profiles:
        return None
    # DENY: two values, so that runc and a reader of the environment could disagree on which counts.
    if len(names) != 1 or len(profiles) != 1:
        raise Refused(f"{ENV_NETNS} and {ENV_PROFILE} must each be given once")
    netns, profile_name = names[0], profiles[0]
    # DENY: a profile "name" that is a path would load a file of its choosing as the profile.
    if not PROFILE_NAME_RE.fullmatch(profile_name):
        raise Refused(f"{ENV_PROFILE} {profile_name[:40]!r} is not a profile name")
    try:
        broker = load_config().broker if config_path().exists() else BrokerConfig()
        profile = load_profile(profile_name, broker.profiles_dir)
        # DENY: a name outside the profile's pattern could be another service's namespace.
        if profile.netns == "forbidden" or profile.netns_pattern is None \
                or not profile.netns_pattern.fullmatch(netns):
            raise Refused(f"netns {netns[:80]!r} does not match the {profile.name} profile's pattern")
        return open_netns(str(broker.netns_dir), netns, host_netns_ids())
    except SafespawnError as e:
        raise Refused(e.message) from None
    except ConfigError as e:
        raise Refused(str(e)) from None


def rewrite(config: dict[str, Any], fd: int | None, pid: int) -> dict[str, Any]:
    """config.json with the netns joined, bind mounts hardened and, for a non-root process, its
    granted capabilities ambient; nothing else changes."""
    linux = config.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    if not isinstance(namespaces, list):
        raise Refused("config.json has no linux.namespaces list")
    net = [ns for ns in namespaces if isinstance(ns, dict) and ns.get("type") == "network"]
    # DENY: no network entry means the host's netns (--network host); a path means another
    # container's (--network container:X). A sidecar always starts from a fresh one of its own.
    if len(net) != 1 or net[0].get("path"):
        raise Refused("a container of this runtime must be created with --network=none")
    if fd is not None:
        net[0]["path"] = f"/proc/{pid}/fd/{fd}"
    mounts = config.get("mounts", [])
    if not isinstance(mounts, list):
        raise Refused("config.json mounts is not a list")
    for m in mounts:
        if not isinstance(m, dict):
            raise Refused("config.json has a mount that is not an object")
        opts = m.get("options") or []
        if not isinstance(opts, list):
            raise Refused("config.json has mount options that are not a list")
        if m.get("type") == "bind" or "bind" in opts or "rbind" in opts:
            # A sidecar never runs a program, a device or a set-uid file from a host folder.
            m["options"] = opts + [o for o in BIND_HARDENING if o not in opts]
    process = config.get("process")
    user = process.get("user") if isinstance(process, dict) else None
    caps = process.get("capabilities") if isinstance(process, dict) else None
    if isinstance(user, dict) and user.get("uid", 0) != 0 and isinstance(caps, dict):
        # Docker (20.10.14 on) writes only the bounding set for a non-root user: the capabilities
        # the container was granted (--cap-drop=ALL plus the profile's --cap-add).
        granted = [c for c in caps.get("bounding") or [] if isinstance(c, str)]
        # ALLOW: exactly the bounding set, as podman gives a --user process: nothing beyond it.
        for kind in ("effective", "permitted", "inheritable", "ambient"):
            caps[kind] = list(granted)
    return config


def _read_config(bundle: str) -> dict[str, Any]:
    fd = os.open(os.path.join(bundle, "config.json"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise Refused("config.json is too large")
    try:
        config = json.loads(data)
    except ValueError as e:
        raise Refused(f"config.json is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise Refused("config.json is not an object")
    return config


def _write_config(bundle: str, config: dict[str, Any]) -> None:
    path = os.path.join(bundle, "config.json")
    tmp = path + ".safespawn.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    os.rename(tmp, path)


def _refuse(message: str, log: str | None) -> NoReturn:
    text = f"safespawn-oci-runtime: refused: {message}"
    print(text, file=sys.stderr)
    if log:
        # containerd reports the last error of runc's JSON log as the reason the start failed.
        try:
            with open(log, "a") as f:
                f.write(json.dumps({"level": "error", "msg": text}) + "\n")
        except OSError:
            pass
    sys.exit(EXIT_REFUSED)


def main(argv: list[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    sub, bundle, log = parse_runc_argv(args)
    if sub in ("create", "run") and bundle is not None:
        try:
            config = _read_config(bundle)
            fd = netns_fd(config)
            if fd is not None:
                os.set_inheritable(fd, True)  # runc (this pid after exec) holds it while it creates
            _write_config(bundle, rewrite(config, fd, os.getpid()))
        except Refused as e:
            _refuse(str(e), log)
        except OSError as e:
            _refuse(f"bundle {bundle}: {e.strerror or e}", log)
    runc = runc_path()
    os.execv(runc, [runc, *args])  # noqa: S606 (runc with its own argv, no shell)


if __name__ == "__main__":
    main()
