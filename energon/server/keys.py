"""Keys: the optional API key both doors require when set, and the ZeroMQ door's CURVE key pair.

    energon keygen ./keys        # writes keys/server.key (public) and keys/server.key_secret,
                                 # prints a fresh API key
    energon serve ... --api-key "$KEY" --curve-secret-key keys/server.key_secret
    energon client ... --api-key "$KEY" --server-key keys/server.key

CURVE encrypts the ZeroMQ door and proves the server's identity to clients (who need its public
key); the API key, sent inside that encrypted channel, tells the server who may use it. Over HTTP
the API key is a bearer token (put TLS in front for other hosts than loopback).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

API_KEY_ENV = "ENERGON_API_KEY"
CURVE_SECRET_ENV = "ENERGON_CURVE_SECRET_KEY"  # server: path to server.key_secret
SERVER_KEY_ENV = "ENERGON_SERVER_KEY"  # client: path to server.key, or the Z85 key itself
Z85_KEY_CHARS = 40


def resolve_api_key(flag: str | None) -> str | None:
    """The flag's value, else $ENERGON_API_KEY, else None (no key required). '' means none."""
    value = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return value or None


def new_api_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return "energon-" + secrets.token_urlsafe(32)


def generate_curve_keys(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write a CURVE key pair as ZeroMQ certificates: (public file, secret file). The secret
    file is readable by its owner only. Raises OSError if the folder cannot be written."""
    import zmq.auth

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, "server")
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_server_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a server.key_secret certificate. Raises ValueError naming
    the file if it holds no secret key."""
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a CURVE secret certificate ({exc})") from None
    if not secret:
        raise ValueError(f"{path} holds no secret key: pass server.key_secret, not server.key")
    return public, secret


def load_public_key(value: str) -> bytes:
    """A server's public key from a certificate file or a 40-character Z85 string. Raises
    ValueError if it is neither."""
    if len(value) == Z85_KEY_CHARS and not Path(value).exists():
        return value.encode("ascii")
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{value}: not a CURVE public key or certificate ({exc})") from None
    return public


# ------------------------------------------------------------------------------ energon keygen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="where to write server.key and server.key_secret")


def main(args: argparse.Namespace) -> int:
    try:
        public, secret = generate_curve_keys(args.folder)
    except OSError as exc:
        print(f"energon keygen: {exc}", file=sys.stderr)
        return 1
    print(f"CURVE public key (give to clients):  {public}")
    print(f"CURVE secret key (keep on the server): {secret}")
    print("A fresh API key (optional):")
    print(f"  export {API_KEY_ENV}={new_api_key()}")
    print(f"Serve:  energon serve --zmq tcp://0.0.0.0:5555 --curve-secret-key {secret}")
    print(f"Client: energon client --connect tcp://HOST:5555 --server-key {public} 'Hello'")
    return 0
