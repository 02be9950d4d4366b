"""The systemd trigger: the unit files, systemctl, and `safespawn rearm` (install.py puts them in place).

One template pair per host and one instance per channel, plus a timer as the safety net:

    safespawn-sync@CH.path         DirectoryNotEmpty=CHANNELS/CH/inbox/new   level: re-checked every time
                                   PathChanged=CHANNELS/CH/inbox/trigger     the spec's edge: an early start
      -> safespawn-sync@CH.service    Type=oneshot: `safespawn sync --quick --linger=S CH` (drains until
                                      the inbox is empty, then waits up to S s for more: broker.sync_linger)
    safespawn-reconcile.timer      at boot, then every `broker.reconcile_interval` seconds
      -> safespawn-reconcile.service  `safespawn rearm` (restart failed path units), then
                                      `safespawn sync --all --no-wait` (serve and reconcile every channel)

Why nothing is lost (the predecessor's units lost requests in each of these ways):
- A request that arrives while the sync runs is not an event that can be missed: when the oneshot
  exits, systemd re-checks DirectoryNotEmpty= and starts it again if anything waits.
- The service has no start limit (StartLimitIntervalSec=0): each run is serialized by the channel lock
  and ends when the inbox is empty, so the number of runs is bounded by the requests themselves.
- The path unit's trigger limit is set on purpose, above what requests (or an agent hammering
  inbox/trigger) can produce, so only a sync that fails at once in a loop trips it. A path unit that
  systemd failed anyway is re-armed by the timer, which also serves whatever waits: the delay is one
  timer interval at most, and nothing is lost.

Shell example::

    safespawn install --scope system            # dirs, units, daemon-reload, enable --now
    systemctl list-units 'safespawn-*'
    journalctl -u 'safespawn-sync@*' -f
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from ..config import Config
from ..errors import ExitCode, InstallError

log = logging.getLogger(__name__)

SCOPES = ("system", "user")
SYNC_PATH = "safespawn-sync@.path"
SYNC_SERVICE = "safespawn-sync@.service"
RECONCILE_TIMER = "safespawn-reconcile.timer"
RECONCILE_SERVICE = "safespawn-reconcile.service"
UNIT_NAMES = (SYNC_PATH, SYNC_SERVICE, RECONCILE_SERVICE, RECONCILE_TIMER)
MARKER = "# Installed by `safespawn install`: change the configuration and re-run it rather than edit this file."
SYSTEMCTL_TIMEOUT = 60

# Trigger limit of the path units. systemd counts activations of the service, and drops its watches
# while the service runs, so hammering inbox/trigger during a sync counts nothing; a real sync takes
# at least ~0.2 s (Python start plus one `podman ps`), so requests alone start it at most a few times a
# second (measured: ~2/s while another process touched the trigger file 20000 times a second). Only
# a run that fails at once -- the executable gone after an upgrade -- can go above 10/s for 10 s, and
# that loop is what this stops. The timer re-arms the unit (and serves the channel) meanwhile.
TRIGGER_LIMIT_INTERVAL = "10s"
TRIGGER_LIMIT_BURST = 100
# A sync that hangs (podman stuck past its own per-call timeouts) is killed after this; the ledger
# makes the interrupted run safe to replay, and the path unit starts the next one.
SYNC_TIMEOUT = "15min"
# The resident broker (broker.sync_resident): systemd restarts it 1 s after a crash; a broker that
# fails at once in a loop is stopped after 10 starts in a minute (the timer serves meanwhile).
RESTART_SEC = "1s"
START_LIMIT_INTERVAL = "60s"
START_LIMIT_BURST = 10
# Bounds on the resident broker's cgroup: the broker (peak RSS measured: 26 MiB serving, 69 MiB
# recovering 300 sidecars), its runtime CLI calls (at most parallel_starts at once, ~40 MiB each),
# and, where podman's cgroupfs manager leaves them there, the sidecars' conmon processes (~0.3 MiB
# each of their own). A bound against a runaway, not a budget; CPU: at most two cores' worth, and
# half the default weight when the host is busy (the sidecars and the agents come first).
MEMORY_HIGH = "768M"
MEMORY_MAX = "1536M"
CPU_QUOTA = "200%"
CPU_WEIGHT = 50
# Capabilities the broker and podman never need; dropping them from the bounding set also takes them
# out of reach of every sidecar (conmon and crun inherit it), whatever a profile says.
DROPPED_CAPABILITIES = ("CAP_SYS_MODULE", "CAP_SYS_BOOT", "CAP_SYS_TIME", "CAP_WAKE_ALARM", "CAP_SYSLOG",
                        "CAP_SYS_PACCT", "CAP_BLOCK_SUSPEND")
# Characters a path may carry into a unit file unquoted and unescaped.
UNIT_PATH_RE = re.compile(r"/[A-Za-z0-9_./+@:,-]*")


# -- unit text ---------------------------------------------------------------------------------


def _unit_path(p: str, what: str) -> str:
    # DENY: a path with spaces, quotes, '%' or newlines would change the meaning of a unit line.
    if not UNIT_PATH_RE.fullmatch(p) or "//" in p:
        raise InstallError(f"{what} {p!r}: only absolute paths of letters, digits and _./+@:,- can go into a "
                           "unit file")
    return p


def render_units(cfg: Config, scope: str, executable: str, config_file: str) -> dict[str, str]:
    """The text of the four unit files for this configuration, by file name."""
    exe = _unit_path(executable, "executable")
    conf = _unit_path(config_file, "configuration file")
    channels = _unit_path(str(cfg.broker.channels_dir), "broker.channels_dir")
    interval = cfg.broker.reconcile_interval
    linger = f" --linger={cfg.broker.sync_linger:g}" if cfg.broker.sync_linger > 0 else ""
    brokers = " --brokers" if cfg.broker.sync_resident else ""
    head = f"{MARKER}\n# See docs/operations.md. Scope: {scope}; configuration: {conf}.\n"
    sync_path = f"""{head}
[Unit]
Description=safespawn: watch the inbox of channel %i

[Path]
Unit=safespawn-sync@%i.service
# Level-triggered: checked again each time the service finishes, so a request that arrived while it
# ran starts it again. This, not the trigger file, is what guarantees that nothing waits forever.
DirectoryNotEmpty={channels}/%i/inbox/new
# The spec's trigger file, touched by the client after each request.
PathChanged={channels}/%i/inbox/trigger
# Set on purpose: systemd counts activations, and drops its watches while the service runs, so no
# burst of requests (nor an agent hammering the trigger file) comes near 10 runs a second for 10 s;
# a sync that fails at once in a loop does, and is stopped. A failed path unit is re-armed by
# safespawn-reconcile.timer (which also serves the channel) within {interval}s.
TriggerLimitIntervalSec={TRIGGER_LIMIT_INTERVAL}
TriggerLimitBurst={TRIGGER_LIMIT_BURST}

[Install]
WantedBy=paths.target
"""
    hardening = f"""# Hardening that leaves podman working. Options that give the service a mount namespace
# (ProtectSystem=, PrivateTmp=, ReadWritePaths=, ...) are not set: the sidecars' mounts would live in it,
# out of reach of the host. Seccomp-based options are inherited by every sidecar (conmon and crun descend
# from this service's process, whatever cgroup they end in), so only the ones no sidecar can miss are set.
# NoNewPrivileges= is not set: it blocks the SELinux transition of podman into container_runtime_t.
SystemCallArchitectures=native
LockPersonality=yes
CapabilityBoundingSet=~{' '.join(DROPPED_CAPABILITIES)}"""
    if cfg.broker.sync_resident:
        sync_service = f"""{head}
[Unit]
Description=safespawn: the resident broker of channel %i
# Set on purpose. A running broker serves every request itself: its path unit starting it again is
# a no-op, not a start. So starts are rare (boot, a crash, the timer's re-arm), and a broker that
# fails at once in a loop is stopped after {START_LIMIT_BURST} starts in {START_LIMIT_INTERVAL}; the
# timer then serves the channel and re-arms it (`safespawn rearm`) every {interval}s.
StartLimitIntervalSec={START_LIMIT_INTERVAL}
StartLimitBurst={START_LIMIT_BURST}

[Service]
# READY=1 once it serves; a watchdog ping on every pass (at least once a second).
Type=notify
NotifyAccess=main
Environment=SAFESPAWN_CONFIG={conf}
# Serves the channel on inotify events, checks every second that its sidecars run as recorded (a
# runtime restart's new pid goes into the pid files at once), reloads a changed configuration.
# --quick: no listing while every sidecar runs as recorded; the timer's sync does the full passes.
ExecStart={exe} watch --quick --channel %i
# A killed broker loses nothing (the ledger and the inbox are on disk): it is started again.
Restart=on-failure
RestartSec={RESTART_SEC}
# A sync that hangs (podman stuck past its own per-call timeouts) stops the pings and is killed.
WatchdogSec={SYNC_TIMEOUT}
# Sidecars are detached podman containers whose conmon may stay in this unit's cgroup: when the
# broker stops, only it is stopped, never them.
KillMode=process
# Bounds on the broker and the runtime calls it runs (and on conmon where it stays here): see
# docs/operations.md. TasksMax= keeps systemd's default: conmon processes may count against it.
MemoryHigh={MEMORY_HIGH}
MemoryMax={MEMORY_MAX}
CPUQuota={CPU_QUOTA}
CPUWeight={CPU_WEIGHT}
SyslogIdentifier=safespawn-sync
{hardening}
"""
    else:
        sync_service = f"""{head}
[Unit]
Description=safespawn: serve the requests of channel %i
# No start limit: the predecessor's oneshot failed after 5 starts in 10s and its path unit stopped
# watching. Runs are serialized by the channel lock and each ends when the inbox is empty.
StartLimitIntervalSec=0

[Service]
Type=oneshot
Environment=SAFESPAWN_CONFIG={conf}
# --quick: no listing while every sidecar runs as recorded (the timer's sync lists and removes
# orphans); --linger: serve the next request in this process if it comes within that many seconds.
ExecStart={exe} sync --quick{linger} %i
# Sidecars are detached podman containers; the broker runs podman so that each conmon leaves this
# unit's cgroup (docs/operations.md). Defence in depth, for a conmon that stayed anyway (a sidecar
# started by an older safespawn, podman unable to make conmon's scope): stopping or ending the sync
# stops only its own process, never a sidecar.
KillMode=process
TimeoutStartSec={SYNC_TIMEOUT}
SyslogIdentifier=safespawn-sync
{hardening}
"""
    reconcile_service = f"""{head}
[Unit]
Description=safespawn: re-arm failed path units, serve and reconcile every channel
# Paced by its timer.
StartLimitIntervalSec=0

[Service]
Type=oneshot
Environment=SAFESPAWN_CONFIG={conf}
# Restart the safespawn-sync@ path units systemd put in the failed state (trigger limit hit). A failure
# here must not keep the sync below from running, hence '-'.
ExecStartPre=-{exe} rearm --scope {scope}{brokers}
# --no-wait: a channel whose sync runs right now is being served already.
ExecStart={exe} sync --all --no-wait
SuccessExitStatus={int(ExitCode.LOCKED)}
KillMode=process
TimeoutStartSec={SYNC_TIMEOUT}
SyslogIdentifier=safespawn-reconcile
{hardening}
"""
    timer = f"""{head}
[Unit]
Description=safespawn: reconcile every channel at boot and every {interval}s

[Timer]
OnBootSec=10s
OnUnitActiveSec={interval}s
AccuracySec=1s

[Install]
WantedBy=timers.target
"""
    return {SYNC_PATH: sync_path, SYNC_SERVICE: sync_service, RECONCILE_SERVICE: reconcile_service,
            RECONCILE_TIMER: timer}


def path_unit(channel: str) -> str:
    return f"safespawn-sync@{channel}.path"


def sync_service(channel: str) -> str:
    return f"safespawn-sync@{channel}.service"


def default_unit_dir(scope: str) -> Path:
    if scope == "system":
        return Path("/etc/systemd/system")
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "systemd" / "user"


def default_executable() -> str:
    """The absolute path of the `safespawn` command that is running (or the one beside this Python)."""
    candidates = []
    if os.path.basename(sys.argv[0]) == "safespawn":
        candidates.append(os.path.abspath(sys.argv[0]))
    candidates.append(os.path.join(os.path.dirname(sys.executable), "safespawn"))
    found = shutil.which("safespawn")
    if found:
        candidates.append(os.path.abspath(found))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise InstallError("cannot find the `safespawn` command; pass --executable PATH")


# -- systemctl ---------------------------------------------------------------------------------


class Systemctl:
    """`systemctl [--user] ...` as argv lists, with timeouts."""

    def __init__(self, scope: str) -> None:
        self.argv = ["systemctl", "--user"] if scope == "user" else ["systemctl"]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            p = subprocess.run([*self.argv, *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT,
                               check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InstallError(f"{' '.join(self.argv)} {' '.join(args)}: {e}") from None
        if check and p.returncode != 0:
            raise InstallError(f"{' '.join(self.argv)} {' '.join(args)} failed (rc {p.returncode}): "
                               f"{(p.stderr or p.stdout).strip()[-500:]}")
        return p

    def show(self, units: Iterable[str], props: tuple[str, ...] = ("ActiveState", "UnitFileState", "LoadState",
                                                                    "Result")) -> dict[str, dict[str, str]]:
        units = list(units)
        if not units:
            return {}
        out = self.run("show", "--property=Id," + ",".join(props), "--", *units).stdout
        blocks = [b for b in out.split("\n\n") if b.strip()]
        result: dict[str, dict[str, str]] = {}
        for unit, block in zip(units, blocks, strict=False):
            kv = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
            result[unit] = kv
        return result

    def list_units(self, pattern: str, state: str | None = None) -> list[str]:
        args = ["list-units", "--all", "--full", "--plain", "--no-legend", "--no-pager"]
        if state:
            args.append(f"--state={state}")
        out = self.run(*args, "--", pattern).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()]


# -- rearm -----------------------------------------------------------------------------------


def rearm(scope: str, brokers: bool = False) -> int:
    """Restart the safespawn-sync@ path units systemd put in the failed state.

    Only failed ones: a path unit an operator stopped on purpose stays stopped. With `brokers`
    (resident brokers, broker.sync_resident): also start the broker of every watching path unit
    that has none running (at boot, or after systemd stopped a crash loop: start-limit-hit).
    """
    sc = Systemctl(scope)
    failed = sc.list_units("safespawn-sync@*.path", state="failed")
    states = sc.show(failed, ("Result",))
    for unit in failed:
        log.warning("re-arming %s: systemd had stopped it (%s)", unit, states.get(unit, {}).get("Result", "?"))
        sc.run("reset-failed", "--", unit, check=False)
        # Its broker too, so that the path unit can start it again (start-limit-hit).
        sc.run("reset-failed", "--", unit.removesuffix(".path") + ".service", check=False)
        sc.run("start", "--", unit)
    if not failed:
        log.debug("no failed safespawn-sync@ path unit")
    if brokers:
        watching = sc.list_units("safespawn-sync@*.path", state="active")
        services = [u.removesuffix(".path") + ".service" for u in watching]
        for unit, st in sc.show(services, ("ActiveState", "Result")).items():
            if st.get("ActiveState") in ("inactive", "failed"):
                log.info("starting %s (%s, %s)", unit, st.get("ActiveState"), st.get("Result", "?"))
                if st.get("ActiveState") == "failed":
                    sc.run("reset-failed", "--", unit, check=False)
                sc.run("start", "--no-block", "--", unit)
    return ExitCode.OK
