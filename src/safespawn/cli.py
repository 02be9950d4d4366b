"""The `safespawn` command line: every subcommand's arguments, and one dispatch path.

`build_parser` declares every subcommand; each sets `run` to a handler `(args) -> exit code`, and
`main` calls it, turning the host-side errors into exit codes in one place::

    ConfigError   -> CONFIG    "safespawn: configuration error: ..."
    InstallError  -> FAILED    "safespawn COMMAND: ..."

The host-side modules are imported by the handlers that need them, so that `safespawn submit` (the
agent side) starts without loading the engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .agent import client
from .broker.audit import read_recent
from .broker.inbox import ChannelDir
from .broker.state import ChannelState
from .config import BrokerConfig, Config, config_path, load_config
from .errors import ChannelLocked, ConfigError, ExitCode, InstallError

if TYPE_CHECKING:
    from .broker.engine import Engine

log = logging.getLogger("safespawn")
Handler = Callable[[argparse.Namespace], int]


def _engine(cfg: Config) -> Engine:
    from .broker.engine import Engine

    return Engine(cfg)


def _with_config(fn: Callable[[argparse.Namespace, Config], int]) -> Handler:
    """A handler that needs the host configuration (from --config, $SAFESPAWN_CONFIG or the default)."""

    def run(args: argparse.Namespace) -> int:
        return fn(args, load_config(args.config))

    return run


def cmd_sync(args: argparse.Namespace, cfg: Config) -> int:
    if not args.all and not args.channels:
        print("safespawn sync: name one or more channels, or --all", file=sys.stderr)
        return ExitCode.USAGE
    engine = _engine(cfg)
    names = sorted(cfg.channels) if args.all else args.channels
    for n in names:
        cfg.channel(n)
    rc = ExitCode.OK
    for n in names:
        try:
            r = engine.sync(n, wait=not args.no_wait, full=not args.quick)
        except ChannelLocked:
            log.info("channel %s is being synced by another process", n)
            rc = ExitCode.LOCKED
            continue
        _log_sync(n, r)
    if args.linger > 0 and rc == ExitCode.OK:
        _linger(engine, cfg, names, min(args.linger, MAX_LINGER))
    return rc


# A lingering sync still ends: systemd's TimeoutStartSec and the next reconcile must never wait on it.
MAX_LINGER = 30.0


def _log_sync(n: str, r: Any, how: str = "") -> None:
    log.info("sync %s%s: %s", n, how, r.summary())
    for err in r.errors:
        log.warning("sync %s: %s", n, err)


def _linger(engine: Any, cfg: Config, names: list[str], seconds: float) -> None:
    """Wait up to `seconds` after the last request for the next one, serving it in this process, so
    that a steady trickle of requests does not pay a process start each. Woken by inotify (a
    scandir every 5 ms where it is not available). The path unit stays the safety net: a request
    that arrives after this returns finds a non-empty inbox/new and starts the next run."""
    import time

    from .broker.watch import Inotify, _has_pending

    inboxes = {n: str(cfg.broker.channels_dir / n / "inbox" / "new") for n in names}
    notify: Inotify | None = None
    try:
        notify = Inotify()
        for inbox in inboxes.values():
            notify.add(inbox)
    except OSError:
        if notify is not None:
            notify.close()
        notify = None
    try:
        deadline = time.monotonic() + seconds
        while True:
            served = False
            for n, inbox in inboxes.items():
                # Looked at after the watch is placed: a request written meanwhile is an event.
                if _has_pending(inbox):
                    # Its own words: "sync CH: handled" stays one line per activation.
                    _log_sync(n, engine.sync(n, full=False), " (lingering)")
                    served = True
            now = time.monotonic()
            if served:
                deadline = now + seconds
            if now >= deadline:
                return
            if notify is not None:
                notify.wait(min(deadline - now, 0.5))
            else:
                time.sleep(0.005)
    finally:
        if notify is not None:
            notify.close()


def cmd_watch(args: argparse.Namespace, cfg: Config) -> int:
    from .broker.watch import ConfigFollower, watch

    engine = _engine(cfg)
    names = args.channels or sorted(cfg.channels)
    watch(engine, interval=args.interval, reconcile_interval=args.reconcile_interval, use_inotify=not args.poll,
          channels=names, quick=args.quick, reload=ConfigFollower(engine, args.config, names, _engine))
    return ExitCode.OK


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    engine = _engine(cfg)
    names = [args.channel] if args.channel else sorted(cfg.channels)
    out = []
    for n in names:
        cfg.channel(n)
        st = engine.status(n)
        st["refusals"] = read_recent(ChannelState.of(cfg.broker.state_dir, n).audit_path, limit=args.refusals)
        st["budget"] = _budget_status(cfg, n)
        out.append(st)
    if args.json:
        print(json.dumps(out if not args.channel else out[0], indent=1))
        return ExitCode.OK
    for st in out:
        print(f"channel {st['channel']}: {len(st['sidecars'])} sidecar(s), sidecar uid:gid {st.get('sidecar_user')} "
              f"({st.get('sidecar_user_source')})")
        ro = st.get("rollout") or {}
        if ro.get("target") or ro.get("outdated") or ro.get("state", "done") != "done":
            print(f"  rollout: {ro['state']}, {ro['replaced']}/{ro['total']} replaced in {ro['batches']} batch(es), "
                  f"{ro['outdated']} outdated" + (f" -- {ro['message']}" if ro.get("message") else ""))
        bu = st["budget"]
        use, conf = bu["use"], bu["configured"]
        if use is None:
            print(f"  budget: memory {conf['memory_bytes'] >> 20} MiB, {conf['cpus']:g} CPUs, {conf['tasks']} tasks "
                  "(no cgroup yet: nothing started)")
        else:
            print(f"  budget: memory {use['memory_bytes'] >> 20}/{(use['memory_max_bytes'] or 0) >> 20} MiB, "
                  f"tasks {use['tasks']}/{use['tasks_max']}, CPU {use['cpu_seconds']:.1f} s used at most "
                  f"{use['cpus_max']} CPUs ({use['cpu_throttled_seconds']:.1f} s held back)")
        if st["sidecars"]:
            print(f"  {'NAME':<60} {'PROFILE':<12} {'STATE':<9} {'PID':>8}  RESTARTS  {'SPEC':<8}  UID:GID")
            for s in st["sidecars"]:
                print(f"  {s['name']:<60} {s['profile']:<12} {s['state']:<9} {str(s['pid'] or '-'):>8}  "
                      f"{s['restarts']:<8}  {'outdated' if s.get('outdated') else 'current':<8}  "
                      f"{s.get('user') or '-'}")
        if st["refusals"]:
            print("  recent refusals:")
            for e in st["refusals"]:
                print(f"    {e.get('t')} {e.get('id') or '-'} {e.get('decision')} {e.get('code', '')}: "
                      f"{e.get('reason', '')}")
    return ExitCode.OK


def _budget_status(cfg: Config, channel: str) -> dict[str, Any]:
    """The channel's budget as configured, and what its sidecars use against it now (from its cgroup)."""
    from .broker import budget

    ch = cfg.channel(channel)
    u = budget.use_of(channel)
    return {"configured": {"memory_bytes": ch.budget_memory, "cpus": ch.budget_cpus, "tasks": ch.budget_tasks},
            "use": None if u is None else u.as_dict()}


def cmd_submit(args: argparse.Namespace) -> int:
    """Agent side: needs no host configuration."""
    if args.op == "start":
        # `start PROFILE [--netns NS] -- ARGS...`: everything after `--` is the program's. argparse
        # drops the `--` itself when it comes first, so leading --netns options are taken here.
        rest = list(args.args)
        netns = args.netns
        if "--" in rest:
            opts, rest = rest[:rest.index("--")], rest[rest.index("--") + 1:]
        else:
            opts = []
            while len(rest) >= 2 and rest[0] == "--netns":
                opts, rest = opts + rest[:2], rest[2:]
        while opts:
            opt = opts.pop(0)
            if opt == "--netns" and opts:
                netns = opts.pop(0)
            elif opt.startswith("--netns="):
                netns = opt.partition("=")[2]
            else:
                print(f"safespawn submit: unexpected {opt!r} before '--' (program arguments follow '--')",
                      file=sys.stderr)
                return ExitCode.USAGE
        req = client.start_request(args.profile, rest, netns=netns)
    elif args.op == "signal":
        req = client.signal_request(args.signal, pid=args.pid, profile=args.profile, netns=args.netns)
    else:
        req = client.stop_request(args.profile, netns=args.netns, pid=args.pid)
    try:
        reply = client.submit(args.channel_dir, req, timeout=args.timeout)
    except client.NoBroker as e:
        print(f"safespawn submit: {e}", file=sys.stderr)
        return ExitCode.NO_BROKER
    except OSError as e:
        print(f"safespawn submit: cannot write to channel {args.channel_dir}: {e}", file=sys.stderr)
        return ExitCode.FAILED
    print(json.dumps(reply))
    if not reply.get("ok"):
        print(f"safespawn submit: {client.describe_error(reply)}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


def cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    from .broker.policy import Policy, budget_warnings, confinement_warnings
    from .config import host_id_conflicts
    from .ops.doctor import static_checks

    policy = Policy(cfg)  # loads and validates every profile the channels name
    for ch in cfg.channels.values():
        uid, gid = ch.sidecar_user
        print(f"channel {ch.name}: image {ch.image}, profiles {', '.join(ch.profiles)}, "
              f"data dirs {', '.join(ch.data_dirs) or '-'}, sidecar uid:gid {uid}:{gid} "
              f"({'allocated' if ch.sidecar_uid_allocated else 'configured'})")
        print(f"  budget: memory {ch.budget_memory >> 20} MiB (swap included), {ch.budget_cpus:g} CPUs, "
              f"{ch.budget_tasks} tasks; per sidecar: " + ", ".join(
                  f"{n} {policy.profiles[n].memory >> 20} MiB/{policy.profiles[n].cpus:g} CPU/"
                  f"{policy.profiles[n].pids_limit} pids" for n in ch.profiles))
        biggest = max(policy.profiles[n].memory for n in ch.profiles)
        if ch.max_sidecars * biggest > ch.budget_memory:
            print(f"  max_sidecars {ch.max_sidecars} x {biggest >> 20} MiB would exceed the budget: the budget "
                  "holds them all together (docs/security.md, \"Resource exhaustion\")")
    for w in budget_warnings(cfg):
        print(f"WARNING: {w}", file=sys.stderr)
    for w in confinement_warnings(cfg, policy):
        print(f"WARNING: {w}", file=sys.stderr)
    checks = [c for c in static_checks(cfg) if not c.ok]
    failed = [c.what for c in checks]
    for c in checks:
        print(f"{cfg.path}: {c.what}: {c.fix}", file=sys.stderr)
    for ch, why in host_id_conflicts(cfg):
        # DENY (allocated): the default must never be a uid a host service uses; a configured one
        # is the operator's explicit choice and only warned about.
        if ch.sidecar_uid_allocated:
            failed.append(why)
            print(f"{cfg.path}: channel {ch.name}: allocated sidecar uid clashes with this host: {why}; set "
                  "[broker] sidecar_uids to a free range, or the channel's sidecar_uid", file=sys.stderr)
        else:
            print(f"WARNING: channel {ch.name}: sidecar_uid: {why}", file=sys.stderr)
    if failed:
        return ExitCode.FAILED
    print(f"{cfg.path}: OK (runtime {cfg.broker.runtime}; `safespawn doctor` checks that it works)")
    return ExitCode.OK


def example_config() -> str:
    """The example configuration `safespawn doctor --example-config` prints (it passes check-config)."""
    from importlib import resources

    return resources.files("safespawn").joinpath("example.toml").read_text(encoding="utf-8")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the host, and the configuration when there is one. Without a configuration file the
    host is checked anyway (with the defaults) and the way to start one is printed."""
    if args.example_config:
        sys.stdout.write(example_config())
        return ExitCode.OK
    path = config_path(args.config)
    if not os.path.lexists(path):
        # Only a missing file: a configuration that exists but is wrong is reported as such.
        print(f"no configuration file at {path}: checking the host with the defaults")
        problems = _print_checks(_doctor_checks(Config()))
        print(f"\nTo start a configuration: safespawn doctor --example-config > {path}\n"
              f"then edit it (image, profiles, data dirs of each agent's channel) and run "
              f"`safespawn check-config` and `safespawn doctor` again.")
        return ExitCode.OK if problems == 0 else ExitCode.FAILED
    cfg = load_config(args.config)
    return ExitCode.OK if _print_checks(_doctor_checks(cfg)) == 0 else ExitCode.FAILED


def _print_checks(checks: list[Any]) -> int:
    problems = 0
    for c in checks:
        print(("ok   " if c.ok else "FAIL ") + c.what + ("" if c.ok else f"\n     -> {c.fix}"))
        problems += 0 if c.ok else 1
    return problems


def _doctor_checks(cfg: Config) -> list[Any]:
    from .ops.doctor import Check, host_checks, live_checks

    out = [*live_checks(cfg), *host_checks(cfg)]
    for ch in cfg.channels.values():
        base = Path(ChannelDir.path_of(cfg.broker.channels_dir, ch.name))
        for sub in ("inbox/new", "inbox/tmp", "outbox/replies"):
            p2 = base / sub
            out.append(Check(p2.is_dir() and not p2.is_symlink(), f"{p2} is a directory", "run `safespawn install`"))
        if not os.path.isdir(os.path.join(cfg.broker.state_dir, ch.name)):
            # A check creates nothing: `install`, `watch` or the first sync lay it out.
            out.append(Check(True, f"state dir of {ch.name} not created yet (`safespawn install` or the first "
                             "sync creates it)"))
            continue
        try:
            with ChannelState.locked(str(cfg.broker.state_dir), ch.name, wait=False):
                pass
            out.append(Check(True, f"state dir of {ch.name} usable"))
        except ChannelLocked:
            out.append(Check(True, f"state dir of {ch.name} usable (a sync holds it now)"))
        except OSError as e:
            out.append(Check(False, f"state dir of {ch.name} usable", str(e)))
    if not cfg.channels:
        out.append(Check(True, "images: none configured yet (each channel names one)"))
    return out


def cmd_install(args: argparse.Namespace, cfg: Config) -> int:
    from .ops.install import install
    from .ops.units import default_executable, default_unit_dir

    channels = args.channels or sorted(cfg.channels)
    if not channels:
        raise InstallError(f"no channels in {cfg.path}: nothing to install")
    return install(cfg, scope=args.scope, channels=channels,
                   unit_dir=Path(args.unit_dir) if args.unit_dir else default_unit_dir(args.scope),
                   executable=args.executable or default_executable(),
                   config_file=os.path.abspath(config_path(args.config)), dry_run=args.dry_run)


def cmd_uninstall(args: argparse.Namespace, cfg: Config) -> int:
    from .ops.install import uninstall

    return uninstall(cfg, scope=args.scope, unit_dir=Path(args.unit_dir) if args.unit_dir else None,
                     stop_sidecars=args.stop_sidecars, dry_run=args.dry_run)


def cmd_rearm(args: argparse.Namespace) -> int:
    from .ops.units import rearm

    return rearm(args.scope, brokers=args.brokers)


def cmd_wrappers_install(args: argparse.Namespace) -> int:
    from .ops import wrappers

    channel_dir = args.channel_dir
    if channel_dir is None:
        # The agent sees the channel at the host's path by default; without a configuration file
        # the default channels_dir is that path.
        try:
            channels_dir = load_config(args.config).broker.channels_dir
        except ConfigError:
            channels_dir = BrokerConfig().channels_dir
        channel_dir = wrappers.default_channel_dir(channels_dir, args.channel)
    if not os.path.isabs(channel_dir):
        print(f"safespawn wrappers install: --channel-dir {channel_dir!r} must be absolute", file=sys.stderr)
        return ExitCode.USAGE
    changed = wrappers.install(args.dir, args.channel, os.path.normpath(channel_dir), args.python)
    # The Ansible role reads ": N file(s) written" to report changed/ok: keep the wording.
    print(f"{args.dir}: {len(changed)} file(s) written for channel {args.channel} ({channel_dir})")
    return ExitCode.OK


def cmd_adopt(args: argparse.Namespace, cfg: Config) -> int:
    from .ops.adopt import adopt_command

    return adopt_command(cfg, cfg.channel(args.channel), args.source, args.dry_run, args.json)


def cmd_rollout(args: argparse.Namespace, cfg: Config) -> int:
    from .broker.rollout import rollout_command

    return rollout_command(cfg, cfg.channel(args.channel), args.pause, args.resume)


def build_parser() -> argparse.ArgumentParser:
    from .ops.units import SCOPES
    from .ops.wrappers import DEFAULT_PYTHON

    p = argparse.ArgumentParser(prog="safespawn", description="Run allowlisted sidecar containers for "
                                "less trusted containers, through a file channel.")
    p.add_argument("--config", help=f"configuration file (default: $SAFESPAWN_CONFIG or {config_path()})")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sync", help="serve the pending requests of channels and reconcile their sidecars")
    s.add_argument("channels", nargs="*")
    s.add_argument("--all", action="store_true", help="every configured channel")
    s.add_argument("--no-wait", action="store_true", help="skip a channel another sync holds")
    s.add_argument("--quick", action="store_true",
                   help="trust the recorded processes of running sidecars: no listing when all still run "
                   "(orphans and leftovers wait for the next full sync)")
    s.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                   help=f"after serving, wait this long for the next request (at most {MAX_LINGER:g})")
    s.set_defaults(run=_with_config(cmd_sync))

    s = sub.add_parser("watch", help="lay out the channels and sync them as requests arrive (hosts without "
                       "systemd; with --quick --channel CH, the installed resident broker)")
    s.add_argument("--interval", type=float, default=0.05,
                   help="seconds between inbox polls when inotify is not available")
    s.add_argument("--reconcile-interval", type=float, default=None, help="seconds between full syncs")
    s.add_argument("--poll", action="store_true", help="poll the inboxes instead of waiting on inotify events")
    s.add_argument("--channel", dest="channels", action="append", metavar="CH",
                   help="serve only this channel (repeatable; default: every configured channel)")
    s.add_argument("--quick", action="store_true",
                   help="quick syncs only, no full pass (what the installed resident broker runs: the reconcile "
                   "timer does the full passes)")
    s.set_defaults(run=_with_config(cmd_watch))

    s = sub.add_parser("status", help="show the sidecars of channels")
    s.add_argument("channel", nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--refusals", type=int, default=5, help="how many recent refusals to show")
    s.set_defaults(run=_with_config(cmd_status))

    s = sub.add_parser("submit", help="client side: submit a request to a channel and wait for its reply")
    s.add_argument("--channel-dir", required=True)
    s.add_argument("--timeout", type=float, default=client.DEFAULT_TIMEOUT)
    s.set_defaults(run=cmd_submit)
    ops = s.add_subparsers(dest="op", required=True)
    o = ops.add_parser("start")
    o.add_argument("profile")
    o.add_argument("--netns")
    o.add_argument("args", nargs=argparse.REMAINDER)
    o = ops.add_parser("signal")
    o.add_argument("signal")
    o.add_argument("--pid", type=int)
    o.add_argument("--profile")
    o.add_argument("--netns")
    o = ops.add_parser("stop")
    o.add_argument("profile", nargs="?")
    o.add_argument("--netns")
    o.add_argument("--pid", type=int)

    s = sub.add_parser("check-config", help="validate the configuration and the profiles it names")
    s.set_defaults(run=_with_config(cmd_check_config))
    s = sub.add_parser("doctor", help="check that this host can run safespawn (with or without a configuration)",
                       description="Check the host (runtime, its cgroup manager, cgroup version, systemd, "
                       "network namespaces) and, when the configuration file exists, its channels (images, "
                       "directories, netns joining for Docker). Without a configuration file the host is "
                       "checked with the defaults, and the way to start one is printed.")
    s.add_argument("--example-config", action="store_true",
                   help="print an example configuration (it passes check-config) and exit")
    s.set_defaults(run=cmd_doctor)

    s = sub.add_parser("install", help="create the channels' directories and install the systemd units",
                       description="Create each channel's directories (inbox writable by the agent, outbox "
                       "read-only to it, host-private state 0700), write the systemd units, reload the "
                       "manager, enable and start them. Idempotent: a second run changes nothing.")
    s.add_argument("--scope", choices=SCOPES, default="system",
                   help="the system manager (production) or the calling user's manager (tests, demos)")
    s.add_argument("--channel", dest="channels", action="extend", nargs="+", metavar="CH",
                   help="only these channels (default: every configured channel)")
    s.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    s.add_argument("--unit-dir", help="where to write the units (default: /etc/systemd/system, or "
                   "$XDG_CONFIG_HOME/systemd/user for --scope user); must be on the manager's search path")
    s.add_argument("--executable", help="absolute path of the safespawn command the units run "
                   "(default: the one running now)")
    s.set_defaults(run=_with_config(cmd_install))

    s = sub.add_parser("uninstall", help="remove the systemd units and the directories install created",
                       description="Disable and remove the units and the directories `install` created. "
                       "Running sidecars (and the state that describes them) are left alone unless "
                       "--stop-sidecars is given.")
    s.add_argument("--scope", choices=SCOPES, default=None, help="default: the scope install used")
    s.add_argument("--stop-sidecars", action="store_true", help="also remove every sidecar of the channels")
    s.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    s.add_argument("--unit-dir", help="default: where install wrote them")
    s.set_defaults(run=_with_config(cmd_uninstall))

    s = sub.add_parser("rearm", help="restart safespawn-sync@ path units that systemd put in the failed state "
                       "(run by safespawn-reconcile.service)")
    s.add_argument("--scope", choices=SCOPES, default="system")
    s.add_argument("--brokers", action="store_true",
                   help="also start the resident broker of every watching path unit that has none running")
    s.set_defaults(run=cmd_rearm)

    s = sub.add_parser("wrappers", help="Neutron drop-in wrappers and kill scripts for an agent container")
    ops = s.add_subparsers(dest="wrappers_op", required=True)
    i = ops.add_parser("install", help="write the wrappers, kill scripts and client file into DIR")
    i.add_argument("--channel", required=True, help="the channel the agent's requests go to")
    i.add_argument("--channel-dir", help="the channel's directory as the agent sees it "
                   "(default: the host config's channels_dir/CHANNEL)")
    i.add_argument("--python", default=DEFAULT_PYTHON,
                   help=f"the agent image's Python 3.9+ interpreter for the #! line (default: {DEFAULT_PYTHON})")
    i.add_argument("dir", help="the directory to write into (mounted read-only into the agent)")
    i.set_defaults(run=cmd_wrappers_install)

    s = sub.add_parser("adopt", help="take over sidecars started by legacy wrappers (TripleO/EDPM, kolla)",
                       description="One network at a time: read each legacy sidecar's program, arguments and "
                       "netns from the running container, start the confined sidecar the channel's policy "
                       "allows through the channel, remove the legacy one (docs/operations.md).")
    s.add_argument("--channel", required=True, help="the channel whose policy and image the sidecars get")
    s.add_argument("--from", dest="source", choices=["tripleo", "kolla", "auto"], default="auto",
                   help="which wrappers' naming to look for (default: both)")
    s.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(run=_with_config(cmd_adopt))

    s = sub.add_parser("rollout", help="pause or resume the rolling upgrade of a channel's sidecars")
    s.add_argument("channel")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--pause", action="store_true", help="replace no more sidecars until --resume")
    g.add_argument("--resume", action="store_true", help="continue (a failed rollout is retried)")
    s.set_defaults(run=_with_config(cmd_rollout))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="safespawn: %(levelname)s %(message)s", stream=sys.stderr)
    run: Handler = args.run
    try:
        return int(run(args))
    except ConfigError as e:
        print(f"safespawn: configuration error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    except InstallError as e:
        print(f"safespawn {args.command}: {e}", file=sys.stderr)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
