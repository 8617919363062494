"""promptmill review OUTPUT [--port 8765] [--token T] [--reviewer NAME]: the review page over a finished run."""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import socket
import time

from promptmill.jobs import add_storage_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="a web page to approve / reject a run's images (127.0.0.1, token required)")
    p.add_argument("output", help="output URL of a generate job (local or s3://)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="access token (default: $PROMPTMILL_REVIEW_TOKEN, else a random one)")
    p.add_argument("--reviewer", default=None, help="the name every decision from this server is signed with "
                   "(default: $PROMPTMILL_REVIEWER, else your login name)")
    p.add_argument("--product-column", default=None, help="kept input column naming the product (default: product, sku)")
    add_storage_options(p, "the run")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import uvicorn
    from promptmill.jobs import error
    from promptmill.pipelines.review.app import TOKEN_ENV, build_app, new_token
    from promptmill.pipelines.review.grid import Grid

    token = args.token or os.environ.get(TOKEN_ENV) or new_token()
    reviewer = args.reviewer or os.environ.get("PROMPTMILL_REVIEWER") or getpass.getuser()
    t0 = time.perf_counter()
    try:
        grid = Grid(args.output, args.storage_options, args.product_column)
    except (FileNotFoundError, ValueError) as e:
        return error(e)
    app = build_app(grid, token, reviewer)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)  # bound and listening before the URL is printed (port 0: any)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        return error(OSError(f"--host {args.host} --port {args.port}: cannot bind ({e.strerror})"))
    sock.listen(128)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"promptmill review: {len(grid.table)} images of {args.output} opened in {time.perf_counter() - t0:.2f} s",
          flush=True)
    print(f"    http://{host}:{port}/?token={token}", flush=True)
    if not ipaddress.ip_address(socket.getaddrinfo(args.host, None)[0][4][0]).is_loopback:
        print(f"promptmill review: warning: {args.host} is reachable from other machines over plain HTTP; the token is "
              "the only guard (put TLS in front)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
