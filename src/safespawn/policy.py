"""Host policy: every security decision about a request is made here, and only here.

A request chooses among what the host configured; it never adds to it.
- The **profile** (TOML shipped in the package, overridable in /etc/safespawn/profiles) fixes the
  program, its foreground command prefix, capabilities, netns pattern, signals, stop grace and an
  argument allowlist: every argument must match one rule (option + typed value).
- The **channel** fixes the image, the mounted data dirs and the quotas.
- The **netns** must fullmatch the profile's pattern, exist under /run/netns without links, be a
  network namespace, and not be the host's own.

Each branch carries an ALLOW or DENY comment naming the attack it stops.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import re
import stat
import tomllib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ChannelConfig, Config
from .errors import BadRequest, ConfigError, NotFound, PolicyDenied
from .request import SIGNALS, Request, has_control_char
from .sidecar import SidecarSpec, sidecar_name

NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: which kind of namespace it is
CLONE_NEWNET = 0x40000000
INTERFACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,14}")
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
DOMAIN_RE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)*\.?")
CAPABILITY_RE = re.compile(r"[A-Z_]{2,32}")
VALUE_TYPES = ("flag", "path", "interface", "uuid", "ip", "ipv4", "ipv6", "cidr", "int", "mac", "domain",
               "regex", "choice")
# DENY: capabilities that would let a sidecar escape its confinement or act on the host's processes.
FORBIDDEN_CAPS = frozenset({"SYS_ADMIN", "SYS_PTRACE", "SYS_MODULE", "SYS_RAWIO", "DAC_READ_SEARCH",
                            "SYS_BOOT", "MAC_ADMIN", "MAC_OVERRIDE", "BPF", "PERFMON", "SYS_TIME",
                            "MKNOD", "SYSLOG", "LINUX_IMMUTABLE", "AUDIT_CONTROL"})
# DENY with --pid host: these reach into every process on the host.
FORBIDDEN_WITH_PID_HOST = frozenset({"KILL", "SYS_PTRACE", "SYS_ADMIN", "SYS_NICE"})


@dataclass(frozen=True)
class ArgRule:
    option: str
    type: str = "flag"
    separate: bool = False  # the value is the next argument ("-f PATH") rather than "--opt=VALUE"
    pattern: re.Pattern[str] | None = None
    choices: tuple[str, ...] = ()
    min: int | None = None
    max: int | None = None
    also: tuple[str, ...] = ()  # literal values accepted besides the type (e.g. /dev/null)
    data_dir: bool = False  # a path rule that also accepts a data dir itself, not only paths inside

    def check_value(self, value: str, data_dirs: tuple[str, ...]) -> None:
        t = self.type
        ok = True
        if value in self.also:
            # ALLOW: a literal the profile names (dnsmasq --conf-file=/dev/null).
            return
        if t == "path":
            check_path(value, data_dirs, self.option, allow_root=self.data_dir)
            return
        if t == "interface":
            ok = bool(INTERFACE_RE.fullmatch(value))
        elif t == "uuid":
            ok = _is_uuid(value)
        elif t in ("ip", "ipv4", "ipv6"):
            ok = _is_ip(value, t)
        elif t == "cidr":
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                ok = False
        elif t == "int":
            ok = bool(re.fullmatch(r"-?[0-9]{1,10}", value))
            if ok:
                n = int(value)
                ok = (self.min is None or n >= self.min) and (self.max is None or n <= self.max)
        elif t == "mac":
            ok = bool(MAC_RE.fullmatch(value))
        elif t == "domain":
            ok = bool(DOMAIN_RE.fullmatch(value))
        elif t == "regex":
            ok = self.pattern is not None and bool(self.pattern.fullmatch(value))
        elif t == "choice":
            ok = value in self.choices
        if not ok:
            # DENY: a value outside its declared type could carry a second option or a file read.
            raise PolicyDenied(f"{self.option}: value {value[:80]!r} is not a valid {t}")


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except ValueError:
        return False


def _is_ip(value: str, kind: str) -> bool:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    return kind == "ip" or (kind == "ipv4") == (ip.version == 4)


def check_path(value: str, data_dirs: tuple[str, ...], option: str = "path", allow_root: bool = False) -> None:
    """A path argument must be absolute, normalized and inside one of the channel's data dirs.

    The sidecar only has the data dirs mounted, so this is defence in depth: even a path that got
    through would resolve inside the container, never on the host.
    """
    # DENY: control characters (a NUL would also make realpath() raise instead of refusing).
    if has_control_char(value):
        raise PolicyDenied(f"{option}: path contains a control character")
    # DENY: relative paths and '..' would be resolved against whatever the sidecar's cwd is.
    if not value.startswith("/") or os.path.normpath(value) != value or "//" in value:
        raise PolicyDenied(f"{option}: {value[:80]!r} is not a normalized absolute path")
    for root in data_dirs:
        # ALLOW: the data dir itself only where the profile says so (a state dir option such as
        # neutron-keepalived-state-change --state_path /var/lib/neutron); never a file option.
        if (allow_root and value == root.rstrip("/")) or value.startswith(root.rstrip("/") + "/"):
            break
    else:
        # DENY: reading or writing outside the data dirs (e.g. --conf-file=/etc/shadow).
        raise PolicyDenied(f"{option}: {value[:80]!r} is outside the channel's data dirs")
    # DENY: a symlinked folder inside the data dir that points out of it.
    real_root = os.path.realpath(root)
    real = os.path.realpath(value)
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise PolicyDenied(f"{option}: {value[:80]!r} resolves outside the channel's data dirs")


@dataclass(frozen=True)
class Profile:
    name: str
    command: tuple[str, ...]
    capabilities: tuple[str, ...]
    netns: str  # "required" | "optional" | "forbidden"
    netns_pattern: re.Pattern[str] | None
    signals: tuple[str, ...]
    stop_grace: int
    pid_host: bool
    read_only: bool
    tmpfs: tuple[str, ...]
    key_from: str  # "netns" or an option whose value names the sidecar
    # An option that names the netns in argv (neutron-keepalived-state-change --namespace NS):
    # its value must be the netns the sidecar joins.
    netns_option: str | None = None
    rules: dict[str, ArgRule] = field(default_factory=dict)
    description: str = ""

    def check_argv(self, argv: tuple[str, ...], data_dirs: tuple[str, ...]) -> dict[str, list[str]]:
        """Every argument must match one rule. Returns the options seen with their values."""
        seen: dict[str, list[str]] = {}
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            # DENY: positional arguments; the programs' own positional syntax is never needed.
            if not arg.startswith("-") or arg in ("-", "--"):
                raise PolicyDenied(f"argument {arg[:80]!r} is not an allowed option of {self.name}")
            rule = self.rules.get(arg)
            if rule is not None and rule.type == "flag":
                # ALLOW: a flag on the allowlist.
                seen.setdefault(arg, []).append("")
                continue
            if rule is not None and rule.separate:
                if i >= len(argv):
                    raise PolicyDenied(f"{arg} needs a value")
                value = argv[i]
                i += 1
                rule.check_value(value, data_dirs)
                seen.setdefault(arg, []).append(value)
                continue
            name, eq, value = arg.partition("=")
            rule = self.rules.get(name)
            if rule is None or not eq or rule.type == "flag" or rule.separate:
                # DENY: an option that is not on the allowlist (e.g. --dhcp-script, --conf-dir).
                raise PolicyDenied(f"option {name[:80]!r} is not allowed for {self.name}")
            rule.check_value(value, data_dirs)
            seen.setdefault(name, []).append(value)
        return seen


def _rule(option: str, t: dict[str, Any], where: str) -> ArgRule:
    t = dict(t)
    typ = t.pop("type", "flag")
    if typ not in VALUE_TYPES:
        raise ConfigError(f"{where}: unknown type {typ!r}")
    pattern = t.pop("pattern", None)
    if typ == "regex":
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}: type regex needs a pattern")
        try:
            compiled: re.Pattern[str] | None = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}: bad pattern: {e}") from None
    else:
        compiled = None
    rule = ArgRule(
        option=option,
        type=typ,
        separate=bool(t.pop("separate", False)),
        pattern=compiled,
        choices=tuple(t.pop("choices", ())),
        min=t.pop("min", None),
        max=t.pop("max", None),
        also=tuple(t.pop("also", ())),
        data_dir=bool(t.pop("data_dir", False)),
    )
    if t:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(t))}")
    if not option.startswith("-"):
        raise ConfigError(f"{where}: options start with '-'")
    return rule


def parse_profile(data: dict[str, Any], where: str) -> Profile:
    d = dict(data)
    try:
        name = d.pop("name")
        command = tuple(d.pop("command"))
    except KeyError as e:
        raise ConfigError(f"{where}: missing {e.args[0]}") from None
    caps = tuple(str(c).upper().removeprefix("CAP_") for c in d.pop("capabilities", []))
    for c in caps:
        if not CAPABILITY_RE.fullmatch(c) or c in FORBIDDEN_CAPS:
            raise ConfigError(f"{where}: capability {c!r} is not allowed for a sidecar")
    pid_host = bool(d.pop("pid_host", False))
    if pid_host and FORBIDDEN_WITH_PID_HOST.intersection(caps):
        raise ConfigError(f"{where}: {sorted(FORBIDDEN_WITH_PID_HOST.intersection(caps))} "
                          "are not allowed together with pid_host")
    netns = d.pop("netns", "required")
    if netns not in ("required", "optional", "forbidden"):
        raise ConfigError(f"{where}: netns must be required, optional or forbidden")
    pattern = d.pop("netns_pattern", None)
    if netns != "forbidden" and not pattern:
        raise ConfigError(f"{where}: netns_pattern is required unless netns = 'forbidden'")
    signals = tuple(d.pop("signals", ["TERM", "KILL"]))
    for s in signals:
        if s not in SIGNALS:
            raise ConfigError(f"{where}: unknown signal {s!r}")
    rules = {opt: _rule(opt, t, f"{where}.args.{opt}") for opt, t in d.pop("args", {}).items()}
    key_from = d.pop("key_from", "netns")
    netns_option = d.pop("netns_option", None)
    if netns_option is not None and (netns == "forbidden" or netns_option not in rules):
        raise ConfigError(f"{where}: netns_option names an option that is not in args, or netns is forbidden")
    if key_from != "netns" and key_from not in rules:
        raise ConfigError(f"{where}: key_from names an option that is not in args")
    if netns != "required" and key_from == "netns":
        raise ConfigError(f"{where}: a profile whose netns is not required needs key_from = OPTION")
    p = Profile(
        name=name,
        command=command,
        capabilities=caps,
        netns=netns,
        netns_pattern=re.compile(pattern) if pattern else None,
        signals=signals,
        stop_grace=int(d.pop("stop_grace", 10)),
        pid_host=pid_host,
        read_only=bool(d.pop("read_only", True)),
        tmpfs=tuple(d.pop("tmpfs", ["/run", "/tmp"])),
        key_from=key_from,
        netns_option=netns_option,
        rules=rules,
        description=str(d.pop("description", "")),
    )
    if d:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(d))}")
    if not p.command:
        raise ConfigError(f"{where}: command must not be empty")
    return p


def builtin_profile_names() -> list[str]:
    return sorted(f.name.removesuffix(".toml") for f in resources.files("safespawn.profiles").iterdir()
                  if f.name.endswith(".toml"))


def load_profile(name: str, override_dir: Path | None) -> Profile:
    """A profile from /etc/safespawn/profiles/NAME.toml if present, else the built-in one."""
    if override_dir is not None:
        path = override_dir / f"{name}.toml"
        if path.is_file():
            with open(path, "rb") as f:
                try:
                    return parse_profile(tomllib.load(f), str(path))
                except tomllib.TOMLDecodeError as e:
                    raise ConfigError(f"{path}: {e}") from None
    res = resources.files("safespawn.profiles").joinpath(f"{name}.toml")
    if not res.is_file():
        raise ConfigError(f"no profile named {name!r}")
    return parse_profile(tomllib.loads(res.read_text()), f"built-in profile {name}")


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def host_netns_ids() -> frozenset[tuple[int, int]]:
    """The network namespaces that are the host's own: PID 1's and the broker's."""
    return frozenset(i for i in (_ns_id("/proc/1/ns/net"), _ns_id("/proc/self/ns/net")) if i)


@dataclass(frozen=True)
class SignalDecision:
    signal: str
    action: str  # "deliver" | "stop" | "remove"


class Policy:
    """Turns requests into sidecar specs and signal decisions, or refuses them."""

    def __init__(self, config: Config, profiles: dict[str, Profile] | None = None,
                 host_ns: Iterable[tuple[int, int]] | None = None) -> None:
        self.config = config
        self.netns_dir = str(config.broker.netns_dir)
        self.host_ns = frozenset(host_netns_ids() if host_ns is None else host_ns)
        self.profiles: dict[str, Profile] = dict(profiles or {})
        if profiles is None:
            for ch in config.channels.values():
                for name in ch.profiles:
                    if name not in self.profiles:
                        self.profiles[name] = load_profile(name, config.broker.profiles_dir)

    def profile_for(self, channel: ChannelConfig, name: str | None) -> Profile:
        # DENY: a profile the host did not grant this channel, whatever else exists.
        if name is None or name not in channel.profiles:
            raise PolicyDenied(f"profile {str(name)[:40]!r} is not allowed in channel {channel.name}")
        return self.profiles[name]

    def check_netns(self, profile: Profile, netns: str | None) -> str | None:
        """Returns the netns path to join, after checking it as docs/security.md describes."""
        if netns is None:
            if profile.netns == "required":
                raise PolicyDenied(f"{profile.name} must run in a network namespace")
            return None
        if profile.netns == "forbidden":
            raise PolicyDenied(f"{profile.name} does not run in a network namespace")
        assert profile.netns_pattern is not None
        # DENY: a name outside the pattern could be another service's namespace.
        if not profile.netns_pattern.fullmatch(netns):
            raise PolicyDenied(f"netns {netns[:80]!r} does not match the {profile.name} profile's pattern")
        path = os.path.join(self.netns_dir, netns)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise BadRequest(f"netns {netns!r} does not exist") from None
        # DENY: a symlink could point at /proc/1/ns/net or any file on the host.
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise PolicyDenied(f"netns {netns!r} is not a network namespace mount")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise PolicyDenied(f"netns {netns!r} cannot be opened: {e.strerror}") from None
        try:
            fst = os.fstat(fd)
            try:
                nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
            except OSError:
                # DENY: a plain file under /run/netns is not a namespace.
                raise PolicyDenied(f"netns {netns!r} is not a namespace") from None
        finally:
            os.close(fd)
        if nstype != CLONE_NEWNET:
            raise PolicyDenied(f"netns {netns!r} is not a network namespace")
        # DENY: the host's own network namespace bind-mounted under an allowed name.
        if (fst.st_dev, fst.st_ino) in self.host_ns:
            raise PolicyDenied(f"netns {netns!r} is the host's own network namespace")
        return path

    def sidecar_key(self, profile: Profile, request: Request, seen: dict[str, list[str]]) -> str:
        if request.netns is not None:
            return request.netns
        values = seen.get(profile.key_from)
        if not values or len(set(values)) != 1:
            raise PolicyDenied(f"{profile.name} needs exactly one {profile.key_from} to name the sidecar")
        return "k" + hashlib.sha256(values[0].encode()).hexdigest()[:16]

    def authorize_start(self, channel: ChannelConfig, request: Request) -> SidecarSpec:
        profile = self.profile_for(channel, request.profile)
        seen = profile.check_argv(request.argv, channel.data_dirs)
        if profile.netns_option is not None:
            named = seen.get(profile.netns_option, [])
            # DENY: a program told to act on one namespace while it runs in another.
            if named != [request.netns]:
                raise PolicyDenied(f"{profile.netns_option} must be given once and name the sidecar's netns "
                                   f"({request.netns})")
        netns_path = self.check_netns(profile, request.netns)
        key = self.sidecar_key(profile, request, seen)
        # ALLOW: everything below comes from the profile and the channel; the request only chose
        # the profile, the (checked) netns and the (checked) arguments that follow the image.
        return SidecarSpec(
            name=sidecar_name(channel.name, profile.name, key),
            channel=channel.name,
            profile=profile.name,
            key=key,
            netns=request.netns,
            netns_path=netns_path,
            image=channel.image,
            entrypoint=profile.command,
            args=request.argv,
            capabilities=profile.capabilities,
            mounts=channel.data_dirs,
            tmpfs=profile.tmpfs,
            pid_host=profile.pid_host,
            read_only=profile.read_only,
            stop_grace=profile.stop_grace,
        )

    def target_name(self, channel: ChannelConfig, request: Request) -> str:
        """The sidecar a signal/stop by profile+netns names; only ever one of this channel's."""
        profile = self.profile_for(channel, request.profile)
        if request.netns is None:
            raise NotFound("a signal or stop by profile needs the netns (or give the pid)")
        if profile.netns_pattern is None or not profile.netns_pattern.fullmatch(request.netns):
            raise PolicyDenied(f"netns {request.netns[:80]!r} does not match the {profile.name} profile's pattern")
        return sidecar_name(channel.name, profile.name, request.netns)

    def authorize_signal(self, channel: ChannelConfig, profile_name: str, signal: str) -> SignalDecision:
        profile = self.profile_for(channel, profile_name)
        # DENY: a signal the profile does not list (e.g. USR1 to a program that dies on it).
        if signal not in profile.signals:
            raise PolicyDenied(f"signal {signal} is not allowed for {profile.name}")
        if signal == "KILL":
            return SignalDecision(signal, "remove")
        if signal in ("TERM", "INT", "QUIT"):
            return SignalDecision(signal, "stop")
        return SignalDecision(signal, "deliver")
