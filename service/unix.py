"""The server's Unix socket (``optserve serve --uds PATH``): the fastest way to a server on the same machine.

A step's body and answer cross a Unix socket in about half the time they take over loopback TCP (a 4 MB exchange
each way: 0.9 ms against 2.3 ms here, with the wider buffers both ends ask for), which is most of what a large
remote step costs beyond the optimizer's own work. The server listens there next to its TCP port; clients name it
``unix:///path`` (see :func:`optserve.client.http.split_url`).

The socket is made readable and writable by its owner only (a TCP port on 127.0.0.1 is open to every local user):
clients run as the server's user, or the admin key and session tokens decide as on TCP after a ``chmod``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator

PERMISSIONS = 0o600


class SocketInUse(RuntimeError):
    """The path is taken: a server listens there, or it is not a socket at all."""


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:  # refused (a socket file nobody listens on), or gone
        return False
    finally:
        probe.close()
    return True


def bind(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, owner-only; a stale socket file left by a server that died is replaced.

    Raises :class:`SocketInUse` when a server answers there or the path is something else (never deleted), and
    ``OSError`` when it cannot be made (a missing folder, a path longer than the 107 bytes Linux takes)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise SocketInUse(f"{path} exists and is not a socket; not replacing it")
        if _listening(path):
            raise SocketInUse(f"a server already listens on {path}")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~PERMISSIONS)  # created with its final permissions: never open to others, even briefly
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


@contextlib.contextmanager
def listening(path: str) -> Iterator[socket.socket]:
    """:func:`bind`, and the socket file removed afterwards (if it is still the one made here)."""
    sock = bind(path)
    made = os.stat(path).st_ino
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == made:
                os.unlink(path)
