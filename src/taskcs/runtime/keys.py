"""CURVE key pairs and the list of trusted keys, in the per-user config directory.

Layout (the Guide's "ironhouse": both ends prove who they are, everything is encrypted)::

    $TASKCS_CONFIG_DIR, else $XDG_CONFIG_HOME/taskcs, else ~/.config/taskcs   mode 0700
        server.key            this identity's public key (ZPL certificate, as zmq.auth writes)
        server.key_secret     its secret key, mode 0600
        trusted/<name>.key    one public key a peer server or remote client may connect with

A secret key that others can read is no secret: a directory or key file with group or other
permission bits is refused with a message that says how to fix it, never silently used. The
same key pair serves a server's listening socket, its links to peers and a remote client.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import SecurityError

log = logging.getLogger(__name__)

PUBLIC = "server.key"
SECRET = "server.key_secret"
TRUSTED = "trusted"
#: A z85-encoded CURVE key: 32 bytes as 40 characters of the Z85 alphabet.
_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, both halves z85-encoded as bytes (what pyzmq's options take)."""

    public: bytes
    secret: bytes


def config_dir(create: bool = False) -> Path:
    """The per-user config directory; created with mode 0700 when ``create``."""
    env = os.environ.get("TASKCS_CONFIG_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_CONFIG_HOME"):
        path = Path(os.environ["XDG_CONFIG_HOME"]) / "taskcs"
    else:
        path = Path.home() / ".config" / "taskcs"
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        (path / TRUSTED).mkdir(mode=0o700, exist_ok=True)
    return path


def valid_key(text: str | bytes) -> bool:
    """True if ``text`` is a z85-encoded 32-byte public key."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return False
    return bool(_Z85.match(text))


def _check_private(path: Path, mode: int, what: str) -> None:
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise SecurityError(
            f"refusing to use {what} {path}: its mode is {stat.S_IMODE(st.st_mode):04o}, so other users may "
            f"read it; run `chmod {mode:o} {path}` (and keep it private)"
        )
    if st.st_uid != os.getuid():
        raise SecurityError(f"refusing to use {what} {path}: it belongs to uid {st.st_uid}, not to you")


def _read_key(path: Path, field: str) -> bytes:
    for line in path.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == field:
            key = value.strip().strip('"')
            if valid_key(key):
                return key.encode()
    raise SecurityError(f"{path} holds no valid {field}; recreate it with `cs-server keys init`")


def _write(path: Path, text: str, mode: int) -> None:
    # os.open with the mode: the secret is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _certificate(public: bytes, secret: bytes | None = None) -> str:
    text = "#   ZeroMQ CURVE certificate written by taskcs (cs-server keys)\nmetadata\ncurve\n"
    text += f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def init(directory: Path | None = None) -> tuple[KeyPair, bool]:
    """This identity's key pair, created when missing; (pair, created)."""
    directory = directory or config_dir(create=True)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / TRUSTED).mkdir(mode=0o700, exist_ok=True)
    if (directory / SECRET).exists():
        return load(directory), False
    import zmq

    public, secret = zmq.curve_keypair()
    while public.startswith(b"-"):  # one in 85: a key people paste after --peer or trust
        public, secret = zmq.curve_keypair()  # would read as an option to argparse
    _write(directory / SECRET, _certificate(public, secret), 0o600)
    _write(directory / PUBLIC, _certificate(public), 0o644)
    log.info("created a CURVE key pair in %s", directory)
    return KeyPair(public, secret), True


def load(directory: Path | None = None) -> KeyPair:
    """This identity's key pair; SecurityError saying what to run when it is missing or unsafe."""
    directory = directory or config_dir()
    secret_file = directory / SECRET
    if not secret_file.exists():
        raise SecurityError(f"no key pair in {directory}: run `cs-server keys init` first")
    _check_private(directory, 0o700, "the key directory")
    _check_private(secret_file, 0o600, "the secret key file")
    return KeyPair(_read_key(secret_file, "public-key"), _read_key(secret_file, "secret-key"))


def trust(key: str, directory: Path | None = None) -> Path:
    """Allow connections authenticated with public ``key``; returns the file written."""
    if not valid_key(key):
        raise SecurityError(f"{key!r} is not a CURVE public key (40 characters of z85, "
                            "as `cs-server keys show` prints)")
    directory = directory or config_dir(create=True)
    trusted = directory / TRUSTED
    trusted.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The file name owns nothing of the key's meaning; a digest keeps it filesystem-safe.
    path = trusted / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.key"
    _write(path, _certificate(key.encode()), 0o644)
    return path


def trusted(directory: Path | None = None) -> set[bytes]:
    """Every trusted public key (z85 bytes); read afresh so `keys trust` needs no restart."""
    folder = (directory or config_dir()) / TRUSTED
    keys: set[bytes] = set()
    if not folder.is_dir():
        return keys
    for path in sorted(folder.glob("*.key")):
        try:
            keys.add(_read_key(path, "public-key"))
        except (SecurityError, OSError) as exc:
            log.warning("ignoring trusted key file %s: %s", path, exc)
    return keys
