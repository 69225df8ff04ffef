"""Tests for the wire codec (``optserve.client.wire``): safetensors and JSON bodies of named tensors.

Covers interop with the real ``safetensors`` package in both directions, bfloat16 rounding against an independent
reference (and torch when importable), zero-copy views, streaming helpers, rejection of malformed bodies with
``WireError``, the JSON codec, and hypothesis properties (round trip; mutated bodies never raise anything but
``WireError``).
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy as stn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from optserve.client import wire
from optserve.client.wire import WireError

try:  # optional: only used for cross-checks
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]

needs_torch = pytest.mark.skipif(torch is None, reason="torch not importable")

# safetensors dtype code -> numpy dtype, written out here independently of the module under test.
CODE_DTYPE = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "F64": np.dtype("<f8"),
}  # fmt: skip


# --- helpers -------------------------------------------------------------------------------------------------------


def make_body(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors body from a header (object -> JSON, or raw bytes/str) and a data section, unpadded."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def header_of(body: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + n])


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (so NaN == NaN and -0.0 != 0.0)."""
    a, b = np.asarray(a), np.asarray(b)
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


def assert_tensors_equal(got: dict[str, np.ndarray], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        w = np.asarray(value)
        assert bits_equal(got[name], w.astype(w.dtype.newbyteorder("<"))), (name, got[name], w)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits by round-to-nearest-even, written independently of wire.to_bfloat16.

    NaN inputs map to 0x7FC0 here; callers compare NaN positions only by "is a bfloat16 NaN".
    """
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    hi, lo = b >> np.uint64(16), b & np.uint64(0xFFFF)
    round_up = (lo > 0x8000) | ((lo == 0x8000) & ((hi & np.uint64(1)) == 1))
    out = (hi + round_up.astype(np.uint64)).astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


def is_bf16_nan(bits: np.ndarray) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.uint16)
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x007F) != 0)


def f32(*bit_patterns: int) -> np.ndarray:
    return np.array(bit_patterns, dtype=np.uint32).view(np.float32)


# Values whose bfloat16 rounding is easy to get wrong.
BF16_EDGE = np.concatenate(
    [
        np.array([0.0, -0.0, 1.0, -1.0, 0.1, -3.14159, 1e-40, -1e-45, 3.0e38, 1e38], dtype=np.float32),
        np.array([np.inf, -np.inf, np.nan, -np.nan], dtype=np.float32),
        f32(
            0x3F808000,  # exact tie, even lower half -> rounds down to 0x3F80
            0x3F818000,  # exact tie, odd lower half -> rounds up to 0x3F82
            0xBF808000,  # negative ties
            0xBF818000,
            0x3F808001,  # just above a tie -> up
            0x3F807FFF,  # just below a tie -> down
            0x3F80FFFF,  # rounds up into the next mantissa
            0x3FFFFFFF,  # rounds up into the next exponent
            0x7F7FFFFF,  # float32 max -> overflows to +inf (RNE)
            0xFF7FFFFF,  # -> -inf
            0x7F7F7FFF,  # largest value that stays finite
            0x00008000,  # subnormal tie, even -> 0
            0x00018000,  # subnormal tie, odd -> 0x0002
            0x007FFFFF,  # largest subnormal -> rounds to the smallest normal
            0x7F800001,  # signalling NaN: must stay NaN, not become inf
            0xFF800001,
            0x7FC00000,
            0x7FFFFFFF,
            0xFFFFFFFF,
        ),
    ]
)


# --- 1. interop with the safetensors package -----------------------------------------------------------------------


def sample_tensors() -> dict[str, np.ndarray]:
    """One tensor of each interesting kind, including shape-() and zero-size ones."""
    rng = np.random.default_rng(1234)
    out: dict[str, np.ndarray] = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i64": rng.integers(-(2**62), 2**62, size=(7,), dtype=np.int64),
        "u8": rng.integers(0, 256, size=(2, 3), dtype=np.uint8),
        "bool": np.array([[True, False, True], [False, False, True]]),
        "scalar": np.array(2.5, dtype=np.float32),
        "scalar_i": np.array(-7, dtype=np.int64),
        "empty": np.zeros((0,), dtype=np.float32),
        "empty2": np.zeros((3, 0, 2), dtype=np.int64),
        "special": np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32),
    }
    return out


def test_decode_reads_safetensors_numpy_save():
    tensors = sample_tensors()
    meta = {"format": "np", "step": "12", "note": "ünïcödé ✓"}
    body = stn.save(tensors, metadata=meta)
    got, got_meta = wire.decode(body)
    assert_tensors_equal(got, tensors)
    assert got_meta == meta
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape


def test_decode_reads_safetensors_numpy_save_without_metadata():
    body = stn.save({"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    got, meta = wire.decode(body)
    assert meta == {}
    assert_tensors_equal(got, {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_decode_reads_safetensors_file_bytes(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    stn.save_file(tensors, str(path), metadata={"k": "v"})
    got, meta = wire.decode(path.read_bytes())
    assert_tensors_equal(got, tensors)
    assert meta == {"k": "v"}


def test_safetensors_loads_what_encode_writes(tmp_path):
    tensors = sample_tensors()
    meta = {"format": "np", "step": "12", "note": "ünïcödé ✓"}
    body = wire.encode(tensors, metadata=meta)
    loaded = stn.load(body)
    assert_tensors_equal(loaded, tensors)

    path = tmp_path / "enc.safetensors"
    path.write_bytes(body)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == meta
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert bits_equal(f.get_tensor(name), t), name
    assert_tensors_equal(stn.load_file(str(path)), tensors)


def test_encode_stringifies_metadata_and_omits_empty_metadata(tmp_path):
    body = wire.encode({"a": np.ones(2, np.float32)}, metadata={"n": 3, "f": 1.5})  # type: ignore[dict-item]
    assert header_of(body)["__metadata__"] == {"n": "3", "f": "1.5"}
    assert wire.decode(body)[1] == {"n": "3", "f": "1.5"}
    bare = wire.encode({"a": np.ones(2, np.float32)}, metadata={})
    assert "__metadata__" not in header_of(bare)
    path = tmp_path / "m.safetensors"
    path.write_bytes(body)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"n": "3", "f": "1.5"}


def test_encode_empty_mapping_is_valid_for_both():
    body = wire.encode({})
    assert stn.load(body) == {}
    assert wire.decode(body) == ({}, {})


def test_encode_header_dtype_codes_and_offsets():
    tensors = sample_tensors()
    h = header_of(wire.encode(tensors))
    expected = {"f32": "F32", "f16": "F16", "f64": "F64", "i64": "I64", "u8": "U8", "bool": "BOOL"}
    for name, code in expected.items():
        assert h[name]["dtype"] == code
    assert list(k for k in h if k != "__metadata__") == list(tensors)  # mapping order is kept
    end = 0
    for name, t in tensors.items():
        assert h[name]["shape"] == list(t.shape)
        assert h[name]["data_offsets"] == [end, end + t.nbytes]
        end += t.nbytes


@pytest.mark.parametrize("code", ["float16", "F16", "float64", "F64", "float32"])
def test_encode_dtype_conversion(code):
    x = np.linspace(-2, 2, 9, dtype=np.float32)
    body = wire.encode({"x": x}, dtype=code)
    want = x.astype(
        {"float16": np.float16, "F16": np.float16, "float64": np.float64, "F64": np.float64}.get(code, np.float32)
    )
    assert_tensors_equal(stn.load(body), {"x": want})
    assert_tensors_equal(wire.decode(body)[0], {"x": want})


def test_encode_non_contiguous_and_big_endian_inputs():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {
        "t": base.T,
        "strided": base[:, ::2],
        "be": np.arange(5, dtype=">i4"),
        "fortran": np.asfortranarray(base),
    }
    body = wire.encode(tensors)
    for name, t in tensors.items():
        want = np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<"))
        assert bits_equal(wire.decode(body)[0][name], want), name
        assert bits_equal(stn.load(body)[name], want), name


def test_encode_rejects_unencodable():
    with pytest.raises(WireError, match="cannot encode"):
        wire.encode({"c": np.array([1 + 2j])})
    with pytest.raises(WireError, match="cannot encode"):
        wire.encode({"s": np.array(["a"])})
    with pytest.raises(WireError, match="cannot encode dtype"):
        wire.encode({"x": np.ones(2)}, dtype="float128")


@pytest.mark.parametrize("how", ["encode", "encode-bf16", "encode_json", "to_bfloat16"])
def test_encode_keeps_scalar_shape(how):
    x = np.array(2.5, dtype=np.float32)
    if how == "encode":
        body = wire.encode({"s": x})
        assert header_of(body)["s"]["shape"] == []
        assert stn.load(body)["s"].shape == ()
        assert wire.decode(body)[0]["s"].shape == ()
    elif how == "encode-bf16":
        body = wire.encode({"s": x}, dtype="bfloat16")
        assert header_of(body)["s"]["shape"] == []
        assert wire.decode(body)[0]["s"].shape == ()
    elif how == "encode_json":
        body = wire.encode_json({"s": x})
        assert json.loads(body)["s"]["shape"] == []
        assert wire.decode_json(body)[0]["s"].shape == ()
    else:
        assert wire.to_bfloat16(x).shape == ()


def test_bfloat16_encode_header_and_bits():
    rng = np.random.default_rng(7)
    random = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([BF16_EDGE, random])
    body = wire.encode({"x": x, "m": x.reshape(-1, 1)[:6]}, dtype="bfloat16")
    h = header_of(body)
    assert h["x"]["dtype"] == "BF16" and h["m"]["dtype"] == "BF16"
    assert h["x"]["shape"] == [x.size] and h["m"]["shape"] == [6, 1]
    assert h["x"]["data_offsets"] == [0, 2 * x.size]

    p = wire.parse(body)
    (entry,) = [e for e in p.entries if e.name == "x"]
    bits = p.raw(entry)
    assert bits.dtype == np.uint16
    ref = bf16_reference(x)
    nan = np.isnan(x)
    assert np.array_equal(bits[~nan], ref[~nan])
    assert is_bf16_nan(bits[nan]).all()
    assert np.array_equal(wire.to_bfloat16(x)[~nan], ref[~nan])
    assert is_bf16_nan(wire.to_bfloat16(x)[nan]).all()

    # Spot-check the edge cases by value, not only against the reference.
    got = wire.to_bfloat16(f32(0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00018000))
    assert got.tolist() == [0x3F80, 0x3F82, 0x7F80, 0x0002]

    # decode gives float32 values that are exactly the bfloat16 ones.
    dec = wire.decode(body)[0]["x"]
    assert dec.dtype == np.float32
    assert np.array_equal(dec.view(np.uint32)[~nan], ref[~nan].astype(np.uint32) << 16)
    assert np.isnan(dec[nan]).all()
    # NaN keeps its sign.
    assert np.signbit(dec[np.isnan(x) & np.signbit(x)]).all()


@needs_torch
def test_bfloat16_bits_match_torch():
    rng = np.random.default_rng(8)
    random = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([BF16_EDGE, random])
    want = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    for dtype in ("bfloat16", "BF16"):
        p = wire.parse(wire.encode({"x": x}, dtype=dtype))
        assert p.entries[0].dtype == "BF16"
        got = p.raw(p.entries[0])
        nan = np.isnan(x)
        assert np.array_equal(got[~nan], want[~nan])
        assert is_bf16_nan(got[nan]).all() and is_bf16_nan(want[nan]).all()


@needs_torch
def test_bfloat16_interop_with_safetensors_torch():
    import safetensors.torch as stt

    x = np.concatenate([BF16_EDGE, np.linspace(-5, 5, 101, dtype=np.float32)])
    loaded = stt.load(wire.encode({"x": x}, dtype="bfloat16"))["x"]
    assert loaded.dtype == torch.bfloat16
    want = torch.tensor(x).to(torch.bfloat16)
    nan = np.isnan(x)
    assert np.array_equal(loaded.view(torch.int16).numpy()[~nan], want.view(torch.int16).numpy()[~nan])

    # and the other way: a BF16 body written by safetensors.torch decodes to the exact float32 values.
    body = stt.save({"w": want, "f": torch.arange(4, dtype=torch.float32)}, metadata={"a": "b"})
    got, meta = wire.decode(body)
    assert meta == {"a": "b"}
    assert got["w"].dtype == np.float32
    assert np.array_equal(got["w"][~nan], want.to(torch.float32).numpy()[~nan])
    assert np.isnan(got["w"][nan]).all()
    assert bits_equal(got["f"], np.arange(4, dtype=np.float32))


def test_bfloat16_all_bit_patterns_round_trip():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = wire.from_bfloat16(bits)
    assert values.dtype == np.float32
    assert np.array_equal(values.view(np.uint32), bits.astype(np.uint32) << 16)
    back = wire.to_bfloat16(values)
    nan = is_bf16_nan(bits)
    assert np.array_equal(back[~nan], bits[~nan])
    assert is_bf16_nan(back[nan]).all()
    # through a body too
    dec = wire.decode(wire.encode({"v": values}, dtype="bfloat16"))[0]["v"]
    assert np.array_equal(dec.view(np.uint32)[~nan], values.view(np.uint32)[~nan])


# --- 2. zero copy --------------------------------------------------------------------------------------------------


def test_parse_raw_is_a_read_only_view_into_the_body():
    tensors = sample_tensors()
    body = wire.encode(tensors)
    whole = np.frombuffer(body, np.uint8)
    p = wire.parse(body)
    for e in p.entries:
        raw = p.raw(e)
        assert not raw.flags.writeable
        if raw.nbytes:
            assert np.shares_memory(raw, whole), e.name
            with pytest.raises(ValueError):
                raw.reshape(-1)[0] = raw.reshape(-1)[0]
    for name, arr in wire.decode(body)[0].items():
        assert not arr.flags.writeable
        if arr.nbytes:
            assert np.shares_memory(arr, whole), name


def test_parse_of_bytearray_is_a_writable_view():
    body = bytearray(wire.encode({"a": np.arange(4, dtype=np.int32)}))
    p = wire.parse(body)
    a = p.array(p.entries[0])
    assert a.flags.writeable
    assert np.shares_memory(a, np.frombuffer(body, np.uint8))
    a[0] = 99
    assert wire.decode(bytes(body))[0]["a"].tolist() == [99, 1, 2, 3]


def test_parse_accepts_memoryview_and_data_is_the_data_section():
    tensors = {"a": np.arange(3, dtype=np.float64)}
    body = wire.encode(tensors, metadata={"x": "y"})
    p = wire.parse(memoryview(body))
    (n,) = struct.unpack("<Q", body[:8])
    assert bytes(p.data) == body[8 + n :]
    assert p.metadata == {"x": "y"}
    assert [e.name for e in p.entries] == ["a"]
    e = p.entries[0]
    assert (e.dtype, e.shape, e.start, e.stop, e.size) == ("F64", (3,), 0, 24, 3)
    assert bits_equal(p.tensors()["a"], tensors["a"])


def test_bfloat16_array_is_a_float32_copy():
    body = wire.encode({"b": np.ones(4, np.float32)}, dtype="bfloat16")
    p = wire.parse(body)
    e = p.entries[0]
    assert np.shares_memory(p.raw(e), np.frombuffer(body, np.uint8))
    arr = p.array(e)
    assert arr.dtype == np.float32 and arr.tolist() == [1.0] * 4


@pytest.mark.parametrize("name_len", range(1, 20))
def test_encode_data_section_is_8_byte_aligned(name_len):
    name = "n" * name_len
    parts = wire.encode_parts({name: np.arange(3, dtype=np.float64)}, metadata={"k": "v" * name_len})
    assert len(parts[0]) % 8 == 0
    body = wire.encode({name: np.arange(3, dtype=np.float64)}, metadata={"k": "v" * name_len})
    (n,) = struct.unpack("<Q", body[:8])
    assert (8 + n) % 8 == 0
    assert body[8 + n :] == np.arange(3, dtype="<f8").tobytes()
    p = wire.parse(body)
    assert p.raw(p.entries[0]).flags.aligned


# --- 3. encode_parts and iter_chunks -------------------------------------------------------------------------------


def test_encode_parts_joined_equals_encode():
    tensors = sample_tensors()
    for kwargs in (
        {},
        {"metadata": {"a": "b"}},
        {"dtype": "float16"},
        {"dtype": "bfloat16", "metadata": {"c": "d"}},
    ):
        t = {k: v for k, v in tensors.items() if v.dtype.kind == "f"} if "dtype" in kwargs else tensors
        parts = wire.encode_parts(t, **kwargs)
        assert len(parts) == 1 + len(t)
        assert b"".join(bytes(p) for p in parts) == wire.encode(t, **kwargs)


def test_encode_parts_does_not_copy_contiguous_little_endian_tensors():
    a = np.arange(1000, dtype=np.float32)
    b = np.arange(10, dtype=np.int64).reshape(2, 5)
    parts = wire.encode_parts({"a": a, "b": b})
    assert np.shares_memory(np.frombuffer(parts[1], np.uint8), a)
    assert np.shares_memory(np.frombuffer(parts[2], np.uint8), b)


@pytest.mark.parametrize("size", [1, 3, 7, 8, 64, 1000, 1 << 20])
def test_iter_chunks(size):
    parts = wire.encode_parts({"a": np.arange(100, dtype=np.float32), "e": np.zeros(0), "b": np.ones((3, 3))})
    chunks = list(wire.iter_chunks(parts, size))
    assert all(0 < len(c) <= size for c in chunks)
    assert b"".join(bytes(c) for c in chunks) == b"".join(bytes(p) for p in parts)
    assert b"".join(bytes(c) for c in wire.iter_chunks([b"abcdefghij", b"", memoryview(b"xyz")], size)) == (
        b"abcdefghijxyz"
    )


def test_iter_chunks_default_size():
    big = b"\x01" * ((1 << 20) * 2 + 5)
    chunks = list(wire.iter_chunks([big]))
    assert [len(c) for c in chunks] == [1 << 20, 1 << 20, 5]
    assert b"".join(bytes(c) for c in chunks) == big


# --- 4. malformed safetensors bodies -------------------------------------------------------------------------------


def ent(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}  # fmt: skip


MALFORMED = [
    pytest.param(b"", "too short", id="empty"),
    pytest.param(b"\x02\x00\x00\x00\x00\x00\x00", "too short", id="7-bytes"),
    pytest.param(make_body({"a": ent()}, b"\0" * 8, length=1000), "runs past the end", id="header-past-end"),
    pytest.param(make_body(b"{}", length=2**64 - 1), "exceeds the limit", id="header-length-huge"),
    pytest.param(make_body(b'{"a\xff":1}'), "not UTF-8", id="header-not-utf8"),
    pytest.param(make_body(b"{not json}"), "not valid JSON", id="header-not-json"),
    pytest.param(make_body(b'{"a": {"dtype": "F32"}'), "not valid JSON", id="header-truncated-json"),
    pytest.param(make_body(b"{}{}"), "not valid JSON", id="header-extra-data"),
    pytest.param(make_body([1, 2]), "not a JSON object", id="header-list"),
    pytest.param(make_body('"str"'), "not a JSON object", id="header-string"),
    pytest.param(make_body("null"), "not a JSON object", id="header-null"),
    pytest.param(make_body({"a": [1]}), "not an object", id="entry-not-object"),
    pytest.param(make_body({"a": ent(dtype="F128")}, b"\0" * 8), "unknown dtype 'F128'", id="dtype-unknown"),
    pytest.param(make_body({"a": ent(dtype="float32")}, b"\0" * 8), "unknown dtype", id="dtype-json-name"),
    pytest.param(make_body({"a": ent(dtype=None)}, b"\0" * 8), "unknown dtype", id="dtype-missing"),
    pytest.param(make_body({"a": ent(shape=[-2])}, b"\0" * 8), "shape must be", id="shape-negative"),
    pytest.param(make_body({"a": ent(shape=[True, 2])}, b"\0" * 8), "shape must be", id="shape-bool"),
    pytest.param(make_body({"a": ent(shape=[2.0])}, b"\0" * 8), "shape must be", id="shape-float"),
    pytest.param(make_body({"a": ent(shape="2")}, b"\0" * 8), "shape must be", id="shape-string"),
    pytest.param(make_body({"a": ent(shape=None)}, b"\0" * 8), "shape must be", id="shape-missing"),
    pytest.param(make_body({"a": ent(offsets=[0])}, b"\0" * 8), "data_offsets must be", id="offsets-one"),
    pytest.param(make_body({"a": ent(offsets=[0, 4, 8])}, b"\0" * 8), "data_offsets must be", id="offsets-three"),
    pytest.param(make_body({"a": ent(offsets=[-8, 0])}, b"\0" * 8), "data_offsets must be", id="offsets-negative"),
    pytest.param(make_body({"a": ent(offsets=[0.0, 8.0])}, b"\0" * 8), "data_offsets must be", id="offsets-float"),
    pytest.param(make_body({"a": ent(offsets=[False, 8])}, b"\0" * 8), "data_offsets must be", id="offsets-bool"),
    pytest.param(make_body({"a": ent(offsets=None)}, b"\0" * 8), "data_offsets must be", id="offsets-missing"),
    pytest.param(make_body({"a": ent(offsets=[8, 0])}, b"\0" * 8), "end before they begin", id="offsets-reversed"),
    pytest.param(make_body({"a": ent(offsets=[0, 12])}, b"\0" * 12), "needs 8 bytes.*give 12", id="offsets-size"),
    pytest.param(make_body({"a": ent("F64", (2,), (0, 8))}, b"\0" * 8), "needs 16 bytes", id="offsets-itemsize"),
    pytest.param(make_body({"a": ent(), "b": ent()}, b"\0" * 8), "overlaps", id="overlap-identical"),
    pytest.param(
        make_body({"a": ent(offsets=(0, 8)), "b": ent(offsets=(4, 12))}, b"\0" * 12),
        "overlaps",
        id="overlap-partial",
    ),
    pytest.param(
        make_body({"a": ent(offsets=(0, 8)), "b": ent(offsets=(12, 20))}, b"\0" * 20),
        "gap after byte 8",
        id="gap",
    ),
    pytest.param(make_body({"a": ent(offsets=(4, 12))}, b"\0" * 12), "gap after byte 0", id="gap-at-start"),
    pytest.param(make_body({"a": ent()}, b"\0" * 9), "cover 8 bytes .* carries 9", id="trailing-byte"),
    pytest.param(make_body({}, b"\0"), "cover 0 bytes .* carries 1", id="trailing-no-tensors"),
    pytest.param(make_body({"a": ent()}, b"\0" * 7), "cover 8 bytes .* carries 7", id="data-short"),
    pytest.param(make_body({"a": ent()}), "cover 8 bytes .* carries 0", id="data-missing"),
    pytest.param(
        make_body(
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],'
            b'"data_offsets":[8,16]}}',
            b"\0" * 16,
        ),
        "duplicate key 'a'",
        id="duplicate-tensor",
    ),  # fmt: skip
    pytest.param(
        make_body(b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
        "duplicate key 'dtype'",
        id="duplicate-field",
    ),
    pytest.param(
        make_body(b'{"__metadata__":{},"__metadata__":{}}'),
        "duplicate key '__metadata__'",
        id="duplicate-metadata",
    ),
    pytest.param(make_body({"__metadata__": {"a": 1}}), "__metadata__ must be", id="metadata-int-value"),
    pytest.param(make_body({"__metadata__": {"a": None}}), "__metadata__ must be", id="metadata-null-value"),
    pytest.param(make_body({"__metadata__": {"a": ["x"]}}), "__metadata__ must be", id="metadata-list-value"),
    pytest.param(make_body({"__metadata__": {"a": "ok", "b": {}}}), "__metadata__ must be", id="metadata-obj-value"),
    pytest.param(make_body({"__metadata__": ["a"]}), "__metadata__ must be", id="metadata-nonempty-list"),
    pytest.param(make_body({"__metadata__": "text"}), "__metadata__ must be", id="metadata-string"),
]


@pytest.mark.parametrize("body, match", MALFORMED)
def test_malformed_bodies_raise_wire_error(body, match):
    with pytest.raises(WireError, match=match):
        wire.parse(body)
    with pytest.raises(WireError, match=match):
        wire.decode(body)
    with pytest.raises(WireError, match=match):
        wire.decode(bytearray(body))


def test_header_length_above_max_header_bytes():
    body = wire.encode({"a": np.ones(2, np.float32)})
    (n,) = struct.unpack("<Q", body[:8])
    with pytest.raises(WireError, match=f"header of {n} bytes exceeds the limit of {n - 1}"):
        wire.decode(body, max_header_bytes=n - 1)
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.parse(body, max_header_bytes=0)
    assert wire.decode(body, max_header_bytes=n)[0]["a"].tolist() == [1.0, 1.0]


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)


def test_dtype_without_numpy_equivalent_parses_but_does_not_decode():
    body = make_body({"a": ent("F8_E4M3", (4,), (0, 4))}, b"\0" * 4)
    p = wire.parse(body)
    assert p.entries[0].dtype == "F8_E4M3"
    with pytest.raises(WireError, match="no numpy equivalent"):
        wire.decode(body)


def test_zero_size_tensors_and_unordered_offsets_are_accepted():
    # header order differs from data order; zero-size tensors may sit anywhere in the tiling
    body = make_body(
        {"b": ent("F32", (1,), (4, 8)), "z": ent("F64", (0, 3), (4, 4)), "a": ent("I32", (1,), (0, 4))},
        np.array([7], "<i4").tobytes() + np.array([1.5], "<f4").tobytes(),
    )
    got, meta = wire.decode(body)
    assert list(got) == ["b", "z", "a"]
    assert got["a"].tolist() == [7] and got["b"].tolist() == [1.5] and got["z"].shape == (0, 3)
    assert meta == {}
    assert_tensors_equal(stn.load(body), got)


def test_null_metadata_and_header_padding_accepted():
    body = make_body(b'{"__metadata__":null,"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}   ', b"\x05")
    got, meta = wire.decode(body)
    assert meta == {} and got["a"].shape == () and got["a"] == 5


# Regressions: inputs that once escaped as TypeError or ValueError instead of WireError.


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_unhashable_dtype_raises_wire_error(dtype):
    with pytest.raises(WireError, match="unknown dtype"):
        wire.decode(make_body({"a": ent(dtype=dtype)}, b"\0" * 8))


def test_huge_zero_size_shape_raises_wire_error():
    body = make_body({"a": ent("F32", (0, 2**63), (0, 0))})
    with pytest.raises(WireError):
        wire.decode(body)


def test_too_many_dims_raises_wire_error():
    body = make_body({"a": ent("F32", (1,) * 70, (0, 4))}, b"\0" * 4)
    with pytest.raises(WireError):
        wire.decode(body)


def test_overlong_integer_in_header_raises_wire_error():
    body = make_body(b'{"a":{"dtype":"F32","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,4]}}', b"\0" * 4)
    with pytest.raises(WireError):
        wire.decode(body)


@pytest.mark.parametrize("meta", [[], 0, "", False])
def test_falsy_non_object_metadata_rejected(meta):
    body = make_body({"__metadata__": meta})
    with pytest.raises(safetensors.SafetensorError):  # the safetensors package refuses these headers
        stn.load(body)
    with pytest.raises(WireError, match="__metadata__ must be"):
        wire.decode(body)


# --- 5. JSON codec -------------------------------------------------------------------------------------------------


def random_float32(n: int, seed: int) -> np.ndarray:
    """Random finite float32: uniform over bit patterns (all magnitudes), plus subnormals and extremes."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    sub = rng.integers(1, 2**23, size=n // 10, dtype=np.uint64).astype(np.uint32)  # subnormals
    sub[::2] |= np.uint32(0x80000000)
    x = np.concatenate(
        [
            bits.view(np.float32),
            sub.view(np.float32),
            np.array([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 1.1754944e-38, 3.4028235e38, -3.4028235e38,
                      0.1, 1 / 3, 16777217.0], dtype=np.float32),
        ]
    )  # fmt: skip
    return x[np.isfinite(x)]


def test_json_float32_round_trip_is_bit_exact():
    x = random_float32(200_000, seed=3)
    assert (np.abs(x[x != 0]) < np.finfo(np.float32).tiny).any()  # subnormals are in the sample
    assert (np.abs(x) > 1e30).any()
    body = wire.encode_json({"x": x, "m": x[:12].reshape(3, 4)})
    got, meta = wire.decode_json(body)
    assert meta == {}
    assert bits_equal(got["x"], x)
    assert bits_equal(got["m"], x[:12].reshape(3, 4))
    # the text is shortest-decimal, not 17-digit: a float32 never needs more than 9 significant digits
    text = body.decode()
    start = text.index('"data":[') + len('"data":[')
    numbers = text[start : text.index("]", start)].split(",")
    assert len(numbers) == x.size
    digits = [len(re.sub(r"[^0-9]", "", re.split("[eE]", n)[0]).strip("0")) for n in numbers]
    assert max(digits) <= 9


def test_json_float16_all_values_round_trip():
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = wire.decode_json(wire.encode_json({"h": h}))[0]["h"]
    assert got.dtype == np.float16
    nan = np.isnan(h)
    assert np.array_equal(got.view(np.uint16)[~nan], h.view(np.uint16)[~nan])
    assert np.isnan(got[nan]).all()


def test_json_bfloat16_all_values_round_trip():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = wire.from_bfloat16(bits)
    body = wire.encode_json({"b": values}, dtype="bfloat16")
    assert json.loads(body)["b"]["dtype"] == "bfloat16"
    got = wire.decode_json(body)[0]["b"]
    assert got.dtype == np.float32
    nan = is_bf16_nan(bits)
    assert np.array_equal(got.view(np.uint32)[~nan], values.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()


def test_json_bfloat16_rounds_float32_input():
    x = np.concatenate([BF16_EDGE, random_float32(5000, seed=4)])
    got = wire.decode_json(wire.encode_json({"x": x}, dtype="bfloat16"))[0]["x"]
    ref = bf16_reference(x)
    nan = np.isnan(x)
    assert np.array_equal(got.view(np.uint32)[~nan], ref[~nan].astype(np.uint32) << 16)
    # decode_json also rounds float32-precision input declared as bfloat16
    got2 = wire.decode_json({"x": {"dtype": "bfloat16", "data": x[~nan].astype(float).tolist()}})[0]["x"]
    assert np.array_equal(got2.view(np.uint32), ref[~nan].astype(np.uint32) << 16)


def test_json_float64_round_trip():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**64, size=20000, dtype=np.uint64).view(np.float64)
    x = x[np.isfinite(x)]
    got = wire.decode_json(wire.encode_json({"x": x}))[0]["x"]
    assert bits_equal(got, x)


def test_json_non_finite_round_trip():
    x = np.array([np.nan, np.inf, -np.inf, 1.0, -0.0], dtype=np.float32)
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        body = wire.encode_json({"x": x}, dtype=dtype)
        assert b"NaN" in body and b"-Infinity" in body and b"Infinity" in body
        got = wire.decode_json(body)[0]["x"]
        assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 1.0
        assert got[4] == 0 and np.signbit(got[4])
    assert wire.decode_json('{"x": {"data": [NaN, Infinity, -Infinity]}}')[0]["x"].dtype == np.float32


def test_json_finite_output_is_strict_json():
    def refuse(name):
        raise AssertionError(f"non-standard constant {name}")

    body = wire.encode_json({"x": np.linspace(-1, 1, 11, dtype=np.float32)}, metadata={"a": "b"})
    obj = json.loads(body, parse_constant=refuse)
    assert obj["__metadata__"] == {"a": "b"}
    assert obj["x"]["dtype"] == "float32" and obj["x"]["shape"] == [11] and len(obj["x"]["data"]) == 11


def test_json_metadata_round_trip():
    meta = {"model": "gpt", "step": "3", "ü": "✓", "empty": ""}
    tensors = {"a": np.arange(4, dtype=np.float32).reshape(2, 2), "b": np.zeros((0, 3), np.float32)}
    got, got_meta = wire.decode_json(wire.encode_json(tensors, metadata=meta))
    assert got_meta == meta
    assert_tensors_equal(got, tensors)
    assert wire.encode_json({"a": np.ones(1, np.float32)}, metadata={}).startswith(b'{"a"')


def test_json_dtypes_and_shapes():
    tensors = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f16": np.array([0.5, -1.25], dtype=np.float16),
        "f64": np.array([[1e300]], dtype=np.float64),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((2, 0), dtype=np.float32),
    }
    body = wire.encode_json(tensors)
    obj = json.loads(body)
    assert {k: v["dtype"] for k, v in obj.items()} == {
        "f32": "float32", "f16": "float16", "f64": "float64", "scalar": "float32", "empty": "float32"
    }  # fmt: skip
    assert obj["scalar"]["shape"] == [] and obj["scalar"]["data"] == [3.5]
    assert obj["empty"]["shape"] == [2, 0] and obj["f32"]["shape"] == [2, 3]
    got, _ = wire.decode_json(body)
    assert_tensors_equal(got, tensors)


@pytest.mark.parametrize("kind", ["bytes", "str", "mapping"])
def test_decode_json_input_kinds(kind):
    obj = {"__metadata__": {"a": "b"}, "t": {"dtype": "float64", "shape": [2], "data": [1, 2.5]}}
    body = {"bytes": json.dumps(obj).encode(), "str": json.dumps(obj), "mapping": obj}[kind]
    got, meta = wire.decode_json(body)
    assert meta == {"a": "b"}
    assert bits_equal(got["t"], np.array([1.0, 2.5]))
    assert "__metadata__" in obj  # a mapping argument is not mutated


def test_decode_json_nested_and_inferred_shapes():
    got, _ = wire.decode_json(
        {
            "nested": {"shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]},
            "nested_no_shape": {"data": [[[1], [2]], [[3], [4]]]},
            "flat_no_shape": {"data": [1, 2, 3]},
            "flat_shaped": {"shape": [3, 1], "data": [1, 2, 3]},
            "scalar": {"shape": [], "data": [7]},
            "empty": {"data": []},
            "empty_shaped": {"shape": [0, 4], "data": []},
            "ints_as_float16": {"dtype": "float16", "data": [1, 2]},
        }
    )
    assert bits_equal(got["nested"], np.arange(1, 7, dtype=np.float32).reshape(2, 3))
    assert bits_equal(got["nested_no_shape"], np.arange(1, 5, dtype=np.float32).reshape(2, 2, 1))
    assert bits_equal(got["flat_no_shape"], np.array([1, 2, 3], np.float32))
    assert bits_equal(got["flat_shaped"], np.array([[1], [2], [3]], np.float32))
    assert bits_equal(got["scalar"], np.array(7, np.float32))
    assert got["empty"].shape == (0,) and got["empty"].dtype == np.float32
    assert got["empty_shaped"].shape == (0, 4)
    assert bits_equal(got["ints_as_float16"], np.array([1, 2], np.float16))


JSON_ERRORS = [
    pytest.param(b"{not json", "not valid JSON", id="not-json"),
    pytest.param(b"\xff\xfe\xfd", "not valid JSON", id="not-utf8"),
    pytest.param(b"", "not valid JSON", id="empty"),
    pytest.param(b"[1, 2]", "must be a JSON object", id="top-level-list"),
    pytest.param(b'"x"', "must be a JSON object", id="top-level-string"),
    pytest.param({"t": [1, 2]}, "expected an object", id="tensor-list"),
    pytest.param({"t": 3}, "expected an object", id="tensor-number"),
    pytest.param({"t": {"data": [1], "scale": 2}}, r"unknown field\(s\) \['scale'\]", id="unknown-field"),
    pytest.param({"t": {"dtype": "int8", "data": [1]}}, "dtype must be one of.*'int8'", id="dtype-int8"),
    pytest.param({"t": {"dtype": "float128", "data": [1]}}, "dtype must be one of.*'float128'", id="dtype-f128"),
    pytest.param({"t": {"dtype": "F32", "data": [1]}}, "dtype must be one of", id="dtype-code"),
    pytest.param({"t": {"dtype": 32, "data": [1]}}, "dtype must be one of", id="dtype-number"),
    pytest.param({"t": {"dtype": ["float32"], "data": [1]}}, "dtype must be one of", id="dtype-list"),
    pytest.param({"t": {"shape": [1]}}, "data must be a list", id="data-missing"),
    pytest.param({"t": {"data": 1.5}}, "data must be a list", id="data-number"),
    pytest.param({"t": {"data": "1,2"}}, "data must be a list", id="data-string"),
    pytest.param({"t": {"data": {"0": 1}}}, "data must be a list", id="data-object"),
    pytest.param({"t": {"data": ["1", "2"]}}, "only numbers", id="data-strings"),
    pytest.param({"t": {"data": [1.0, "2"]}}, "only numbers", id="data-mixed-string"),
    pytest.param({"t": {"data": [True, False]}}, "only numbers", id="data-bools"),
    pytest.param({"t": {"data": [1, True]}}, "only numbers", id="data-int-and-bool"),
    pytest.param({"t": {"data": [1.0, None]}}, "only numbers", id="data-null"),
    pytest.param({"t": {"data": [[1, 2], {"a": 1}]}}, "only numbers|rectangular", id="data-object-inside"),
    pytest.param({"t": {"data": [[1, 2], [3]]}}, "not a rectangular", id="ragged"),
    pytest.param({"t": {"data": [[1, 2], 3]}}, "not a rectangular", id="ragged-mixed-depth"),
    pytest.param({"t": {"shape": [2, 2], "data": [1, 2, 3]}}, r"shape \[2, 2\] needs 4 values, data has 3", id="size"),
    pytest.param({"t": {"shape": [], "data": []}}, "needs 1 values", id="scalar-no-data"),
    pytest.param({"t": {"shape": [3, 2], "data": [[1, 2, 3], [4, 5, 6]]}}, "does not match shape", id="nested-shape"),
    pytest.param({"t": {"shape": [6], "data": [[1, 2, 3], [4, 5, 6]]}}, "does not match shape", id="nested-vs-flat"),
    pytest.param({"t": {"shape": [-1], "data": [1]}}, "shape must be", id="shape-negative"),
    pytest.param({"t": {"shape": [True], "data": [1]}}, "shape must be", id="shape-bool"),
    pytest.param({"t": {"shape": [1.0], "data": [1]}}, "shape must be", id="shape-float"),
    pytest.param({"t": {"shape": 1, "data": [1]}}, "shape must be", id="shape-int"),
    pytest.param(b'{"t": {"data": [1]}, "t": {"data": [2]}}', "duplicate key 't'", id="duplicate-tensor"),
    pytest.param(b'{"t": {"data": [1], "data": [2]}}', "duplicate key 'data'", id="duplicate-field"),
    pytest.param({"__metadata__": {"a": 1}, "t": {"data": [1]}}, "__metadata__ must be", id="metadata-value"),
    pytest.param({"__metadata__": ["a"]}, "__metadata__ must be", id="metadata-list"),
]


@pytest.mark.parametrize("body, match", JSON_ERRORS)
def test_decode_json_errors(body, match):
    if isinstance(body, dict):
        for form in (body, json.dumps(body), json.dumps(body).encode()):
            with pytest.raises(WireError, match=match):
                wire.decode_json(form)
    else:
        with pytest.raises(WireError, match=match):
            wire.decode_json(body)


@pytest.mark.parametrize("data", [[[1, True], [2, 3]], [[[0]], [[False]]], [1, 2, True]])
def test_decode_json_rejects_booleans_among_integers(data):
    with pytest.raises(WireError, match="only numbers"):
        wire.decode_json({"t": {"data": data}})


@pytest.mark.parametrize("data", [[1.5, True], [[1.5, 2.0], [False, 1.0]], [[1, True], [2.5, 3]]])
def test_decode_json_rejects_booleans_among_floats(data):
    with pytest.raises(WireError, match="only numbers"):
        wire.decode_json({"t": {"data": data}})


def test_decode_json_overlong_integer():
    with pytest.raises(WireError):
        wire.decode_json(b'{"t": {"data": [' + b"1" * 5000 + b"]}}")


def test_decode_json_huge_zero_size_shape():
    with pytest.raises(WireError):
        wire.decode_json({"t": {"shape": [0, 2**63], "data": []}})


# --- 6. properties -------------------------------------------------------------------------------------------------

PROP_DTYPES: list[np.dtype[Any]] = [np.dtype("<f4"), np.dtype("<f2"), np.dtype("<f8"), np.dtype("<i4"), np.dtype("u1")]
names = st.text(alphabet="abxy_.0", min_size=1, max_size=4)


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)  # 0-3 dims, including shape ()
arrays = st.tuples(st.sampled_from(PROP_DTYPES), shapes).flatmap(lambda ds: hnp.arrays(ds[0], ds[1]))
metadatas = st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=10), max_size=3)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(tensors=st.dictionaries(names, arrays, max_size=5), metadata=metadatas)
def test_property_round_trip(tensors, metadata):
    """decode(encode(x)) == x and safetensors.numpy.load(encode(x)) == x, bit for bit."""
    body = wire.encode(tensors, metadata=metadata)
    got, got_meta = wire.decode(body)
    assert list(got) == list(tensors)
    assert_tensors_equal(got, tensors)
    assert got_meta == (metadata or {})
    assert_tensors_equal(stn.load(body), tensors)
    assert b"".join(bytes(p) for p in wire.encode_parts(tensors, metadata=metadata)) == body
    (n,) = struct.unpack("<Q", body[:8])
    assert (8 + n) % 8 == 0


def check_consistent(body: bytes) -> None:
    """``body`` decoded without error: everything decode returned must agree with the header it came from."""
    p = wire.parse(body)
    tensors, meta = wire.decode(body)
    assert isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert list(tensors) == [e.name for e in p.entries]
    covered = 0
    for e in p.entries:
        arr = tensors[e.name]
        assert isinstance(arr, np.ndarray)
        assert arr.shape == e.shape and arr.size == e.size == math.prod(e.shape)
        assert arr.dtype == (np.float32 if e.dtype == "BF16" else CODE_DTYPE[e.dtype])
        raw = p.raw(e)
        assert 0 <= e.start <= e.stop <= len(p.data)
        assert raw.nbytes == e.stop - e.start
        assert raw.tobytes() == bytes(p.data[e.start : e.stop])
        covered += e.stop - e.start
    assert covered == len(p.data)


@PROPERTY_SETTINGS
@given(
    tensors=st.dictionaries(names, arrays, min_size=1, max_size=3),
    metadata=metadatas,
    kind=st.sampled_from(["flip", "insert", "delete", "truncate"]),
    data=st.data(),
)
def test_property_mutated_body_raises_only_wire_error(tensors, metadata, kind, data):
    body = wire.encode(tensors, metadata=metadata)
    pos = data.draw(st.integers(0, len(body) - 1), label="pos")
    if kind == "flip":
        mask = data.draw(st.integers(1, 255), label="mask")
        mutated = body[:pos] + bytes([body[pos] ^ mask]) + body[pos + 1 :]
    elif kind == "insert":
        mutated = body[:pos] + bytes([data.draw(st.integers(0, 255), label="byte")]) + body[pos:]
    elif kind == "delete":
        mutated = body[:pos] + body[pos + 1 :]
    else:
        mutated = body[:pos]
    try:
        wire.decode(mutated)
    except WireError:
        return
    check_consistent(mutated)


def test_headers_differing_only_in_metadata_share_their_parsed_entries() -> None:
    """An answer's header changes every step (the step number is in its metadata) while its tensors stay: the
    entries are validated once and each body still gets its own metadata and its own data."""
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    bodies = [wire.encode(tensors, {"step": str(i), "grad_norm": repr(0.5 * i)}) for i in range(3)]
    bodies.append(wire.encode({k: v + 1 for k, v in tensors.items()}, {"step": "9"}))
    first = wire.parse(bodies[0])
    for i, body in enumerate(bodies):
        parsed = wire.parse(body)
        assert parsed.entries is first.entries  # the cached tuple, not a new parse
        expected_step = "9" if i == 3 else str(i)
        assert parsed.metadata["step"] == expected_step
        shift = 1 if i == 3 else 0
        np.testing.assert_array_equal(parsed.array(parsed.entries[0]), tensors["a"] + shift)
        assert parsed.tensors().keys() == tensors.keys()


@pytest.mark.parametrize(
    "metadata, match",
    [
        pytest.param(b'{"step":1}', "__metadata__ must be", id="int-value"),
        pytest.param(b'{"step":"1","step":"2"}', "duplicate key 'step'", id="duplicate-key"),
        pytest.param(b'{"step":"1"},"__metadata__":{"x":"y"}', "duplicate key '__metadata__'", id="second-metadata"),
        pytest.param(b'{"step":"\\ud800"}', "lone surrogate", id="lone-surrogate"),
    ],
)
def test_a_cached_tensor_part_does_not_admit_bad_metadata(metadata: bytes, match: str) -> None:
    """Whatever metadata comes in front of entries parsed before is validated as in a whole parse."""
    good = wire.encode({"a": np.zeros(2, np.float32)}, {"step": "0"})
    wire.parse(good)  # the entries are cached now
    (n,) = struct.unpack("<Q", good[:8])
    header = good[8 : 8 + n].rstrip(b" ")
    rest = header[header.index(b"}") + 1 :]  # ',"a":{...}}' after the metadata object
    bad = b'{"__metadata__":' + metadata + rest
    body = struct.pack("<Q", len(bad)) + bad + good[8 + n :]
    with pytest.raises(WireError, match=match):
        wire.parse(body)
