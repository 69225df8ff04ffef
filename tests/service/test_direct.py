"""The Ray store's direct data path (optserve.service.direct) on its own: frames over real sockets on 127.0.0.1,
the secret, errors crossing whole, and the shared-memory buffers a front lends its node's host."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from optserve.client import shm
from optserve.client.shm import Segments
from optserve.service import direct
from optserve.service.direct import (
    PREFIX,
    DirectPool,
    DirectServer,
    FrameProtocol,
    Mappings,
    NoSharedMemory,
    ProtocolError,
)
from optserve.service.errors import PreconditionFailed


def frame_bytes(header: dict[str, Any], layout: bytes = b"", data: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return PREFIX.pack(len(head), len(layout), len(data)) + head + layout + data


@pytest.mark.parametrize("size", [0, 7, direct.INLINE - 1, direct.INLINE, shm.SHM_MIN + 3])
def test_frames_arrive_whole_however_the_bytes_are_cut(size: int) -> None:
    rng = random.Random(size)
    data = bytes(rng.getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 + 1)
    data = data[:size]
    stream = frame_bytes({"a": 1}, b"[1]", data) + frame_bytes({"b": 2}) + frame_bytes({"c": 3}, b"", b"xyz")
    got: list[Any] = []
    taken: list[int] = []

    def take(n: int) -> bytearray:
        taken.append(n)
        return bytearray(n)

    protocol = FrameProtocol(take, on_frame=got.append)
    pos = 0
    while pos < len(stream):  # what recv would hand over: at most the buffer offered, in random pieces
        buffer = protocol.get_buffer(-1)
        n = min(len(buffer), rng.randint(1, 70_000), len(stream) - pos)
        buffer[:n] = stream[pos : pos + n]
        protocol.buffer_updated(n)
        pos += n
    assert [(h, layout, bytes(d)) for h, layout, d in got] == [({"a": 1}, b"[1]", data), ({"b": 2}, b"", b""),
                                                               ({"c": 3}, b"", b"xyz")]  # fmt: skip
    assert taken == ([size] if size >= direct.INLINE else [])  # large data straight into a buffer of the pool


def test_a_frame_header_that_is_not_json_closes_the_connection() -> None:
    protocol = FrameProtocol(bytearray, on_frame=lambda f: None)
    closed: list[bool] = []
    protocol.close = lambda: closed.append(True)  # type: ignore[method-assign]
    bad = PREFIX.pack(3, 0, 0) + b"{x]"
    buffer = protocol.get_buffer(-1)
    buffer[: len(bad)] = bad
    protocol.buffer_updated(len(bad))
    assert closed == [True]


async def _echo(header: dict[str, Any], data: memoryview) -> tuple[dict[str, Any], bytes, tuple[Any, ...]]:
    if header.get("fail"):
        raise_it = PreconditionFailed("If-Match names 3; the session is at step 4", current_step=4)
        return direct.error_header(raise_it), b"", ()
    return {"echo": header, "n": len(data)}, b"layout", (bytes(data[::-1]),)


def test_requests_and_answers_over_real_sockets_with_the_secret_and_errors_crossing_whole() -> None:
    async def main() -> None:
        server = DirectServer("s3cret", _echo, bytearray)
        address = await server.start("127.0.0.1")
        pool = DirectPool("s3cret", bytearray)
        try:
            for size in (0, 10, 300_000, 3_000_000):
                data = np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8).tobytes()
                header, layout, answer = await pool.exchange(address, {"op": "x", "size": size}, [data])
                assert header == {"echo": {"op": "x", "size": size}, "n": size} and layout == b"layout"
                assert bytes(answer) == data[::-1]
            assert len(pool._idle[address]) == 1  # one connection, reused
            # several at once: a connection each
            answers = await asyncio.gather(*(pool.exchange(address, {"i": i}, [b"ab"]) for i in range(5)))
            assert [a[0]["echo"]["i"] for a in answers] == list(range(5))
            header, _, _ = await pool.exchange(address, {"fail": True}, [])
            with pytest.raises(PreconditionFailed) as caught:
                direct.raise_error(header)
            assert caught.value.extra == {"current_step": 4} and "step 4" in caught.value.detail
            with pytest.raises(RuntimeError):  # an unexpected error on the host: the front answers 500
                direct.raise_error(direct.error_header(ValueError("boom")))
            # the wrong secret: closed without an answer, the server goes on serving the others
            wrong = DirectPool("not-it", bytearray)
            with pytest.raises(ConnectionError):
                await wrong.exchange(address, {"op": "x"}, [b"1"])
            assert (await pool.exchange(address, {"op": "y"}, []))[0]["echo"] == {"op": "y"}
        finally:
            pool.close()
            server.stop()
        with pytest.raises(direct.NotSent):  # nobody listening any more: nothing was sent
            await DirectPool("s3cret", bytearray).exchange(address, {"op": "x"}, [])

    asyncio.run(main())


def test_a_frame_without_the_hello_is_not_served() -> None:
    async def main() -> None:
        server = DirectServer("s3cret", _echo, bytearray)
        host, port = await server.start("127.0.0.1")
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(frame_bytes({"op": "x"}, b"", b"data"))
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed: its first frame was not the secret
            writer.close()
        finally:
            server.stop()

    asyncio.run(main())


def test_shared_memory_buffers_are_seen_by_another_process_and_removed_when_freed() -> None:
    segments = Segments()
    small = segments.make(1000)
    assert segments.find(small) is None  # small buffers are ordinary memory
    buffer = segments.make(shm.SHM_MIN + 100)
    buffer[:] = 7
    ref = segments.find(memoryview(buffer)[50 : shm.SHM_MIN + 60])
    assert ref is not None and ref["offset"] == 50 and ref["size"] == shm.SHM_MIN + 10
    path = os.path.join(shm.SHM_DIR, ref["name"])
    assert os.path.exists(path)
    code = (
        "import sys, json; from optserve.service.direct import Mappings; "
        "v = Mappings().view(json.loads(sys.argv[1])); assert (v == 7).all(); v[:4] = [1, 2, 3, 4]"
    )
    subprocess.run([sys.executable, "-c", code, json.dumps(ref)], check=True, timeout=60)
    assert list(buffer[50:55]) == [1, 2, 3, 4, 7]  # written by the other process where this one reads
    assert segments.find(np.empty(shm.SHM_MIN, np.uint8)) is None  # not one of ours
    del buffer, ref
    assert not os.path.exists(path)  # freed: the file is gone


def test_a_restarted_fronts_buffers_never_take_an_earlier_ones_name() -> None:
    """The host keeps its maps by name: a name used again would make it read an earlier, freed buffer's bytes."""
    first, again = Segments(), Segments()  # a front's store stopped and started again, in one process
    a, b = first.make(shm.SHM_MIN), again.make(shm.SHM_MIN)
    ref_a, ref_b = first.find(a), again.find(b)
    assert ref_a is not None and ref_b is not None and ref_a["name"] != ref_b["name"]
    maps = Mappings()
    a[:] = 1
    b[:] = 2
    assert (maps.view(ref_a) == 1).all() and (maps.view(ref_b) == 2).all()


def test_the_host_reads_nothing_large_before_the_secret() -> None:
    protocol = FrameProtocol(lambda n: pytest.fail(f"{n} bytes taken before the secret"), on_frame=lambda f: None)
    protocol.max_frame = direct.HELLO_MAX
    closed: list[bool] = []
    protocol.close = lambda: closed.append(True)  # type: ignore[method-assign]
    announce = frame_bytes({"secret": "x"})[: PREFIX.size]
    announce = PREFIX.pack(*PREFIX.unpack(announce)[:2], 1 << 40)  # a terabyte of data announced
    buffer = protocol.get_buffer(-1)
    buffer[: len(announce)] = announce
    protocol.buffer_updated(len(announce))
    assert closed == [True]


def test_the_host_opens_only_optserves_buffers_and_says_when_it_cannot() -> None:
    maps = Mappings()
    for name in ("../etc/passwd", "optserve-1-2/../../x", "other"):
        with pytest.raises(ProtocolError):
            maps.view({"name": name, "offset": 0, "size": 1})
    with pytest.raises(NoSharedMemory):
        maps.view({"name": "optserve-999999999-0123456789abcdef-1", "offset": 0, "size": 1})
    segments = Segments()
    buffer = segments.make(shm.SHM_MIN)
    ref = segments.find(buffer)
    assert ref is not None
    with pytest.raises(ProtocolError):  # past its end
        maps.view({**ref, "size": shm.SHM_MIN + 1})


def test_a_dead_fronts_buffers_are_swept_and_a_live_ones_kept() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    leaked = os.path.join(shm.SHM_DIR, f"optserve-{dead.pid}-0123456789abcdef-1")
    mine = os.path.join(shm.SHM_DIR, f"optserve-{os.getpid()}-0123456789abcdef-999999")
    for path in (leaked, mine):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        assert Segments.sweep() >= 1
        assert not os.path.exists(leaked) and os.path.exists(mine)
    finally:
        for path in (leaked, mine):
            if os.path.exists(path):
                os.unlink(path)


def test_an_idle_connection_closed_by_its_host_is_not_reused() -> None:
    async def main() -> None:
        server = DirectServer("k", _echo, bytearray)
        address = await server.start("127.0.0.1")
        pool = DirectPool("k", bytearray)
        await pool.exchange(address, {"op": "x"}, [])
        (idle,) = pool._idle[address]
        idle.close()  # as if the host had gone away while it was idle
        await asyncio.sleep(0.05)
        assert (await pool.exchange(address, {"op": "again"}, []))[0]["echo"] == {"op": "again"}
        pool.close()
        server.stop()

    asyncio.run(main())
