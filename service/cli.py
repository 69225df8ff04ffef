"""The ``optserve`` command.

    optserve serve [--host H] [--port P] [--uds PATH] [--data-dir D] [--log-level L]
    optserve sessions list|info ID|delete ID            [--url URL] [--token T]
    optserve checkpoint export ID FILE | import ID FILE  [--url URL] [--token T]
    optserve loadtest [--clients N] [--params P] [--duration S | --steps K] [--csv F] [--plot F.png] [--url] [--token]

``--url`` defaults to ``OPTSERVE_URL``, else the address of ``OPTSERVE_HOST``/``OPTSERVE_PORT`` (what ``optserve
serve`` binds), else http://127.0.0.1:8000; ``--token`` to ``OPTSERVE_TOKEN`` (the admin
key or a session's token when auth is on).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="the server (default: OPTSERVE_URL, else OPTSERVE_HOST/PORT)")
    parser.add_argument("--token", default=os.environ.get("OPTSERVE_TOKEN"), help="admin key or session token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optserve", description="Remote optimizer stepping service.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server (settings also from OPTSERVE_* variables)")
    serve.add_argument("--host", help="address to bind (OPTSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (OPTSERVE_PORT, default 8000)")
    serve.add_argument("--uds", help="also listen on this Unix socket (OPTSERVE_UDS; clients: unix:///PATH)")
    serve.add_argument("--data-dir", help="folder for snapshots (OPTSERVE_DATA_DIR, default ./data)")
    serve.add_argument("--log-level", help="log level (OPTSERVE_LOG_LEVEL, default info)")

    sessions = commands.add_parser("sessions", help="list, show or delete sessions")
    verbs = sessions.add_subparsers(dest="verb", required=True)
    _client_args(verbs.add_parser("list", help="every session: id, optimizer, step, size"))
    for verb in ("info", "delete"):
        p = verbs.add_parser(verb, help=f"{verb} one session")
        p.add_argument("session_id")
        _client_args(p)

    checkpoint = commands.add_parser("checkpoint", help="export a session to a file, or import one")
    verbs = checkpoint.add_subparsers(dest="verb", required=True)
    for verb, what in (
        ("export", "write the session's checkpoint to FILE"),
        ("import", "create or replace it from FILE"),
    ):
        p = verbs.add_parser(verb, help=what)
        p.add_argument("session_id")
        p.add_argument("file", type=Path)
        _client_args(p)

    load = commands.add_parser("loadtest", help="concurrent simulated training clients, then a report")
    load.add_argument("--clients", type=int, default=8)
    load.add_argument("--params", type=int, default=100_000, help="parameters per client session")
    load.add_argument("--optimizer", default="adamw")
    bound = load.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, default=None, help="seconds (default 10, at most 3600)")
    bound.add_argument("--steps", type=int, default=None, help="steps per client")
    load.add_argument("--csv", type=Path, help="write every step (client, start, latency, ok) to this CSV")
    load.add_argument("--plot", type=Path, help="write a PNG of throughput and latency over time (needs matplotlib)")
    load.add_argument("--no-progress", action="store_true")
    _client_args(load)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "sessions":
        sessions(args)
    elif args.command == "checkpoint":
        checkpoint(args)
    elif args.command == "loadtest":
        loadtest(args)


def serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:  # the plain install is the client
        raise SystemExit(f"optserve serve needs the server's dependencies ({e.name} is missing): "
                         "pip install 'optserve[server]'") from None  # fmt: skip

    from .bodies import HTTP_PROTOCOL
    from .observability import configure_logging
    from .settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format == "json")
    # Hostile gradients can overflow float32 sums (norms of 1e30s): that is handled as data (the step is refused or
    # skipped), not worth a warning per request in the log.
    import numpy as np

    np.seterr(over="ignore", invalid="ignore")
    os.makedirs(settings.data_dir, exist_ok=True)
    # One process: sessions live in its memory, so several workers would each hold a different subset.
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # configure_logging's handlers: text or JSON lines
        access_log=False,  # one line per request comes from optserve's own middleware, with a request id
        http=HTTP_PROTOCOL,
        # SIGTERM/SIGINT: stop accepting, give in-flight requests this long, then snapshot and exit (the
        # default leaves time within Docker's 10 s for the snapshots)
        timeout_graceful_shutdown=max(1, int(settings.graceful_shutdown_seconds)),
    )
    server = uvicorn.Server(config)
    if settings.uds is None:
        server.run()
    else:  # the TCP port and the Unix socket, served by the same app and loop
        _serve_both(server, config, settings.uds)
    if not server.started:
        raise SystemExit(3)  # uvicorn's exit status for a server that could not start


def _serve_both(server: uvicorn.Server, config: uvicorn.Config, path: str) -> None:
    import contextlib
    import logging

    from . import unix

    with contextlib.ExitStack() as stack:
        try:
            unix_socket = stack.enter_context(unix.listening(path))
        except (unix.SocketInUse, OSError) as e:
            raise SystemExit(f"optserve serve --uds {path}: {e}") from None
        tcp_socket = config.bind_socket()  # logs where it listens (and exits when it cannot bind)
        logging.getLogger("optserve").info("listening on unix://%s", path)
        shutdown = server.shutdown

        async def shutdown_then_remove(sockets: list | None = None) -> None:  # type: ignore[type-arg]
            # uvicorn raises the SIGTERM it caught again once it has stopped, which ends the process before this
            # block's exit: the socket file goes with the shutdown
            try:
                await shutdown(sockets)
            finally:
                stack.close()

        server.shutdown = shutdown_then_remove  # type: ignore[method-assign]
        server.run(sockets=[tcp_socket, unix_socket])


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from optserve.client import Client

    return Client(args.url, token=args.token)


def _fail(error: Exception) -> None:
    print(f"optserve: {error}", file=sys.stderr)
    raise SystemExit(1)


def sessions(args: argparse.Namespace) -> None:
    from optserve.client import OptserveError

    try:
        with _client(args) as client:
            if args.verb == "list":
                rows = client.list_sessions()
                print(f"{'id':34} {'optimizer':9} {'step':>8} {'params':>12}")
                for s in rows:
                    print(f"{s['id']:34} {s['optimizer']:9} {s['step']:>8} {s['num_params']:>12}")
            elif args.verb == "info":
                print(json.dumps(client.session(args.session_id), indent=2))
            else:
                client.delete_session(args.session_id)
                print(f"deleted {args.session_id}")
    except OptserveError as e:
        _fail(e)


def checkpoint(args: argparse.Namespace) -> None:
    from optserve.client import OptserveError

    try:
        with _client(args) as client:
            if args.verb == "export":
                data = client.checkpoint(args.session_id)
                args.file.write_bytes(data)
                print(f"wrote {len(data)} bytes to {args.file}")
            else:
                info = client.restore(args.session_id, args.file.read_bytes())
                print(f"session {info['id']} at step {info['step']} from {args.file}")
    except (OptserveError, OSError) as e:
        _fail(e)


def loadtest(args: argparse.Namespace) -> None:
    from optserve.client import OptserveError

    from . import loadtest as lt

    duration = args.duration if args.duration is not None else (None if args.steps is not None else 10.0)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the test, not after it
        _fail(RuntimeError("--plot needs matplotlib: pip install matplotlib"))
    try:
        report = asyncio.run(
            lt.run(args.url, args.clients, args.params, duration, args.steps, args.optimizer, args.token,
                   progress=not args.no_progress)
        )  # fmt: skip
    except OptserveError as e:
        _fail(e)
    print(lt.table(report, args.clients, args.params))
    if args.csv:
        lt.write_csv(report, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        lt.plot(report, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
