"""Sessions that clean up after themselves.

A session an optimizer created without a name (``RemoteOptimizer(params)``, ``RemoteAdamW(model.parameters())``) is
held on a :class:`Lease`: it is deleted on the server when the optimizer is closed, garbage collected, or when the
interpreter exits normally, so training scripts that never call ``close()`` (HF Trainer, Lightning, most scripts)
leave nothing behind. ``keep=True``, a named session or an attached one are not leased. A process that dies without
exiting normally cannot delete anything: the server deletes sessions idle for ``OPTSERVE_SESSION_EXPIRE_SECONDS``.

Deleting is best effort and bounded (one request, a few seconds at most); a process forked from the owner (a data
loader worker, for example) never deletes its parent's session.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any

import httpx

from .http import split_url
from .protocol import Credentials

DELETE_TIMEOUT = 5.0


def _delete(url: str, credentials: Credentials, session_id: str, pid: int) -> None:
    if os.getpid() != pid:  # a forked child: the session is its parent's
        return
    path = f"/v1/sessions/{session_id}"
    base, uds = split_url(url)
    transport = httpx.HTTPTransport(uds=uds) if uds is not None else None
    # the server is gone: it expires idle sessions itself
    with contextlib.suppress(httpx.HTTPError, OSError), httpx.Client(transport=transport, timeout=DELETE_TIMEOUT) as c:
        c.delete(f"{base}{path}", headers=credentials.headers(path))


class Lease:
    """Deletes ``session_id`` when ``owner`` is closed (:meth:`end`), collected, or the interpreter exits."""

    def __init__(self, owner: Any, url: str, credentials: Credentials, session_id: str) -> None:
        self.session_id = session_id
        self._finalizer = weakref.finalize(owner, _delete, url, credentials, session_id, os.getpid())

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def end(self) -> None:
        """Delete the session now (once)."""
        self._finalizer()

    def keep(self) -> None:
        """Keep the session on the server after all."""
        self._finalizer.detach()


def settle(lease: Lease | None, client: Any, session_id: str, delete: bool | None) -> None:
    """What an optimizer's ``close(delete)`` does with its session: ``None`` deletes it if it is leased (best
    effort), ``True`` deletes it in any case (errors raised), ``False`` keeps it."""
    if lease is not None:
        if delete is None:
            lease.end()
            return
        lease.keep()
    if delete:
        client.delete_session(session_id)
