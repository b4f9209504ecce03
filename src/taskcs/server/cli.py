"""``cs-server``: run, start, inspect and stop the local taskcs server.

    cs-server [serve] [options]     run in the foreground
    cs-server start [options]       start detached; returns once it accepts connections
    cs-server status [--json]       pid, endpoint, uptime, executors, task sets
    cs-server status --watch [S]    the same, redrawn every S seconds (1) until Ctrl-C
    cs-server dashboard [--open]    the URL of the running server's live dashboard
    cs-server stop [--now]          finish accepted work (or abort it) and exit
    cs-server keys init|show|trust KEY   this identity's CURVE key pair; allow a peer's key

Across machines (phase 4): ``--listen tcp://0.0.0.0:7700`` accepts peer servers and remote
clients whose keys are trusted (CURVE); ``--peer KEY@tcp://host:7700`` links to another
server, and work flows both ways over the link.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .._cli import entry_point  # issue #9: a closed stdout (| head) ends quietly
from ..errors import TaskcsError
from ..runtime import discovery, keys
from ..runtime import protocol as p


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _options_parser() -> argparse.ArgumentParser:
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--executors", type=int, default=os.cpu_count() or 1,
                      help="executor processes to run (default: one per core)")
    opts.add_argument("--idle-timeout", type=float, default=None,
                      help="exit after this many seconds with no clients and no work (0 = never; default 300, "
                           "or never with --listen or --peer)")
    opts.add_argument("--endpoint", help="ZeroMQ endpoint to bind (default: ipc socket in the runtime dir)")
    opts.add_argument("--insecure-bind", action="store_true",
                      help="allow a plaintext --endpoint that is not loopback (anyone who reaches it could run "
                           "code here: unsafe; use --listen, which is encrypted and authenticated)")
    opts.add_argument("--listen", action="append", default=[], metavar="tcp://HOST:PORT",
                      help="accept peer servers and remote clients here, CURVE-authenticated (repeatable)")
    opts.add_argument("--peer", action="append", default=[], metavar="KEY@tcp://HOST:PORT",
                      help="link to the peer server with this public key at this endpoint (repeatable)")
    opts.add_argument("--name", default="", help="this server's name among its peers (default: the host name)")
    opts.add_argument("--runtime-dir", type=Path, help="runtime directory (default: $TASKCS_RUNTIME_DIR, "
                      "$XDG_RUNTIME_DIR/taskcs or a private temp dir)")
    opts.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds")
    opts.add_argument("--client-credit", type=int, default=16384,
                      help="tasks one client may have queued or running (flow control; default 16384)")
    opts.add_argument("--start-method", choices=("fork", "spawn"), default="fork",
                      help="how the first executors are started (default fork: fastest)")
    opts.add_argument("--spin-us", type=_non_negative, default=None, metavar="US",
                      help="microseconds the server polls its socket before it blocks, while few tasks "
                           "are in flight (default: $TASKCS_SPIN_US or 1000; 0: never poll)")
    opts.add_argument("--engine", metavar="SPEC",  # issue 14
                      help="also send work to a cluster engine: dask://HOST:PORT, dask-local, ray://HOST:PORT, "
                           "ray-auto or ray-local (needs pip install 'taskcs[dask]' or 'taskcs[ray]')")
    opts.add_argument("--engine-grace", type=float, default=30.0, metavar="SECONDS",  # issue 14
                      help="seconds the engine may be unreachable, with no executor or peer to run queued "
                           "work instead, before that work fails naming the engine (default 30)")
    opts.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # --- issue 11: the live dashboard
    opts.add_argument("--dashboard", nargs="?", const="127.0.0.1:8787", default=None, metavar="HOST:PORT",
                      help="serve a live dashboard in the browser (default 127.0.0.1:8787, or a free port "
                           "if that is taken; beyond loopback the URL carries a token)")
    opts.add_argument("--dashboard-token", action="store_true",
                      help="require the token in the dashboard's URL even on loopback (other users of this "
                           "machine can reach loopback ports)")
    # --- end issue 11
    return opts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cs-server", description="The taskcs server.")
    sub = parser.add_subparsers(dest="command")
    opts = _options_parser()
    serve = sub.add_parser("serve", parents=[opts], help="run in the foreground")
    serve.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    sub.add_parser("start", parents=[opts], help="start detached (if none runs)")
    status = sub.add_parser("status", help="show what the server is doing")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.add_argument("--runtime-dir", type=Path)
    status.add_argument("--watch", nargs="?", type=float, const=1.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 1) until Ctrl-C, like top")  # issue 11
    dashboard = sub.add_parser("dashboard", help="print (or --open) the running server's dashboard URL")
    dashboard.add_argument("--open", action="store_true", help="open it in a web browser too")
    dashboard.add_argument("--runtime-dir", type=Path)  # issue 11
    stop = sub.add_parser("stop", help="stop the server")
    stop.add_argument("--now", action="store_true", help="abort queued and running tasks")
    stop.add_argument("--runtime-dir", type=Path)
    keys_cmd = sub.add_parser("keys", help="CURVE keys: init, show, trust KEY")
    keys_cmd.add_argument("action", choices=("init", "show", "trust", "list"))
    keys_cmd.add_argument("key", nargs="?", help="the public key to trust (for `trust`)")
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cs-server``."""
    argv = _keys_as_values(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = _parser().parse_args(argv)
    if getattr(args, "runtime_dir", None):
        os.environ["TASKCS_RUNTIME_DIR"] = str(args.runtime_dir)
    try:
        return int(_COMMANDS[args.command](args))
    except TaskcsError as exc:
        print(f"cs-server: {exc}", file=sys.stderr)
        return 1


def _keys_as_values(argv: list[str]) -> list[str]:
    """``--peer KEY@...`` and ``keys trust KEY`` with a key that starts with "-".

    One z85 key in 85 starts with "-", and argparse takes such a word for an option ("expected
    one argument"); the word after ``--peer`` or ``trust`` that is a key is joined to it instead.
    """
    out: list[str] = []
    words = iter(argv)
    for word in words:
        out.append(word)
        if word not in ("--peer", "trust"):
            continue
        value = next(words, None)
        if value is None:
            break
        if word == "--peer" and value.startswith("-") and keys.valid_key(value[:40]) and value[40:41] == "@":
            out[-1] = f"--peer={value}"
        elif word == "trust" and value.startswith("-") and keys.valid_key(value):
            out += ["--", value]
        else:
            out.append(value)
    return out


def _serve(args: argparse.Namespace) -> int:
    from .server import Server, ServerOptions

    level = logging.INFO if args.verbose or args.detached else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s cs-server[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    directory = discovery.runtime_dir()
    if args.endpoint is not None:
        check_bind(args.endpoint, args.insecure_bind)
    federated = bool(args.listen or args.peer or args.engine)
    if args.engine and not args.detached and _engine_refused(args.engine):  # issue 14
        return 2
    for address in args.listen:
        if not address.startswith("tcp://"):
            raise TaskcsError(f"--listen {address!r}: expected tcp://HOST:PORT")
    if args.endpoint is None:
        existing = discovery.live_record(directory)
        if existing is not None:
            print(f"cs-server: a server already runs in {directory} (pid {existing.pid})", file=sys.stderr)
            return 1
    options = ServerOptions(
        runtime_dir=directory, endpoint=args.endpoint, executors=max(0 if federated else 1, args.executors),
        idle_timeout=_idle_timeout(args), heartbeat=args.heartbeat, start_method=args.start_method,
        client_credit=max(1, args.client_credit), spin_us=args.spin_us, listen=tuple(args.listen),
        peers=tuple(args.peer), name=args.name,
        dashboard=args.dashboard, dashboard_token=args.dashboard_token,  # issue 11
        engine=args.engine or None, engine_grace=max(0.0, args.engine_grace),  # issue 14
    )
    if not args.detached:
        print(f"cs-server {os.getpid()} on {options.endpoint or discovery.default_endpoint(directory)}", flush=True)
    return Server(options).serve(ready_fd=args.ready_fd)


def _idle_timeout(args: argparse.Namespace) -> float:
    """300 s for an auto-started server; never for one that is part of a federation."""
    if args.idle_timeout is not None:
        return float(args.idle_timeout)
    # Issue 14: nor for one with an engine: a client would auto-start a plain one after it.
    return 0.0 if (args.listen or args.peer or args.engine) else 300.0


def _start(args: argparse.Namespace) -> int:
    if args.listen or args.peer:
        from ..runtime import keys
        from .links import parse_peer

        keys.load()  # refuse now, in the user's terminal, rather than in the detached server's log
        for i, address in enumerate(args.peer):
            parse_peer(address, i)
    if args.engine and _engine_refused(args.engine):  # issue 14: in the user's terminal
        return 2
    passthrough = ["--executors", str(args.executors), "--idle-timeout", str(_idle_timeout(args)),
                   "--heartbeat", str(args.heartbeat), "--start-method", args.start_method,
                   "--client-credit", str(args.client_credit)]
    if args.endpoint:
        check_bind(args.endpoint, args.insecure_bind)
        passthrough += ["--endpoint", args.endpoint]
    if args.insecure_bind:
        passthrough.append("--insecure-bind")
    if args.spin_us is not None:
        passthrough += ["--spin-us", str(args.spin_us)]
    for address in args.listen:
        passthrough += ["--listen", address]
    for address in args.peer:
        passthrough += [f"--peer={address}"]  # "=": a key may start with "-"
    if args.name:
        passthrough += ["--name", args.name]
    if args.dashboard is not None:  # issue 11
        from .dashboard import parse_address

        parse_address(args.dashboard)  # a bad address is refused here, not in the detached server's log
        passthrough += ["--dashboard", args.dashboard] + (["--dashboard-token"] if args.dashboard_token else [])
    if args.engine:  # issue 14
        passthrough += ["--engine", args.engine, "--engine-grace", str(args.engine_grace)]
    record, started = discovery.ensure_server(discovery.runtime_dir(), passthrough)
    state = "started" if started else "already running"
    print(f"cs-server {state}: pid {record.pid}, endpoint {record.endpoint}, log {record.log}")
    if not started and (args.listen or args.peer or args.engine or args.dashboard is not None):
        # The options of a new server cannot change a running one: say so rather than pretend.
        print("cs-server: the running server keeps its own options (--listen, --peer, --engine, --dashboard are "
              "not applied); `cs-server stop` it first to start one with these", file=sys.stderr)
    if args.dashboard is not None:  # issue 11
        return _dashboard(argparse.Namespace(open=False))
    return 0


# ---- issue 14
def _engine_refused(spec: str) -> bool:
    """Check ``--engine`` before anything starts; print one line and return True if unusable."""
    from ..engines import EngineError, preflight

    try:
        preflight(spec)
    except EngineError as exc:
        print(f"cs-server: {exc}", file=sys.stderr)
        return True
    return False
# ---- end issue 14


def check_bind(endpoint: str, forced: bool) -> None:
    """Refuse a tcp bind beyond loopback: task payloads are code, and this server has no
    authentication yet (CURVE keys arrive with federation), so anyone who can connect could
    run code as you."""
    if not endpoint.startswith("tcp://"):
        return
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.") or forced:
        return
    raise TaskcsError(
        f"refusing to bind {endpoint}: a non-loopback endpoint would let anyone who can reach it run "
        "code on this machine; bind 127.0.0.1, or pass --insecure-bind if you really mean it"
    )


def _record_or_fail(any_build: bool = False) -> discovery.ServerRecord | None:
    directory = discovery.runtime_dir()
    record = discovery.live_record(directory)
    if record is None and any_build:
        # A server of another taskcs build (one from before an upgrade, say): clients leave it
        # alone, but `stop` must still reach it, and STOP has not changed between builds.
        other = discovery.read_record(directory)
        if other is not None and other.version == p.VERSION and discovery.pid_alive(other.pid) \
                and discovery.accepts(other.endpoint):
            return other
    if record is None:
        print(f"cs-server: no server running in {discovery.runtime_dir()}", file=sys.stderr)
    return record


def _status(args: argparse.Namespace) -> int:
    from .control import request

    if getattr(args, "watch", None) is not None:  # issue 11
        from .watch import watch

        return watch(lambda: _status(argparse.Namespace(json=args.json)), max(0.1, args.watch))
    record = _record_or_fail()
    if record is None:
        return 1
    info = request(record.endpoint, p.StatusRequest())
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"cs-server pid {info['pid']} on {info['endpoint']}, up {_duration(info['uptime'])}, "
          f"protocol {info['version']}{', stopping' if info['draining'] else ''}")
    stats = info["stats"]
    print(f"  tasks: {stats['submitted']} submitted, {info['queued']} queued, {stats['done']} done, "
          f"{stats['failed']} failed, {stats['cancelled']} cancelled, {stats['retried']} retried")
    print(f"  clients: {len(info['clients'])} ({', '.join(info['clients']) or 'none'})")
    print(f"  executors ({len(info['executors'])}, {info['executors_replaced']} replaced):")
    for ex in info["executors"]:
        doing = ", ".join(ex["running"]) or "idle"
        print(f"    {ex['name']:<16} pid {ex['pid']:<7} done {ex['completed']:<8} "
              f"in flight {ex['in_flight']:<4} {doing}")
    print(f"  task sets ({len(info['sets'])}):")
    for s in info["sets"]:
        print(f"    {s['client']} set {s['set_id']}: queued {s['queued']} running {s['running']} "
              f"done {s['done']} failed {s['failed']} cancelled {s['cancelled']}")
    if info.get("dashboard"):  # issue 11
        print(f"  dashboard: {info['dashboard']}")
    if info.get("listen"):
        print(f"  listening (CURVE): {', '.join(info['listen'])}")
    peers = info.get("peers") or []
    if peers or info.get("listen"):
        print(f"  peers ({len(peers)}):")
        print(f"    {'name':<16} {'endpoint':<28} {'connected':<9} {'capacity':>8} {'forwarded':>9} {'returned':>8} "
              f"{'rtt':>9} {'offset':>10}")
        for peer in peers:
            rtt, offset = peer.get("rtt_ms"), peer.get("clock_offset_ms")  # issue 11: the link's round trip
            print(f"    {peer.get('name') or '?':<16} {peer['endpoint']:<28} {'yes' if peer['connected'] else 'no':<9} "
                  f"{peer.get('capacity', 0):>8} {peer.get('forwarded', 0):>9} {peer.get('returned', 0):>8} "
                  f"{'-' if rtt is None else f'{rtt:.2f}ms':>9} {'-' if offset is None else f'{offset:+.2f}ms':>10}")
    for engine in info.get("engines") or []:  # issue 14
        print(f"  engine {engine['kind']} at {engine['address']}: {engine['state']}, {engine['workers']} workers, "
              f"{engine['slots']} slots, in flight {engine['in_flight']} ({engine['batches_in_flight']} engine tasks), "
              f"done {engine['done']}, failed {engine['failed']}"
              + (f"\n    {engine['problem']}" if engine["problem"] else ""))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from .control import request

    record = _record_or_fail(any_build=True)
    if record is None:
        return 1
    request(record.endpoint, p.Stop(args.now))
    deadline = time.monotonic() + 60
    while discovery.pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # the server is not our child: no handle to wait on
    if discovery.pid_alive(record.pid):
        print(f"cs-server: pid {record.pid} still running after 60s", file=sys.stderr)
        return 1
    print(f"cs-server {record.pid} stopped")
    return 0


# --- issue 11: the live dashboard
def _dashboard(args: argparse.Namespace) -> int:
    """Print the running server's dashboard URL (it is in its STATUS reply); --open opens it."""
    from .control import request

    record = _record_or_fail()
    if record is None:
        return 1
    url = request(record.endpoint, p.StatusRequest()).get("dashboard")
    if not url:
        print("cs-server: this server has no dashboard; start it with `cs-server start --dashboard` "
              "(stop it first with `cs-server stop`)", file=sys.stderr)
        return 1
    print(f"dashboard: {url}")
    if args.open:
        import webbrowser

        if not webbrowser.open(url):
            print("cs-server: found no web browser to open it; paste the URL into one", file=sys.stderr)
    return 0
# --- end issue 11


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def _keys(args: argparse.Namespace) -> int:
    from ..runtime import keys

    if args.action == "init":
        pair, created = keys.init()
        print(pair.public.decode())
        where = keys.config_dir()
        print(f"cs-server: {'created a key pair' if created else 'a key pair already exists'} in {where}",
              file=sys.stderr)
    elif args.action == "show":
        print(keys.load().public.decode())
    elif args.action == "trust":
        if not args.key:
            raise TaskcsError("usage: cs-server keys trust PUBLIC_KEY (the other side's `cs-server keys show`)")
        path = keys.trust(args.key)
        print(f"cs-server: trusting {args.key} ({path})", file=sys.stderr)
    else:
        for key in sorted(keys.trusted()):
            print(key.decode())
    return 0


_COMMANDS = {"serve": _serve, "start": _start, "status": _status, "stop": _stop, "keys": _keys,
             "dashboard": _dashboard}  # issue 11: dashboard

if __name__ == "__main__":
    sys.exit(main())
