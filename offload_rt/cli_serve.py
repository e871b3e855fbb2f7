"""``offload-rt serve``: the model behind an OpenAI-compatible HTTP API (``offload_rt.server``).

Parses the flags and calls the server; the server's libraries (starlette, uvicorn) are
imported only here at run time, so ``offload-rt`` and ``import offload_rt`` work without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import Any

from offload_rt.cli_options import (
    add_model_argument,
    add_runtime_arguments,
    int_at_least,
    model_dir,
    progress_bar,
    runtime_options,
)
from offload_rt.errors import OptionError

log = logging.getLogger(__name__)
API_KEY_ENV = "OFFLOAD_RT_API_KEY"
INSTALL = "pip install 'offload_rt[serve]'"
SERVE_STATUS = """exit status:
  0    stopped by SIGTERM (after the running generation finished or was cancelled)
  2    a usage error, or an error printed as "offload-rt: error: ..."
  130  stopped by Ctrl-C (SIGINT)"""


def add_serve_parser(subparsers: Any,
                     parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``serve`` on the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "serve", parents=parents, help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve one model at /v1/chat/completions, /v1/completions and /v1/models\n"
                    "(OpenAI's API), /health and /metrics. Requests run one at a time in\n"
                    f"arrival order. Needs the server extra: {INSTALL}.",
        epilog=SERVE_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s, this machine only)")
    group.add_argument("--port", type=_port, default=8000,
                       help="TCP port; 0 picks a free one, printed on stdout (default: "
                            "%(default)s)")
    group.add_argument("--api-key", metavar="KEY", default=None,
                       help="require 'Authorization: Bearer KEY' (default: "
                            f"${API_KEY_ENV} when set, else no key)")
    group.add_argument("--model-name", metavar="NAME", default=None,
                       help="the model's id in the API (default: the folder's name)")
    group.add_argument("--max-queue", metavar="N", type=int_at_least(0), default=16,
                       help="requests that may wait behind the running one; more get 429 "
                            "(default: %(default)s)")
    group.add_argument("--max-body-size", metavar="SIZE", default="1MiB",
                       help="largest request body, e.g. 1MiB; larger get 413 (default: "
                            "%(default)s)")
    group.add_argument("--shutdown-timeout", metavar="S", type=float, default=10.0,
                       help="on SIGINT/SIGTERM, seconds the running generation may take to "
                            "finish before it is cancelled (default: %(default)s)")
    add_runtime_arguments(parser)
    parser.set_defaults(run=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Bind the address, load the model, serve until SIGINT/SIGTERM."""
    serve = _server_module()
    import offload_rt
    from offload_rt.engine.sizes import parse_size
    from offload_rt.server.app import ServerSettings

    folder = model_dir(args)
    api_key = _api_key(args.api_key)
    if args.shutdown_timeout < 0:
        raise OptionError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout:g}")
    settings = ServerSettings(
        model_name=args.model_name or folder.name, api_key=api_key, max_queue=args.max_queue,
        max_body_size=_size(args.max_body_size, parse_size),
        shutdown_timeout_s=args.shutdown_timeout)
    _warn_if_open(args.host, api_key)
    sock = serve.bind(args.host, args.port)
    try:
        with offload_rt.load(folder, progress=progress_bar(True), **runtime_options(args)) as rt:
            server = serve.make_server(rt, settings, sock, "info", sys.stdout)
            serve.run(server, sock)
    finally:
        sock.close()
    return 0


def _size(text: str, parse_size: Any) -> int:
    size = parse_size(text, "--max-body-size")
    if size is None:
        raise OptionError("--max-body-size needs a size, e.g. 1MiB (auto has no meaning here)")
    return int(size)


def _server_module() -> Any:
    """``offload_rt.server.serve``, or an OptionError saying how to install its libraries."""
    try:
        from offload_rt.server import serve
    except ImportError as exc:
        raise OptionError(f"offload-rt serve needs the server libraries (starlette, uvicorn); "
                          f"{exc.name or exc} is not installed: {INSTALL}") from None
    return serve


def _api_key(flag: str | None) -> str | None:
    """--api-key, else $OFFLOAD_RT_API_KEY, else None (no key). A key a client cannot send
    (empty, or with spaces or control characters: HTTP strips or refuses them in the
    Authorization header) is refused by where it came from."""
    source, key = ("--api-key", flag) if flag is not None else \
        (f"${API_KEY_ENV}", os.environ.get(API_KEY_ENV))
    if key is None:
        return None
    if not key or not key.isprintable() or any(c.isspace() for c in key) or not key.isascii():
        raise OptionError(f"{source} {key!r}: an API key must be printable ASCII without spaces "
                          f"(clients send it as 'Authorization: Bearer KEY'); give such a key, "
                          f"or {'leave --api-key out' if flag is not None else 'unset it'} to "
                          "serve without one")
    return key


def _warn_if_open(host: str, api_key: str | None) -> None:
    if api_key is None and not _loopback(host):
        log.warning("serving on %s without --api-key: anyone who can reach this machine can "
                    "use the model", host)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 0..65535, got {value}")
    return value
