"""`energon serve`: one process, one Engine, the ZeroMQ and HTTP doors at once.

    energon serve --model tiny --zmq tcp://127.0.0.1:5555 --http 127.0.0.1:8000

Both doors listen on loopback unless told otherwise. SIGINT/SIGTERM drain gracefully: new
requests get 503 (HTTP) or an `unavailable` error (ZeroMQ) while those in flight finish for up to
--grace seconds; any still running then end with finish_reason "abort" and the reason. A second
signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys

from energon.commands.options import add_engine_arguments, engine_kwargs
from energon.server.keys import CURVE_SECRET_ENV, resolve_api_key

log = logging.getLogger("energon.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--served-model-name", default=None, help="the model id clients use")
    parser.add_argument(
        "--http", default=None, metavar="HOST:PORT", help="HTTP door (default 127.0.0.1:8000)"
    )
    parser.add_argument(
        "--zmq", default=None, metavar="ADDRESS", help="ZeroMQ door, e.g. tcp://127.0.0.1:5555"
    )
    parser.add_argument(
        "--api-key", default=None, help="required from clients on both doors (or $ENERGON_API_KEY)"
    )
    parser.add_argument(
        "--curve-secret-key",
        default=None,
        help=f"server.key_secret from `energon keygen`: CURVE on the ZeroMQ door (or ${CURVE_SECRET_ENV})",
    )
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="cap on max_tokens")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to drain on shutdown")
    parser.add_argument(
        "--loop", default="auto", choices=["auto", "asyncio", "uvloop"], help="event loop"
    )


def parse_http(value: str) -> tuple[str, int]:
    """'127.0.0.1:8000' / '[::1]:8000' / ':8000' -> (host, port). Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--http must be HOST:PORT (got {value!r})")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(args: argparse.Namespace, ready=None) -> int:
    """Run until SIGINT/SIGTERM. `ready(addresses)` is called once both doors listen."""
    import os

    from energon.engine import Engine
    from energon.server.frontend import Frontend, Limits
    from energon.server.keys import load_server_secret

    http = parse_http(args.http) if args.http else None
    if http is None and not args.zmq:
        http = ("127.0.0.1", 8000)
    api_key = resolve_api_key(args.api_key)
    curve_path = args.curve_secret_key or os.environ.get(CURVE_SECRET_ENV)
    curve = load_server_secret(curve_path) if curve_path else None
    if args.zmq and api_key and curve is None:
        log.warning(
            "energon: the ZeroMQ door sends the API key unencrypted: "
            "run `energon keygen DIR` and pass --curve-secret-key DIR/server.key_secret"
        )
    for host in [http[0]] if http else []:
        if not _is_loopback(host) and not api_key:
            log.warning(
                "energon: HTTP door on %s without --api-key: anyone who reaches it may use it", host
            )

    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("energon: second signal: stopping now")
            raise SystemExit(130)
        log.info("energon: draining (up to %.0f s); signal again to stop now", args.grace)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    engine = Engine(args.model, **engine_kwargs(args))
    limits = Limits(max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens_limit)
    frontend = Frontend(engine, model_name=args.served_model_name, limits=limits, api_key=api_key)
    doors = []
    await engine.start()
    try:
        addresses = {}
        if http:
            from energon.server.http_door import HttpDoor

            door = HttpDoor(frontend, *http)
            addresses["http"] = await door.start()
            doors.append(door)
        if args.zmq:
            from energon.server.zmq_door import ZmqDoor

            door = ZmqDoor(frontend, args.zmq, curve_keys=curve)
            addresses["zmq"] = await door.start()
            doors.append(door)
        for name, address in addresses.items():
            print(f"energon: {name} door on {address}", flush=True)
        if ready is not None:
            ready(addresses)
        await stop.wait()
        left = await frontend.drain(args.grace)
        if left:
            log.warning(
                "energon: aborting %d request(s) still running after %.0f s", left, args.grace
            )
            await engine.shutdown()  # ends every request with finish_reason "abort"
            await frontend.drain(5.0)  # while the doors send those requests' last replies
    finally:
        for door in reversed(doors):
            await door.close()
        await engine.shutdown()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("energon: stopped")
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from energon.errors import EnergonError

    try:
        if args.http:
            parse_http(args.http)
    except ValueError as exc:
        print(f"energon serve: {exc}", file=sys.stderr)
        return 2
    use_uvloop = args.loop == "uvloop"
    if args.loop == "auto":
        try:
            import uvloop  # noqa: F401

            use_uvloop = True
        except ImportError:
            pass
    try:
        if use_uvloop:
            import uvloop

            return uvloop.run(serve(args))
        return asyncio.run(serve(args))
    except (EnergonError, ValueError, OSError) as exc:
        print(f"energon serve: {exc}", file=sys.stderr)
        return 2
