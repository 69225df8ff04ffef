"""The wire codec: named tensors as ``application/x-safetensors`` or ``application/json``.

Four verbs and a dtype table, like ``safetensors.numpy``:

- :func:`encode` / :func:`decode` for the safetensors format: an 8-byte little-endian header length, a JSON header
  ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}`` and the raw little-endian data. Bodies
  written by the ``safetensors`` package decode here and the reverse, and nothing is ever unpickled.
- :func:`encode_json` / :func:`decode_json` for ``{name: {"dtype": "float32", "shape": [2, 3], "data": [...]}}``
  with the same optional ``"__metadata__"`` object, for curl and small models.

For speed, :func:`parse` validates a safetensors body and returns a :class:`Safetensors` view whose tensors are
numpy views into the body, with no per-tensor copy; :func:`encode_parts` returns the header and the tensors' own
buffers so a large body can be sent without being joined into one ``bytes``.

Every malformed body raises :class:`WireError` (a ``ValueError``) with a message meant for the sender.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SAFETENSORS",
    "JSON",
    "WireError",
    "TensorEntry",
    "Safetensors",
    "encode",
    "encode_parts",
    "decode",
    "parse",
    "encode_json",
    "decode_json",
    "to_bfloat16",
    "from_bfloat16",
]

SAFETENSORS = "application/x-safetensors"
JSON = "application/json"

DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package's own limit

# safetensors dtype -> (item size, numpy dtype or None when numpy has no such type); BF16 travels as raw uint16.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_NUMPY = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "F64": np.dtype("<f8"),
}  # fmt: skip
_CODE_OF = {nd: code for code, nd in _NUMPY.items() if code != "BF16"}  # numpy dtype -> safetensors code
# JSON / user-facing names of the float types the service works in.
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
WIRE_DTYPES = ("float32", "float16", "bfloat16")  # what a step's gradients and answer may travel as
_F32 = np.dtype("<f4")
_F32_NAMES = ("float32", "F32")


def check_wire_dtype(dtype: str | None) -> str | None:
    """``dtype`` if it is a wire dtype (or None); ValueError otherwise, before anything is sent."""
    if dtype is not None and dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)} (or None), got {dtype!r}")
    return dtype


_NAME_OF = {v: k for k, v in DTYPE_NAMES.items()}


class WireError(ValueError):
    """A body that is not a valid encoding of named tensors."""


def loads(text: str | bytes | bytearray, what: str = "body", **options: Any) -> Any:
    """``json.loads`` for untrusted input: any failure is a :class:`WireError` naming ``what``, including nesting
    deeper than Python's recursion limit (a RecursionError, not a ValueError) and integers with too many digits."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise WireError(f"{what} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, Python's limit on the digits of an integer
        raise WireError(f"{what} is not valid JSON: {e}") from None


_BF16_BLOCK = 1 << 16  # elements converted at a time: the temporaries stay in cache (about 2.5x faster at 1e7)


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    x = np.require(x, dtype=np.float32, requirements="C")
    values = x.reshape(-1)
    bits = values.view(np.uint32)
    out = np.empty(bits.size, np.uint16)
    tmp = np.empty(min(bits.size, _BF16_BLOCK), np.uint32)
    for start in range(0, bits.size, _BF16_BLOCK):
        block = bits[start : start + _BF16_BLOCK]
        t = tmp[: block.size]
        np.right_shift(block, 16, out=t)  # t = bits + 0x7FFF + lowest kept bit, then the top half
        np.bitwise_and(t, 1, out=t)
        np.add(t, 0x7FFF, out=t)
        np.add(t, block, out=t)
        np.right_shift(t, 16, out=t)
        out[start : start + block.size] = t
        nan = np.isnan(values[start : start + _BF16_BLOCK])
        if nan.any():  # the rounding must not turn a NaN into infinity: keep its top half, quiet
            out[start : start + block.size][nan] = (block[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x40)
    return out.reshape(x.shape)


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def as_wire_array(array: Any, dtype: str | None) -> tuple[str, np.ndarray]:
    """(safetensors dtype, contiguous little-endian array of its bits) for one tensor, converted to ``dtype`` (a
    name such as ``"bfloat16"`` or a code such as ``"BF16"``; None keeps the array's own), rounding to nearest
    even; float16 overflows to infinity as IEEE says."""
    a = array if type(array) is np.ndarray else np.asarray(array)
    if a.dtype == _F32 and (dtype is None or dtype in _F32_NAMES) and a.flags.c_contiguous:
        return "F32", a  # a step's usual gradient, without the lookups below
    if dtype is None:
        dtype = _CODE_OF.get(a.dtype.newbyteorder("<"))
        if dtype is None:
            raise WireError(f"cannot encode numpy dtype {a.dtype}")
    dtype = DTYPE_NAMES.get(dtype, dtype)
    if dtype == "BF16":
        return dtype, to_bfloat16(a.astype(np.float32, copy=False))
    if dtype not in _NUMPY:
        raise WireError(f"cannot encode dtype {dtype!r}")
    with np.errstate(over="ignore"):  # float16: values beyond its range become infinities, without a warning
        return dtype, np.require(a, dtype=_NUMPY[dtype], requirements="C")  # keeps 0-d shapes


def encode_parts(
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    dtype: str | Mapping[str, str] | None = None,
) -> list[bytes | memoryview]:
    """The safetensors body as a list of buffers: the header, then each tensor's data (no copy where possible).

    Tensors are written in the mapping's order. ``dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"`` or a
    safetensors code such as ``"F16"``) converts every tensor, or, as a mapping, the tensors it names; by default
    each keeps its numpy dtype.
    """
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    buffers: list[memoryview] = []
    for name, value in tensors.items():
        code, arr = as_wire_array(value, dtype.get(name) if isinstance(dtype, Mapping) else dtype)
        specs.append((name, code, arr.shape))
        buffers.append(memoryview(arr).cast("B") if arr.size else memoryview(b""))  # type: ignore[arg-type]
    return [header(tuple(specs), metadata), *buffers]


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps with arguments builds one per call
_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f-\U0010ffff]*\Z')  # printable ASCII but the quote and the backslash


def header(specs: tuple[tuple[str, str, tuple[int, ...]], ...], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header for tensors ``(name, dtype code, shape)`` stored back to back in that
    order, padded so that the data starts 8-byte aligned, as the safetensors package does."""
    members = [_entries_json(specs)] if specs else []
    if metadata:
        items = [(str(k), str(v)) for k, v in metadata.items()]
        if _PLAIN.match("".join(k + v for k, v in items)):  # nothing JSON would escape: no encoder needed
            meta = "{" + ",".join(f'"{k}":"{v}"' for k, v in items) + "}"
        else:
            meta = _COMPACT.encode(dict(items))
        members.insert(0, '"__metadata__":' + meta)
    raw = ("{" + ",".join(members) + "}").encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


@functools.lru_cache(maxsize=256)
def _entries_json(specs: tuple[tuple[str, str, tuple[int, ...]], ...]) -> str:
    """The tensor entries of a header (cached: a session answers with the same tensors at every step)."""
    parts, offset = [], 0
    for name, code, shape in specs:
        nbytes = math.prod(shape) * _ITEMSIZE[code]
        entry = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        parts.append(json.dumps(name) + ":" + json.dumps(entry, separators=(",", ":")))
        offset += nbytes
    return ",".join(parts)


def encode(
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    dtype: str | Mapping[str, str] | None = None,
) -> bytes:
    """The safetensors body as one ``bytes`` (see :func:`encode_parts`)."""
    return b"".join(encode_parts(tensors, metadata, dtype))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a parsed body: its dtype code, shape and byte range within the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Safetensors:
    """A validated safetensors body: entries in header order, metadata, and the data section (not copied)."""

    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    data: memoryview
    body: memoryview | None = field(default=None, compare=False, repr=False)  # the whole body (header and data)

    def raw(self, entry: TensorEntry) -> np.ndarray:
        """The tensor as stored (BF16 as uint16 bits): a read-only view into the body, no copy."""
        a = np.frombuffer(self.data, dtype=_numpy_dtype(entry), count=entry.size, offset=entry.start)
        return a.reshape(entry.shape)

    def array(self, entry: TensorEntry) -> np.ndarray:
        """The tensor as numpy: a view for native dtypes, a float32 copy for BF16."""
        a = self.raw(entry)
        return from_bfloat16(a) if entry.dtype == "BF16" else a

    def tensors(self) -> dict[str, np.ndarray]:
        return {e.name: self.array(e) for e in self.entries}


def _numpy_dtype(entry: TensorEntry) -> np.dtype[Any]:
    nd = _NUMPY.get(entry.dtype)
    if nd is None:
        raise WireError(f"tensor {entry.name!r}: dtype {entry.dtype} has no numpy equivalent")
    return nd


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WireError(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_DIMS = 32
MAX_ELEMENTS = 1 << 48  # counting zero dimensions as 1: numpy refuses shapes beyond this even when empty


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise WireError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise WireError(f"tensor {name!r}: shape {shape} is beyond what any tensor can hold")
    return tuple(shape)


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise WireError("__metadata__ must be an object of string values")
    for key, text in value.items():
        _check_name(key)
        _check_name(text)
    return value


# Parsed headers, by their bytes: a step sends the same header every time, so it is validated once. Bounded in count
# and in bytes (headers of refused bodies are kept too, so an unbounded cache would hold whatever a client sends).
_HEADERS: OrderedDict[bytes | str, tuple[tuple[TensorEntry, ...], dict[str, str]]] = OrderedDict()
_HEADERS_KEPT = 256
_HEADER_CACHED_MAX = 64 << 10  # larger headers are parsed every time (their bodies are large: the parse is cheap)
_HEADERS_BYTES_KEPT = 4 << 20
_headers_bytes = 0
_HEADERS_LOCK = threading.Lock()


def parse(
    body: bytes | bytearray | memoryview,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    data: bytes | bytearray | memoryview | None = None,
) -> Safetensors:
    """Validate a safetensors body and return a zero-copy view of it; with ``data``, ``body`` is the header alone
    and ``data`` the data section, held apart (an answer's parameters written into shared memory).

    Checks what the format requires: the header length fits the body and the limit, the header is a JSON object,
    every dtype is known, shapes are lists of non-negative integers, each tensor's byte range matches its shape and
    dtype, and the ranges tile the data section exactly (no overlap, no hole, nothing after the last tensor).
    """
    view = memoryview(body).cast("B")
    if len(view) < 8:
        raise WireError(f"safetensors body too short: {len(view)} bytes, the header length alone takes 8")
    (n,) = struct.unpack("<Q", view[:8])
    if n > max_header_bytes:
        raise WireError(f"safetensors header of {n} bytes exceeds the limit of {max_header_bytes}")
    if 8 + n > len(view):
        raise WireError(f"safetensors header length {n} runs past the end of the {len(view)}-byte body")
    raw = bytes(view[8 : 8 + n])
    if data is None:
        section = view[8 + n :]
    elif 8 + n != len(view):
        raise WireError(f"a header of {8 + n} bytes followed by {len(view) - 8 - n} more, where none belong")
    else:
        section = memoryview(data).cast("B")
    split = _split_metadata(raw)
    key: bytes | str = raw if split is None else split[1]
    with _HEADERS_LOCK:
        known = _HEADERS.get(key)
        if known is not None:
            _HEADERS.move_to_end(key)
    if known is None:
        known = _parse_header(raw)  # validates all of it, the metadata too
        if len(raw) <= _HEADER_CACHED_MAX:
            _remember(key, known)
    entries, metadata = known if split is None else (known[0], split[0])
    end = max((e.stop for e in entries), default=0)
    if end != len(section):
        raise WireError(f"tensors cover {end} bytes of data but the body carries {len(section)}")
    return Safetensors(entries, dict(metadata), section, view if data is None else None)


_META_FIRST = b'{"__metadata__":'  # how header() begins a header that has metadata
_META_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _split_metadata(raw: bytes) -> tuple[dict[str, str], str] | None:
    """A header written as :func:`header` writes it, the metadata first: (the metadata, validated; the text after
    it, without trailing whitespace). The tensor entries are the same step after step while the metadata (the
    step number) changes, so the cache is keyed by that text; None for any other header, or one whose metadata
    is not valid (the whole header is then parsed, and refused, as usual). A duplicate ``__metadata__`` in the
    rest cannot hide: the rest was cached only after a whole parse of a header holding it, which refuses duplicate
    keys."""
    if not raw.startswith(_META_FIRST):
        return None
    try:
        text = raw.decode("utf-8")
        metadata, end = _META_DECODER.raw_decode(text, len(_META_FIRST))
        return _metadata(metadata), text[end:].rstrip(" \t\n\r")  # JSON's whitespace: the padding, which varies
    except (UnicodeDecodeError, ValueError, WireError):
        return None


def _remember(raw: bytes | str, parsed: tuple[tuple[TensorEntry, ...], dict[str, str]]) -> None:
    global _headers_bytes
    with _HEADERS_LOCK:
        if raw in _HEADERS:
            return
        _HEADERS[raw] = parsed
        _headers_bytes += len(raw)
        while len(_HEADERS) > _HEADERS_KEPT or _headers_bytes > _HEADERS_BYTES_KEPT:
            old, _ = _HEADERS.popitem(last=False)
            _headers_bytes -= len(old)


def _parse_header(raw: bytes) -> tuple[tuple[TensorEntry, ...], dict[str, str]]:
    """The validated entries and metadata of a header (everything but the body's length)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"safetensors header is not UTF-8: {e}") from None
    if not text.startswith("{"):
        raise WireError("safetensors header is not a JSON object")
    header = loads(text, "safetensors header", object_pairs_hook=_no_duplicates)
    if not isinstance(header, dict):
        raise WireError("safetensors header is not a JSON object")
    metadata = _metadata(header.pop("__metadata__", None))
    entries = [_entry(name, info) for name, info in header.items()]
    end = 0
    for entry in sorted(entries, key=lambda x: (x.start, x.stop)):
        if entry.start != end:
            what = "overlaps the previous tensor" if entry.start < end else f"leaves a gap after byte {end}"
            raise WireError(f"tensor {entry.name!r}: data_offsets [{entry.start}, {entry.stop}] {what}")
        end = entry.stop
    return tuple(entries), metadata


def _check_name(name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError(f"tensor name {name!r} is not valid Unicode (lone surrogate)") from None


def _entry(name: str, info: Any) -> TensorEntry:
    _check_name(name)
    if not isinstance(info, dict):
        raise WireError(f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise WireError(f"tensor {name!r}: unknown dtype {dtype!r}")
    shape = _check_shape(name, shape)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) and o >= 0 for o in offsets)):
        raise WireError(f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
    start, stop = offsets
    if stop < start:
        raise WireError(f"tensor {name!r}: data_offsets [{start}, {stop}] end before they begin")
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if stop - start != nbytes:
        raise WireError(
            f"tensor {name!r}: shape {list(shape)} of {dtype} needs {nbytes} bytes, data_offsets give {stop - start}"
        )
    return TensorEntry(name, dtype, shape, start, stop)


def decode(
    body: bytes | bytearray | memoryview, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decode a safetensors body into ``({name: array}, metadata)``; arrays are read-only views where possible."""
    st = parse(body, max_header_bytes)
    return st.tensors(), st.metadata


# --- JSON ----------------------------------------------------------------------------------------------------------


def _json_numbers(a: np.ndarray) -> str:
    """A flat JSON array of the shortest decimal forms that round-trip the values' own precision."""
    flat = a.reshape(-1)
    if flat.dtype.kind == "f":
        text = flat.astype(str)
        if not np.isfinite(flat).all():  # Python's json reads these back; strict parsers refuse non-finite values
            text = np.where(np.isnan(flat), "NaN", np.where(flat > 0, "Infinity", "-Infinity"))
            text = np.where(np.isfinite(flat), flat.astype(str), text)
        return "[" + ",".join(text.tolist()) + "]"
    return json.dumps(flat.tolist())


def encode_json(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, dtype: str | None = None
) -> bytes:
    """``{"__metadata__": {...}, name: {"dtype", "shape", "data"}}`` with flat data lists."""
    parts = []
    if metadata:
        parts.append(
            '"__metadata__":' + json.dumps({str(k): str(v) for k, v in metadata.items()}, separators=(",", ":"))
        )
    for name, value in tensors.items():
        code, arr = as_wire_array(value, dtype)
        if code not in _NAME_OF:
            raise WireError(f"tensor {name!r}: JSON tensors are {', '.join(DTYPE_NAMES)}, not {code}")
        shown = from_bfloat16(arr) if code == "BF16" else arr
        type_name = _NAME_OF[code]
        parts.append(
            f'{json.dumps(name)}:{{"dtype":"{type_name}","shape":{json.dumps(list(arr.shape), separators=(",", ":"))},'
            f'"data":{_json_numbers(shown)}}}'
        )
    return ("{" + ",".join(parts) + "}").encode()


def _has_bool(data: list[Any]) -> bool:
    return any(isinstance(x, bool) or (isinstance(x, list) and _has_bool(x)) for x in data)


def _json_tensor(name: str, info: Any) -> np.ndarray:
    _check_name(name)
    if not isinstance(info, dict):
        raise WireError(f"tensor {name!r}: expected an object with dtype, shape and data")
    unknown = set(info) - {"dtype", "shape", "data"}
    if unknown:
        raise WireError(f"tensor {name!r}: unknown field(s) {sorted(unknown)}")
    dtype = info.get("dtype", "float32")
    code = DTYPE_NAMES.get(dtype) if isinstance(dtype, str) else None
    if code is None:
        raise WireError(f"tensor {name!r}: dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    data = info.get("data")
    if not isinstance(data, list):
        raise WireError(f"tensor {name!r}: data must be a list of numbers")
    try:
        values = np.array(data)
    except ValueError as e:  # ragged nesting
        raise WireError(f"tensor {name!r}: data is not a rectangular list of numbers ({e})") from None
    # numpy turns [1.5, true] into numbers, so the data is checked for booleans one by one
    if values.dtype.kind not in "fi" or _has_bool(data):
        raise WireError(f"tensor {name!r}: data must contain only numbers")
    shape = list(_check_shape(name, info.get("shape", list(values.shape))))
    if values.size != math.prod(shape):
        raise WireError(f"tensor {name!r}: shape {shape} needs {math.prod(shape)} values, data has {values.size}")
    if values.ndim > 1 and list(values.shape) != shape:
        raise WireError(f"tensor {name!r}: nested data of shape {list(values.shape)} does not match shape {shape}")
    with np.errstate(over="ignore"):
        out = values.astype(np.float32 if code == "BF16" else _NUMPY[code]).reshape(shape)
    return from_bfloat16(to_bfloat16(out)) if code == "BF16" else out


def decode_json(body: bytes | bytearray | str | Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decode a JSON tensor body (or an already-parsed object) into ``({name: array}, metadata)``."""
    if isinstance(body, Mapping):
        obj: Any = dict(body)
    elif not isinstance(body, (bytes, bytearray, str)):
        raise WireError(f"tensors must be a JSON object of named tensors, got {type(body).__name__}")
    else:
        obj = loads(body, "body", object_pairs_hook=_no_duplicates)
    if not isinstance(obj, dict):
        raise WireError("body must be a JSON object of named tensors")
    metadata = _metadata(obj.pop("__metadata__", None))
    return {name: _json_tensor(name, info) for name, info in obj.items()}, metadata


def iter_chunks(parts: Iterable[bytes | memoryview], size: int = 1 << 20) -> Iterable[bytes | memoryview]:
    """Split buffers into pieces of at most ``size`` bytes, for streaming a large body (no copies)."""
    for part in parts:
        view = memoryview(part).cast("B")
        for i in range(0, len(view), size):
            yield view[i : i + size]
