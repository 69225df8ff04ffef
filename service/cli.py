"""The ``optserve`` command: ``optserve serve [--host --port --data-dir]``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="optserve", description="Remote optimizer stepping service.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server (settings also from OPTSERVE_* variables)")
    serve.add_argument("--host", help="address to bind (OPTSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (OPTSERVE_PORT, default 8000)")
    serve.add_argument("--data-dir", help="folder for server state (OPTSERVE_DATA_DIR, default ./data)")
    serve.add_argument("--log-level", help="uvicorn log level (OPTSERVE_LOG_LEVEL, default info)")
    args = parser.parse_args(argv)

    if args.command == "serve":
        import uvicorn

        from .app import create_app
        from .bodies import HTTP_PROTOCOL
        from .observability import configure_logging
        from .settings import Settings

        overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
        settings = Settings(**overrides)
        configure_logging(settings.log_level, settings.log_format == "json")
        os.makedirs(settings.data_dir, exist_ok=True)
        # One process: sessions live in its memory, so several workers would each hold a different subset.
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=None,  # configure_logging's handlers: text or JSON lines
            access_log=False,  # one line per request comes from optserve's own middleware, with a request id
            http=HTTP_PROTOCOL,
            # SIGTERM/SIGINT: stop accepting, give in-flight requests this long, then snapshot and exit (the
            # default leaves 2 s of Docker's 10 s for the snapshots)
            timeout_graceful_shutdown=max(1, int(settings.graceful_shutdown_seconds)),
        )


if __name__ == "__main__":
    main()
