"""The `safespawn` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from . import client
from .audit import read_recent
from .config import Config, config_path, load_config
from .errors import ChannelLocked, ConfigError, ExitCode
from .state import ChannelState

log = logging.getLogger("safespawn")


def _engine(cfg: Config) -> Any:
    from .engine import Engine

    return Engine(cfg)


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
            r = engine.sync(n, wait=not args.no_wait)
        except ChannelLocked:
            log.info("channel %s is being synced by another process", n)
            rc = ExitCode.LOCKED
            continue
        log.info("sync %s: handled %d, refused %d, quarantined %d, replayed %d, deferred %d, respawned %d, "
                 "removed %d", n, r.handled, r.refused, r.quarantined, r.replayed, r.deferred, r.respawned,
                 r.removed)
        for err in r.errors:
            log.warning("sync %s: %s", n, err)
    return rc


def cmd_watch(args: argparse.Namespace, cfg: Config) -> int:
    from .watch import watch

    watch(_engine(cfg), interval=args.interval, reconcile_interval=args.reconcile_interval)
    return ExitCode.OK


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    engine = _engine(cfg)
    names = [args.channel] if args.channel else sorted(cfg.channels)
    out = []
    for n in names:
        cfg.channel(n)
        st = engine.status(n)
        st["refusals"] = read_recent(os.path.join(str(cfg.broker.state_dir), n, "audit.log"), limit=args.refusals)
        out.append(st)
    if args.json:
        print(json.dumps(out if not args.channel else out[0], indent=1))
        return ExitCode.OK
    for st in out:
        print(f"channel {st['channel']}: {len(st['sidecars'])} sidecar(s)")
        if st["sidecars"]:
            print(f"  {'NAME':<60} {'PROFILE':<12} {'STATE':<9} {'PID':>8}  RESTARTS")
            for s in st["sidecars"]:
                print(f"  {s['name']:<60} {s['profile']:<12} {s['state']:<9} {str(s['pid'] or '-'):>8}  "
                      f"{s['restarts']}")
        if st["refusals"]:
            print("  recent refusals:")
            for e in st["refusals"]:
                print(f"    {e.get('t')} {e.get('id') or '-'} {e.get('decision')} {e.get('code', '')}: "
                      f"{e.get('reason', '')}")
    return ExitCode.OK


def cmd_submit(args: argparse.Namespace) -> int:
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
    from .policy import Policy

    Policy(cfg)  # loads and validates every profile the channels name
    for ch in cfg.channels.values():
        print(f"channel {ch.name}: image {ch.image}, profiles {', '.join(ch.profiles)}, "
              f"data dirs {', '.join(ch.data_dirs) or '-'}")
    print(f"{cfg.path}: OK")
    return ExitCode.OK


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    import subprocess

    problems = 0

    def check(ok: bool, what: str, fix: str = "") -> None:
        nonlocal problems
        print(("ok   " if ok else "FAIL ") + what + ("" if ok else f"\n     -> {fix}"))
        problems += 0 if ok else 1

    podman = shutil.which(cfg.broker.podman)
    check(podman is not None, f"podman found ({podman})", "install podman")
    if podman:
        p = subprocess.run([podman, "info", "--format=json"], capture_output=True, text=True, timeout=60,
                           check=False)
        check(p.returncode == 0, "podman info works", p.stderr.strip()[-300:])
    check(os.path.isdir(cfg.broker.netns_dir), f"{cfg.broker.netns_dir} exists", "ip netns add creates it")
    for ch in cfg.channels.values():
        base = cfg.broker.channels_dir / ch.name
        for sub in ("inbox/new", "inbox/tmp", "outbox/replies"):
            p2 = base / sub
            check(p2.is_dir() and not p2.is_symlink(), f"{p2} is a directory", "run `safespawn install`")
        if podman:
            q = subprocess.run([podman, "image", "exists", ch.image], capture_output=True, timeout=60, check=False)
            check(q.returncode == 0, f"image {ch.image} present (channel {ch.name})",
                  f"podman pull or load {ch.image}: sidecars run with --pull=never")
        try:
            with ChannelState.locked(str(cfg.broker.state_dir), ch.name, wait=False):
                pass
            check(True, f"state dir of {ch.name} usable")
        except ChannelLocked:
            check(True, f"state dir of {ch.name} usable (a sync holds it now)")
        except OSError as e:
            check(False, f"state dir of {ch.name} usable", str(e))
    return ExitCode.OK if problems == 0 else ExitCode.FAILED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safespawn", description="Run allowlisted sidecar containers for "
                                "less trusted containers, through a file channel.")
    p.add_argument("--config", help=f"configuration file (default: $SAFESPAWN_CONFIG or {config_path()})")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sync", help="serve the pending requests of channels and reconcile their sidecars")
    s.add_argument("channels", nargs="*")
    s.add_argument("--all", action="store_true", help="every configured channel")
    s.add_argument("--no-wait", action="store_true", help="skip a channel another sync holds")

    s = sub.add_parser("watch", help="sync channels as requests arrive (hosts without systemd)")
    s.add_argument("--interval", type=float, default=0.05, help="seconds between inbox polls")
    s.add_argument("--reconcile-interval", type=float, default=None, help="seconds between full syncs")

    s = sub.add_parser("status", help="show the sidecars of channels")
    s.add_argument("channel", nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--refusals", type=int, default=5, help="how many recent refusals to show")

    s = sub.add_parser("submit", help="client side: submit a request to a channel and wait for its reply")
    s.add_argument("--channel-dir", required=True)
    s.add_argument("--timeout", type=float, default=client.DEFAULT_TIMEOUT)
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

    sub.add_parser("check-config", help="validate the configuration and the profiles it names")
    sub.add_parser("doctor", help="check that this host can run safespawn")
    for module in ("units", "wrappers"):
        try:
            mod = importlib.import_module(f"safespawn.{module}")
        except ImportError:
            continue
        mod.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="safespawn: %(levelname)s %(message)s", stream=sys.stderr)
    if args.command == "submit":
        return cmd_submit(args)
    handlers = {"sync": cmd_sync, "watch": cmd_watch, "status": cmd_status, "check-config": cmd_check_config,
                "doctor": cmd_doctor}
    try:
        if args.config:
            os.environ["SAFESPAWN_CONFIG"] = args.config
        if hasattr(args, "handler"):
            rc: int = args.handler(args)
            return rc
        cfg = load_config(args.config)
        return handlers[args.command](args, cfg)
    except ConfigError as e:
        print(f"safespawn: configuration error: {e}", file=sys.stderr)
        return ExitCode.CONFIG


if __name__ == "__main__":
    sys.exit(main())
