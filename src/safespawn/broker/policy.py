"""Host policy: every decision about what a request may do is made here.

There is one gate, `Policy.decide`: it takes a request together with what the channel has now (a
`ChannelView`: its containers and its desired sidecars) and returns a typed decision -- `Start(spec)`,
`Signal(target, signal)`, `Stop(target, grace)`, `Remove(target)` -- or raises a `SafespawnError`
that becomes the refusal. The engine only carries decisions out. Around the gate, also here:
`judge_id` (replays and id collisions against the ledger), `flood_excess` (max_pending),
`Policy.authorize_respawn` (reconcile: is a desired sidecar still allowed?) and
`Policy.verify_started` (after the start: not in the host's netns).

A request chooses among what the host configured; it never adds to it.
- The **profile** (TOML shipped in the package, overridable in /etc/safespawn/profiles) fixes the
  program, its foreground command prefix, capabilities, netns pattern, signals, stop grace and an
  argument allowlist: every argument must match one rule (option + typed value).
- The **channel** fixes the image, the mounted data dirs and the quotas.
- The **netns** must fullmatch the profile's pattern, exist under /run/netns without links, be a
  network namespace, and not be the host's own.
- **Pid files** the profile declares are the host's to write (host pids): the program gets a
  private path in its own /run instead (`Profile.private_pid_args`).
- The **uid** a sidecar runs as is the channel's own (config.ChannelConfig.sidecar_user: allocated,
  never 0 unless configured), without SETUID/SETGID; files the program writes are handed to it
  (`writable_files`), options that switch users are left out (`user_options`); a profile with
  `run_as = "agent"` runs as the agent's uid (`sidecar_user`).
- A **pid** in a signal or stop reaches a sidecar only if it is the sidecar's main process or a
  process of that sidecar's own pid namespace (`sidecar_for_pid`).

Each branch carries an ALLOW or DENY comment naming the attack it stops.

Decided elsewhere, where the data is: whether an inbox entry may be read (inbox.py), whether the
bytes are a request (request.py), whether a recorded pid still names the sidecar (pidsignal.py),
where a pid file may be written (pidfiles.py); and in engine.py, that a run is flooded (before
`flood_excess` picks the requests to refuse), the per-run bound `max_requests_per_run`, that a
container of another channel under a sidecar's name is never replaced, and that a start whose
program exited is a failure. docs/architecture.md lists each.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import ChannelConfig, Config
from ..errors import BadRequest, ConfigError, Interrupted, NotFound, PolicyDenied, QuotaExceeded
from . import pidfiles
from .budget import parse_size
from .request import SIGNALS, Request, has_control_char
from .sidecar import LABEL_PROFILE, Container, SidecarSpec, sidecar_name
from .state import DesiredSidecar, LedgerEntry

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

    def check_value(self, value: str, data_dirs: tuple[str, ...], resolve: bool = True) -> None:
        t = self.type
        ok = True
        if value in self.also:
            # ALLOW: a literal the profile names (dnsmasq --conf-file=/dev/null).
            return
        if t == "path":
            check_path(value, data_dirs, self.option, allow_root=self.data_dir, resolve=resolve)
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
        import uuid  # imported here: uuid pulls in platform, which only a uuid check should pay for

        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except ValueError:
        return False


def _is_ip(value: str, kind: str) -> bool:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    return kind == "ip" or (kind == "ipv4") == (ip.version == 4)


def check_path(value: str, data_dirs: tuple[str, ...], option: str = "path", allow_root: bool = False,
               resolve: bool = True) -> None:
    """A path argument must be absolute, normalized and inside one of the channel's data dirs.

    The sidecar only has the data dirs mounted, so this is defence in depth: even a path that got
    through would resolve inside the container, never on the host. `resolve=False` skips the one
    check that depends on the filesystem (symlinks), for what only needs the spec as configured.
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
    if not resolve:
        return
    # DENY: a symlinked folder inside the data dir that points out of it.
    real_root = os.path.realpath(root)
    real = os.path.realpath(value)
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise PolicyDenied(f"{option}: {value[:80]!r} resolves outside the channel's data dirs")


DEFAULT_MEMORY = 128 << 20
DEFAULT_CPUS = 0.5
DEFAULT_PIDS = 128
DEFAULT_OOM_SCORE_ADJ = 500
# podman refuses less than 6 MiB; a sidecar's limit above this is no limit worth the name.
MIN_MEMORY, MAX_MEMORY = 8 << 20, 64 << 30


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
    # option -> "main" (the sidecar's main process) | "child" (its first child: keepalived's VRRP
    # process); the host writes these files with host pids, the program writes a private copy.
    pid_files: dict[str, str] = field(default_factory=dict)
    # Per-sidecar limits (docs/security.md, "Resource exhaustion"); the defaults bound a profile
    # that names none.
    memory: int = DEFAULT_MEMORY
    cpus: float = DEFAULT_CPUS
    pids_limit: int = DEFAULT_PIDS
    oom_score_adj: int = DEFAULT_OOM_SCORE_ADJ
    # Path options naming files the program itself writes (dnsmasq's lease file): before a start
    # the host makes each one a plain file owned by the sidecar's uid (pidfiles.hand_over_file),
    # so an unprivileged sidecar can write it in a directory the (root) agent owns.
    writable_files: tuple[str, ...] = ()
    # Options (with their value) that tell the program to switch to a user (radvd -u USER): an
    # unprivileged sidecar cannot switch (no SETUID/SETGID) and need not, so they are left out.
    user_options: tuple[str, ...] = ()
    # "channel": the channel's sidecar uid (the default). "agent": the agent's own uid:gid, for a
    # program that must use the agent's private files (the state-change monitor connects to the
    # agent's unix socket); with a root agent that is uid 0, which check-config reports.
    run_as: str = "channel"
    # "channel": the sidecar's gid is the channel's (the default). "agent": its uid stays the
    # channel's own but its gid is the agent's, for a program that connects to a socket the agent
    # makes group-writable (haproxy: Neutron's metadata socket, metadata_proxy_socket_mode = group).
    group: str = "channel"

    def without_user_options(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        """argv (already checked) minus the user_options and their values."""
        out: list[str] = []
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            if arg in self.user_options and self.rules[arg].separate:
                i += 1
            elif arg.partition("=")[0] not in self.user_options:
                out.append(arg)
        return tuple(out)

    def private_pid_args(self, argv: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
        """argv with each pid-file value replaced by a private path in the sidecar's own /run, and
        the (requested path, what it holds) pairs the host writes instead. argv is already checked.

        The program's own write (its namespace pid, e.g. 1) then never reaches the agent's data dir.
        """
        out: list[str] = []
        files: list[tuple[str, str]] = []
        options: list[str] = []
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            name, eq, value = arg.partition("=")
            if arg in self.pid_files and self.rules[arg].separate and i < len(argv):
                options.append(arg)
                files.append((argv[i], self.pid_files[arg]))
                out += [arg, _private_pid_path(arg, argv[i])]
                i += 1
            elif eq and name in self.pid_files and not self.rules[name].separate:
                options.append(name)
                files.append((value, self.pid_files[name]))
                out.append(f"{name}={_private_pid_path(name, value)}")
            else:
                out.append(arg)
        # DENY: a pid-file option given twice, or two options naming one file: the host would
        # keep writing a file the program does not use, or two truths into one file.
        if len(set(options)) != len(options) or len({f for f, _ in files}) != len(files):
            raise PolicyDenied(f"each pid-file option of {self.name} may be given once, naming distinct files")
        return tuple(out), tuple(files)

    # An option (a path) naming the pid file the program writes once its start-up is over (dnsmasq
    # writes it after opening its sockets and lease file): the broker waits for that file instead of
    # the fixed start settle. None: the fixed settle.
    ready_pid_file: str | None = None

    def pid_file(self, args: tuple[str, ...]) -> str | None:
        """The value of `ready_pid_file` in checked arguments (the last one wins, as in the programs)."""
        opt = self.ready_pid_file
        if opt is None:
            return None
        rule = self.rules[opt]
        found = None
        for i, a in enumerate(args):
            if rule.separate and a == opt and i + 1 < len(args):
                found = args[i + 1]
            elif not rule.separate and a.startswith(opt + "="):
                found = a[len(opt) + 1:]
        return found

    def check_argv(self, argv: tuple[str, ...], data_dirs: tuple[str, ...],
                   resolve: bool = True) -> dict[str, list[str]]:
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
                rule.check_value(value, data_dirs, resolve)
                seen.setdefault(arg, []).append(value)
                continue
            name, eq, value = arg.partition("=")
            rule = self.rules.get(name)
            if rule is None or not eq or rule.type == "flag" or rule.separate:
                # DENY: an option that is not on the allowlist (e.g. --dhcp-script, --conf-dir).
                raise PolicyDenied(f"option {name[:80]!r} is not allowed for {self.name}")
            rule.check_value(value, data_dirs, resolve)
            seen.setdefault(name, []).append(value)
        return seen


def _private_pid_path(option: str, requested: str) -> str:
    """Where the program writes its own pid file: its private /run tmpfs, never the data dir.

    The name keeps the requested file's name: Neutron's liveness check looks for the resource's
    uuid in /proc/PID/cmdline, and for some programs (the state-change monitor: ROUTER.monitor.pid)
    the pid file's name is the only place the uuid appears.
    """
    base = os.path.basename(requested)
    # DENY: a name that would not fit in one directory entry with the prefix.
    if not base or len(base) > 200:
        raise PolicyDenied(f"pid file name {base[:80]!r} is empty or longer than 200 characters")
    return "/run/safespawn" + re.sub(r"[^A-Za-z0-9]+", "-", option) + "-" + base


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


def _limits(d: dict[str, Any], where: str) -> dict[str, Any]:
    """The profile's memory, cpus, pids_limit and oom_score_adj, checked: a bad value is a
    ConfigError, never a sidecar without a limit."""
    out: dict[str, Any] = {}
    if "memory" in d:
        try:
            out["memory"] = parse_size(d.pop("memory"))
        except ValueError as e:
            raise ConfigError(f"{where}.memory: {e}") from None
        if not MIN_MEMORY <= out["memory"] <= MAX_MEMORY:
            raise ConfigError(f"{where}.memory: from 8m to 64g")
    if "cpus" in d:
        v = d.pop("cpus")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.01 <= v <= 64:
            raise ConfigError(f"{where}.cpus: a number of CPUs from 0.01 to 64")
        out["cpus"] = round(float(v), 2)
    if "pids_limit" in d:
        v = d.pop("pids_limit")
        if isinstance(v, bool) or not isinstance(v, int) or not 8 <= v <= 65536:
            raise ConfigError(f"{where}.pids_limit: an integer from 8 to 65536")
        out["pids_limit"] = v
    if "oom_score_adj" in d:
        v = d.pop("oom_score_adj")
        # DENY: a negative value would make the OOM killer spare a sidecar over host processes.
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1000:
            raise ConfigError(f"{where}.oom_score_adj: an integer from 0 to 1000 (never below the host's 0)")
        out["oom_score_adj"] = v
    return out


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
    ready_pid_file = d.pop("ready_pid_file", None)
    if ready_pid_file is not None and (ready_pid_file not in rules or rules[ready_pid_file].type != "path"):
        raise ConfigError(f"{where}: ready_pid_file names an option that is not a path in args")
    if key_from != "netns" and key_from not in rules:
        raise ConfigError(f"{where}: key_from names an option that is not in args")
    if netns != "required" and key_from == "netns":
        raise ConfigError(f"{where}: a profile whose netns is not required needs key_from = OPTION")
    pid_files = d.pop("pid_files", {})
    if not isinstance(pid_files, dict):
        raise ConfigError(f"{where}: pid_files must be a table of option = \"main\" | \"child\"")
    for opt, kind in pid_files.items():
        if opt not in rules or rules[opt].type != "path":
            raise ConfigError(f"{where}.pid_files: {opt!r} is not a path option in args")
        if kind not in ("main", "child"):
            raise ConfigError(f"{where}.pid_files.{opt}: must be \"main\" or \"child\"")
    writable = tuple(d.pop("writable_files", []))
    for opt in writable:
        if opt not in rules or rules[opt].type != "path" or rules[opt].data_dir or opt in pid_files:
            raise ConfigError(f"{where}.writable_files: {opt!r} is not a file path option in args (nor a pid file)")
    user_options = tuple(d.pop("user_options", []))
    for opt in user_options:
        if opt not in rules or rules[opt].type == "flag":
            raise ConfigError(f"{where}.user_options: {opt!r} is not an option with a value in args")
    run_as = d.pop("run_as", "channel")
    if run_as not in ("channel", "agent"):
        raise ConfigError(f"{where}: run_as must be \"channel\" or \"agent\"")
    group = d.pop("group", "channel")
    if group not in ("channel", "agent"):
        raise ConfigError(f"{where}: group must be \"channel\" or \"agent\"")
    tmpfs = tuple(d.pop("tmpfs", ["/run", "/tmp"]))
    if pid_files and "/run" not in tmpfs:
        raise ConfigError(f"{where}: pid_files needs /run in tmpfs (the program's private pid file goes there)")
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
        tmpfs=tmpfs,
        key_from=key_from,
        netns_option=netns_option,
        rules=rules,
        description=str(d.pop("description", "")),
        pid_files=dict(pid_files),
        ready_pid_file=ready_pid_file,
        **_limits(d, where),
        writable_files=writable,
        user_options=user_options,
        run_as=run_as,
        group=group,
    )
    if d:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(d))}")
    if not p.command:
        raise ConfigError(f"{where}: command must not be empty")
    return p


def builtin_profile_names() -> list[str]:
    return sorted(f.name.removesuffix(".toml") for f in resources.files("safespawn.broker.profiles").iterdir()
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
    res = resources.files("safespawn.broker.profiles").joinpath(f"{name}.toml")
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


def open_netns(netns_dir: str, netns: str, host_ns: Iterable[tuple[int, int]]) -> int:
    """Open the named netns under `netns_dir` and return the fd, after checking it is one to join.

    The caller has already matched `netns` against a profile's pattern. Used by the policy for
    every request, and by the OCI runtime (ociruntime.py) again at the moment Docker creates the
    container, so that both sides apply the very same checks.
    """
    # DENY: a name that is a path: only a plain entry of the netns folder may be joined.
    if not netns or "/" in netns or netns in (".", "..") or has_control_char(netns):
        raise PolicyDenied(f"netns {netns[:80]!r} is not a plain name")
    path = os.path.join(netns_dir, netns)
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
        if nstype != CLONE_NEWNET:
            raise PolicyDenied(f"netns {netns!r} is not a network namespace")
        # DENY: the host's own network namespace bind-mounted under an allowed name.
        if (fst.st_dev, fst.st_ino) in frozenset(host_ns):
            raise PolicyDenied(f"netns {netns!r} is the host's own network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class SignalDecision:
    signal: str
    action: str  # "deliver" | "stop" | "remove"


# -- the gate's vocabulary -----------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Run (or keep running, if the same spec already runs) this sidecar."""

    spec: SidecarSpec

    @property
    def target(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Signal:
    """Deliver a signal to a running sidecar (HUP, USR1, ...); the container stays."""

    target: str
    signal: str


@dataclass(frozen=True)
class Stop:
    """Stop the sidecar gracefully (TERM, INT, QUIT, or a stop request) and remove it."""

    target: str
    grace: int


@dataclass(frozen=True)
class Remove:
    """Remove the sidecar at once (KILL)."""

    target: str


Decision = Start | Signal | Stop | Remove


@dataclass
class ChannelView:
    """What a channel has now, as the gate sees it: its containers by name and its desired sidecars.

    `Policy.decide` records each decision it allows in `desired`, so that the next request of the
    same batch sees it (the quota counts a start just allowed; a stop after a start finds it).
    """

    containers: Mapping[str, Container]
    desired: set[str]
    by_pid: dict[int, Container] = field(init=False)

    def __post_init__(self) -> None:
        self.by_pid = {c.pid: c for c in self.containers.values() if c.running}

    def record(self, decision: Decision) -> None:
        if isinstance(decision, Start):
            self.desired.add(decision.target)
        elif isinstance(decision, Stop | Remove):
            self.desired.discard(decision.target)


class IdVerdict(enum.Enum):
    NEW = "new"  # never seen: go on
    INTERRUPTED = "interrupted"  # claimed before a crash, same bytes: go on, but never repeat a delivery
    REPLAY = "replay"  # answered, same bytes: republish the first reply, act on nothing
    ANSWERED = "answered"  # answered, other bytes (or unreadable now): keep the first reply


def judge_id(prior: LedgerEntry | None, digest: str | None) -> IdVerdict:
    """What the ledger's record of an id means for a request carrying it (digest None: unreadable)."""
    if prior is None:
        return IdVerdict.NEW
    if prior.state == "done":
        # ALLOW: a replay (the host crashed after replying, before removing the request).
        if digest is not None and digest == prior.digest and prior.reply is not None:
            return IdVerdict.REPLAY
        # DENY: a different request reusing an answered id must not overwrite its reply.
        return IdVerdict.ANSWERED
    if prior.state == "claimed" and prior.digest == digest:
        return IdVerdict.INTERRUPTED
    return IdVerdict.NEW


def flood_excess(channel: ChannelConfig, ids: Sequence[str | None], known: Iterable[str]) -> list[int]:
    """Indexes (into `ids`, oldest first) of the pending requests to refuse with `quota`.

    DENY: a flood; everything beyond the channel's max_pending newest-last is refused cheaply. An id
    the ledger knows (answered, or claimed before a crash) keeps its normal path: a replay or an
    interrupted request must still get its one reply.
    """
    known = set(known)
    return [i for i in range(channel.max_pending, len(ids)) if ids[i] is None or ids[i] not in known]


# Where podman itself mounts something in every container: a data dir there either fails at
# `podman run` (/etc/hosts: not a directory; /dev: crun cannot open /dev/null) or hides what the
# program needs (/proc, /sys).
RUNTIME_MOUNT_TREES = ("/proc", "/sys", "/dev")
RUNTIME_MOUNT_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv")


def check_mounts(channel: ChannelConfig, profiles: Mapping[str, Profile]) -> None:
    """A channel's data dirs must be mountable beside every mount its sidecars get.

    Raises ConfigError naming the collision; otherwise every start would fail at request time, e.g.
    `podman run failed (rc 125): Error: /tmp: duplicate mount destination` for data_dirs = ["/tmp"]
    (the profiles mount a tmpfs on /tmp).
    """
    where = f"channels.{channel.name}.data_dirs"
    seen: set[str] = set()
    for d in channel.data_dirs:
        if d in seen:
            raise ConfigError(f"{where}: {d} is listed twice")
        seen.add(d)
        for tree in RUNTIME_MOUNT_TREES:
            if d == tree or d.startswith(tree + "/"):
                raise ConfigError(f"{where}: {d} collides with {tree}, which podman mounts in every container")
        if d in RUNTIME_MOUNT_FILES:
            raise ConfigError(f"{where}: {d} collides with the file podman mounts there in every container")
        for name in channel.profiles:
            p = profiles.get(name)
            if p is not None and d in p.tmpfs:
                raise ConfigError(f"{where}: {d} collides with the tmpfs the {name} profile mounts at {d} "
                                  "(podman would refuse every start: duplicate mount destination); "
                                  "use a directory below it, e.g. a dedicated /var/lib/... directory")


class Policy:
    """Turns requests into sidecar specs and signal decisions, or refuses them.

    Building one validates the configuration it will enforce: every profile the channels name
    loads, and every channel's data dirs can be mounted beside its profiles' mounts (`check_mounts`).
    """

    def __init__(self, config: Config, profiles: dict[str, Profile] | None = None,
                 host_ns: Iterable[tuple[int, int]] | None = None) -> None:
        self.config = config
        self.netns_dir = str(config.broker.netns_dir)
        self.host_ns = frozenset(host_netns_ids() if host_ns is None else host_ns)
        self.profiles: dict[str, Profile] = dict(profiles or {})
        # configured_spec's answers: a pure function of the configuration, which a Policy never changes.
        self._configured: dict[tuple[str, str | None, str | None, tuple[str, ...]], SidecarSpec] = {}
        if profiles is None:
            for ch in config.channels.values():
                for name in ch.profiles:
                    if name not in self.profiles:
                        self.profiles[name] = load_profile(name, config.broker.profiles_dir)
        for ch in config.channels.values():
            check_mounts(ch, self.profiles)
            check_budget(ch, self.profiles)

    def profile_for(self, channel: ChannelConfig, name: str | None) -> Profile:
        # DENY: a profile the host did not grant this channel, whatever else exists.
        if name is None or name not in channel.profiles:
            raise PolicyDenied(f"profile {str(name)[:40]!r} is not allowed in channel {channel.name}")
        return self.profiles[name]

    # -- the gate --------------------------------------------------------------------------------

    def decide(self, channel: ChannelConfig, request: Request, view: ChannelView,
               interrupted: bool = False) -> Decision:
        """The one gate: what to do for `request`, given what the channel has now, or the refusal.

        `interrupted`: the ledger shows this request was claimed before a crash, so whatever the
        first attempt did may already have happened. The decision is recorded in `view`.
        """
        decision: Decision
        if request.op == "start":
            spec = self.authorize_start(channel, request)
            # DENY: a new sidecar beyond the channel's quota (a replaced one does not count twice).
            if spec.name not in view.desired and len(view.desired) >= channel.max_sidecars:
                raise QuotaExceeded(f"channel {channel.name} already runs {channel.max_sidecars} sidecars")
            decision = Start(spec)
        else:
            target, profile = self._target(channel, request, view)
            if request.op == "stop":
                decision = Stop(target, profile.stop_grace)
            else:
                assert request.signal is not None  # parse_request guarantees it for op "signal"
                decision = self._signal(channel, profile, target, request.signal, view, interrupted)
        view.record(decision)
        return decision

    def _target(self, channel: ChannelConfig, request: Request, view: ChannelView) -> tuple[str, Profile]:
        """The sidecar a signal or stop names (by pid, or by profile + netns), and its profile."""
        if request.pid is not None:
            # The sidecar's main pid, or any process of its own pid namespace (sidecar_for_pid).
            main = sidecar_for_pid(request.pid, view.by_pid)
            c = view.by_pid.get(main) if main is not None else None
            # DENY: a pid that is not one of this channel's running sidecars (a host process,
            # another channel's sidecar, a pid reused after a sidecar died), or whose profile is not
            # the one the request names.
            if c is None or (request.profile is not None and c.labels.get(LABEL_PROFILE) != request.profile):
                raise NotFound(f"no sidecar of channel {channel.name} has pid {request.pid}")
            # DENY: a sidecar of a profile this channel is no longer granted.
            return c.name, self.profile_for(channel, c.labels.get(LABEL_PROFILE, ""))
        target = self.target_name(channel, request)
        if target not in view.containers and target not in view.desired:
            raise NotFound(f"no sidecar {target}")
        return target, self.profile_for(channel, request.profile)

    def _signal(self, channel: ChannelConfig, profile: Profile, target: str, signal: str, view: ChannelView,
                interrupted: bool) -> Decision:
        d = self.authorize_signal(channel, profile.name, signal)
        if d.action == "remove":
            return Remove(target)
        if d.action == "stop":
            return Stop(target, profile.stop_grace)
        c = view.containers.get(target)
        if c is None or not c.running:
            raise NotFound(f"sidecar {target} is not running")
        if interrupted:
            # DENY (at most once): the broker died while delivering; it may have been delivered.
            raise Interrupted("the broker was interrupted while delivering this signal; "
                              "it may or may not have been delivered")
        return Signal(target, d.signal)

    def verify_started(self, pid: int) -> None:
        """After the start: the sidecar's process must not be in the host's network namespace.

        DENY: the netns was swapped for the host's between the check and the start.
        """
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            return  # not visible from here (no shared pid namespace): podman joined the path we checked
        if (st.st_dev, st.st_ino) in self.host_ns:
            raise PolicyDenied("the sidecar ended up in the host's network namespace; removed")

    def check_netns(self, profile: Profile, netns: str | None, resolve: bool = True) -> str | None:
        """Returns the netns path to join, after checking it as docs/security.md describes
        (`resolve=False`: only the name, not what is there now)."""
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
        if resolve:
            os.close(open_netns(self.netns_dir, netns, self.host_ns))
        return os.path.join(self.netns_dir, netns)

    def key_for(self, profile: Profile, netns: str | None, seen: dict[str, list[str]]) -> str:
        """The key a start's sidecar is named by (`sidecar.sidecar_name`): its netns, or a hash of the one
        value of the profile's `key_from` option."""
        if netns is not None:
            return netns
        values = seen.get(profile.key_from)
        if not values or len(set(values)) != 1:
            raise PolicyDenied(f"{profile.name} needs exactly one {profile.key_from} to name the sidecar")
        return "k" + hashlib.sha256(values[0].encode()).hexdigest()[:16]

    def authorize_start(self, channel: ChannelConfig, request: Request) -> SidecarSpec:
        """The spec of the sidecar a start request asks for, or the refusal."""
        return self._spec(channel, request.profile, request.netns, request.argv)

    def authorize_respawn(self, channel: ChannelConfig, desired: DesiredSidecar) -> SidecarSpec:
        """Reconcile: the spec of a desired sidecar, checked again as if it were asked for now.

        DENY: a sidecar whose netns is gone or whose profile, arguments or data dirs the host no
        longer allows is dropped rather than respawned.
        """
        return self._spec(channel, desired.profile, desired.netns, desired.argv)

    def configured_spec(self, channel: ChannelConfig, wanted: DesiredSidecar | Request) -> SidecarSpec:
        """The spec the configuration gives a desired sidecar (or a start request) now, without the
        checks that depend on the filesystem (its netns still there, no symlink in its paths): what
        `status` compares a running container with, where the quick reconcile keeps the pid files,
        which sidecar a start is for. Never what a container is started from (that is
        authorize_start / authorize_respawn)."""
        key = (channel.name, wanted.profile, wanted.netns, wanted.argv)
        spec = self._configured.get(key)
        if spec is None:
            spec = self._spec(channel, wanted.profile, wanted.netns, wanted.argv, resolve=False)
            if len(self._configured) >= 8192:
                self._configured.clear()  # bounded: a policy lives as long as its configuration
            self._configured[key] = spec
        return spec

    def _spec(self, channel: ChannelConfig, profile_name: str | None, netns: str | None,
              argv: tuple[str, ...], resolve: bool = True) -> SidecarSpec:
        profile = self.profile_for(channel, profile_name)
        seen = profile.check_argv(argv, channel.data_dirs, resolve)
        if profile.netns_option is not None:
            named = seen.get(profile.netns_option, [])
            # DENY: a program told to act on one namespace while it runs in another.
            if named != [netns]:
                raise PolicyDenied(f"{profile.netns_option} must be given once and name the sidecar's netns "
                                   f"({netns})")
        netns_path = self.check_netns(profile, netns, resolve)
        key = self.key_for(profile, netns, seen)
        uid, gid = sidecar_user(channel, profile)
        caps = profile.capabilities
        writable: tuple[str, ...] = ()
        if uid != 0:
            # DENY: SETUID/SETGID as ambient capabilities would let an unprivileged sidecar
            # setuid(0); a program that "drops" to the uid it already runs as needs neither.
            caps = tuple(c for c in caps if c not in ("SETUID", "SETGID"))
            # ALLOW: the user to switch to is dropped, not refused: Neutron names the agent's own
            # user (root for a root agent), which an unprivileged sidecar already is not and need not be.
            argv = profile.without_user_options(argv)
            # The files the program writes, handed to its uid by the host before each start (only
            # paths the allowlist accepted, inside the data dirs; checked again when handed over).
            writable = tuple(dict.fromkeys(v for opt in profile.writable_files for v in seen.get(opt, ())))
        args, pid_files = profile.private_pid_args(argv)
        # ALLOW: everything below comes from the profile and the channel; the request only chose
        # the profile, the (checked) netns and the (checked) arguments that follow the image.
        return SidecarSpec(
            name=sidecar_name(channel.name, profile.name, key),
            channel=channel.name,
            profile=profile.name,
            key=key,
            netns=netns,
            netns_path=netns_path,
            image=channel.image,
            entrypoint=profile.command,
            args=args,
            capabilities=caps,
            mounts=channel.data_dirs,
            tmpfs=profile.tmpfs,
            pid_host=profile.pid_host,
            read_only=profile.read_only,
            stop_grace=profile.stop_grace,
            pid_files=pid_files,
            user=f"{uid}:{gid}",
            pids_limit=profile.pids_limit,
            memory=profile.memory,
            cpus=profile.cpus,
            oom_score_adj=profile.oom_score_adj,
            writable_files=writable,
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


def sidecar_user(channel: ChannelConfig, profile: Profile) -> tuple[int, int]:
    """The host uid:gid a profile's sidecars of this channel run as."""
    if profile.run_as == "agent":
        # ALLOW (profile's choice, host config): the program must use the agent's own files.
        return channel.agent_uid, channel.agent_gid
    uid, gid = channel.sidecar_user
    if profile.group == "agent":
        # ALLOW (profile's choice): the agent's group, for a socket the agent makes group-writable;
        # the uid, which per-uid kernel limits count, stays the channel's own.
        return uid, channel.agent_gid
    return uid, gid


def sidecar_for_pid(pid: int, main_pids: Iterable[int], host_pidns: tuple[int, int] | None = None) -> int | None:
    """The main pid of the sidecar that `pid` belongs to, or None.

    Neutron's kill scripts send the pid they read from a pid file: the main process, or for
    keepalived the VRRP child (KeepalivedManager's `-r` file). Both reach their sidecar.
    """
    mains = set(main_pids)
    if pid in mains:
        # ALLOW: the sidecar's main process, as the runtime reports it.
        return pid
    ns = pidfiles.pid_namespace(pid)
    host = host_pidns if host_pidns is not None else pidfiles.pid_namespace(os.getpid())
    # DENY: a process in the host's pid namespace (a host process, or a sidecar's process when a
    # custom profile shares the host's pid namespace) is never "inside" a sidecar.
    if ns is None or ns == host:
        return None
    for main in sorted(mains):
        # ALLOW: a process of the sidecar's own pid namespace (only that sidecar's processes live there).
        if pidfiles.pid_namespace(main) == ns:
            return main
    # DENY: anything else (another channel's sidecar, a reused pid): "No such process".
    return None


def check_budget(channel: ChannelConfig, profiles: Mapping[str, Profile]) -> None:
    """A channel's budget must hold at least one sidecar of each of its profiles (and its conmon):
    a budget below that is a typo, and every start would fail."""
    for name in channel.profiles:
        p = profiles[name]
        if channel.budget_memory < p.memory + (8 << 20):
            raise ConfigError(f"channels.{channel.name}.budget_memory: {channel.budget_memory} bytes cannot hold one "
                              f"{name} sidecar (memory {p.memory} bytes, plus 8m for its conmon)")
        if channel.budget_tasks < p.pids_limit // 4:
            raise ConfigError(f"channels.{channel.name}.budget_tasks: {channel.budget_tasks} is below a quarter of "
                              f"one {name} sidecar's pids_limit ({p.pids_limit})")


def budget_warnings(config: Config) -> list[str]:
    """Channels whose budgets add up to more memory than the host should give its sidecars."""
    from .budget import host_memory

    total = sum(ch.budget_memory for ch in config.channels.values())
    mem = host_memory()
    if mem and total > mem * 3 // 4:
        return [f"the channels' budget_memory add up to {total >> 20} MiB, over three quarters of the host's "
                f"{mem >> 20} MiB: together their sidecars could still crowd out the host"]
    return []


def confinement_warnings(config: Config, policy: Policy) -> list[str]:
    """What `check-config` warns about loudly: configured, allowed, and unsafe."""
    out = []
    for ch in sorted(config.channels.values(), key=lambda c: c.name):
        for name in ch.profiles:
            if policy.profiles[name].pid_host:
                out.append(f"channel {ch.name}: profile {name} sets pid_host = true: its sidecars share the "
                           "host's pid namespace and can signal every host process of their uid (with uid 0: "
                           "every root process). Unsafe; see docs/security.md")
        if ch.sidecar_user[0] == 0:
            out.append(f"channel {ch.name}: sidecar_uid = 0: sidecars run as host uid 0, share root's per-uid "
                       "kernel limits (inotify instances, processes) with every root process of the host, and a "
                       "compromised sidecar is root on every file its mounts reach; remove sidecar_uid to give "
                       "the channel its own uid (docs/security.md, \"Sidecar uids\")")
        for name in ch.profiles:
            p = policy.profiles[name]
            if p.run_as == "agent" and ch.agent_uid == 0:
                out.append(f"channel {ch.name}: profile {name} runs as the agent's uid (run_as = \"agent\"), "
                           "here host uid 0, without capabilities (docs/security.md, \"Sidecar uids\")")
    # Channels are kept apart on files only by their mounts: two channels that share a data dir (or
    # one inside the other's) can each rewrite the files the other's sidecars read.
    chans = sorted(config.channels.values(), key=lambda c: c.name)
    for i, a in enumerate(chans):
        for b in chans[i + 1:]:
            for da in a.data_dirs:
                for db in b.data_dirs:
                    ra, rb = da.rstrip("/") + "/", db.rstrip("/") + "/"
                    if ra.startswith(rb) or rb.startswith(ra):
                        out.append(f"channels {a.name} and {b.name} share data dir {da} / {db}: each channel's "
                                   "sidecars can rewrite what the other's read; give channels disjoint data dirs "
                                   "(docs/security.md, \"What a sidecar can still do\")")
    return out
