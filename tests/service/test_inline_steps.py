"""Where a large step runs: on the event loop when no other step overlaps it (no thread hop), in a worker thread
when others do. Either way the answers are the same; a real uvicorn server in a thread of this process."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from optserve.client import AsyncClient, Client
from optserve.client.errors import APIError
from optserve.service.embedded import EmbeddedServer
from optserve.service.store import INLINE_ALONE_BYTES, INLINE_STATE_BYTES, MemoryStore

N = 300_000  # 1.2 MB of float32: above the always-inline size, below the alone-inline one
assert INLINE_STATE_BYTES < 4 * N <= INLINE_ALONE_BYTES


def test_overlapping_and_lone_large_steps_answer_alike(server: EmbeddedServer) -> None:
    """Four sessions stepped at once (each step overlaps others: threads) and four twins stepped one at a time
    (alone: on the loop) end bit for bit equal; the count of running steps is back to zero, refusals included."""
    rng = np.random.default_rng(5)
    start = {"w": rng.standard_normal(N).astype(np.float32)}
    grads = [{"w": rng.standard_normal(N).astype(np.float32)} for _ in range(3)]

    async def together() -> list[np.ndarray]:
        async with AsyncClient(server.url) as client:
            ids = [(await client.create_session(start, "adamw"))["id"] for _ in range(4)]
            for g in grads:
                results = await asyncio.gather(*(client.step(sid, g) for sid in ids))
            out = [r.params["w"].copy() for r in results if r.params is not None]
            for sid in ids:
                await client.delete_session(sid)
            return out

    overlapped = asyncio.run(together())
    with Client(server.url) as client:
        sid = client.create_session(start, "adamw")["id"]
        for g in grads:
            alone = client.step(sid, g)
        with pytest.raises(APIError) as refused:  # a refused step leaves nothing counted
            client.step(sid, {"w": np.full(N, np.nan, np.float32)})
        assert refused.value.status == 422
        client.delete_session(sid)
    assert alone.params is not None and len(overlapped) == 4
    for params in overlapped:
        np.testing.assert_array_equal(params, alone.params["w"])
    if isinstance(server.store, MemoryStore):  # (the [ray] twin's hosts count theirs in their own processes)
        assert server.store._steps_running == 0
