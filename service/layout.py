"""The flat layout: a session's tensors as consecutive ranges of one float32 buffer per state.

``FlatLayout`` is the table name -> (offset, shape). Tensors are ordered group by group (the order of
``torch.optim`` state dicts), so each parameter group is one contiguous range and one fused call steps it. When a
client sends its gradients in this order as float32, the data section of the safetensors body *is* the flat gradient
vector and :meth:`FlatLayout.gather` returns a view of the body without copying anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from optserve.client.wire import Safetensors, from_bfloat16

from .errors import InvalidInput

# Gradients may travel in reduced precision; the master copy and the moments stay float32.
GRADIENT_DTYPES = ("F32", "F16", "BF16")
_NUMPY_CODES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in the flat buffers."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    group: int

    @property
    def stop(self) -> int:
        return self.offset + self.size


class FlatLayout:
    """Names, shapes and offsets of a session's tensors, ordered by parameter group."""

    def __init__(self, tensors: Sequence[tuple[str, tuple[int, ...], int]]) -> None:
        """``tensors``: (name, shape, group index) in creation order; stable-sorted here by group."""
        slots, offset = [], 0
        for name, shape, group in sorted(tensors, key=lambda item: item[2]):
            size = math.prod(shape)
            slots.append(Slot(name, tuple(shape), offset, size, group))
            offset += size
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.specs = tuple((s.name, "F32", s.shape) for s in self.slots)  # the flat buffer as safetensors entries
        self.index: dict[str, int] = {s.name: i for i, s in enumerate(self.slots)}
        self.size = offset
        groups = sorted({s.group for s in self.slots})
        self.group_ranges: dict[int, tuple[int, int]] = {
            g: (
                min(s.offset for s in self.slots if s.group == g),
                max(s.stop for s in self.slots if s.group == g),
            )
            for g in groups
        }

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def for_state(self, state_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]], name: str) -> FlatLayout:
        """The layout of state buffer ``name``: the same tensors in the same order, each in the shape
        ``state_shape(name, shape)`` gives (an algorithm's own; this layout itself when every shape is unchanged)."""
        shapes = [tuple(state_shape(name, s.shape)) for s in self.slots]
        if all(shape == s.shape for shape, s in zip(shapes, self.slots)):
            return self
        return FlatLayout([(s.name, shape, s.group) for s, shape in zip(self.slots, shapes)])

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Each tensor as a view (no copy) into a flat buffer of this layout."""
        return {s.name: flat[s.offset : s.stop].reshape(s.shape) for s in self.slots}

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """A new flat float32 buffer holding ``tensors`` (which must match the layout exactly)."""
        flat = np.empty(self.size, dtype=np.float32)
        for s in self.slots:
            flat[s.offset : s.stop] = np.asarray(tensors[s.name], dtype=np.float32).reshape(-1)
        return flat

    def check_names(self, names: Sequence[str], partial: bool = False) -> None:
        """Refuse a set of tensor names that is not exactly the session's (a subset when ``partial``)."""
        given = set(names)
        missing = [] if partial else [n for n in self.names if n not in given]
        unknown = sorted(given - set(self.index))
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing tensor(s): {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown tensor(s): {', '.join(unknown)}")
            raise InvalidInput(
                "; ".join(parts) + f" (the session holds: {', '.join(self.names)})", missing=missing, unknown=unknown
            )

    def _check_entry(self, name: str, shape: tuple[int, ...], dtype: str) -> Slot:
        slot = self.slots[self.index[name]]
        if tuple(shape) != slot.shape:
            raise InvalidInput(f"tensor {name!r} has shape {list(shape)}, the session holds {list(slot.shape)}")
        if dtype not in GRADIENT_DTYPES:
            raise InvalidInput(f"tensor {name!r} has dtype {dtype}; gradients must be F32, F16 or BF16")
        return slot

    def _in_order(self, grads: Safetensors) -> bool:
        """Exactly the session's tensors, float32, with its shapes, stored in layout order."""
        entries = grads.entries
        if len(entries) != len(self.slots):
            return False
        pos = 0
        for e, slot in zip(entries, self.slots):
            if e.name != slot.name or e.dtype != "F32" or e.shape != slot.shape or e.start != pos:
                return False
            pos = e.stop
        return True

    def gather(
        self, grads: Safetensors | Mapping[str, np.ndarray], partial: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The gradients as one flat float32 vector in layout order, validated against the layout.

        Returns ``(flat, present)``: ``present`` is None when every tensor came, else a boolean per slot (only with
        ``partial``; the ranges of absent tensors hold zeros). Zero-copy when ``grads`` is a safetensors body whose
        tensors are all F32 and stored in layout order: ``flat`` is then a read-only view of the body's data.
        """
        if isinstance(grads, Safetensors):
            if self._in_order(grads):  # the common case, checked without building sets: a view of the body
                return np.frombuffer(grads.data, dtype="<f4", count=self.size), None
            entries = sorted(grads.entries, key=lambda e: e.start)
            names = [e.name for e in entries]
            self.check_names(names, partial)
            for e in entries:
                self._check_entry(e.name, e.shape, e.dtype)
            if all(e.dtype == "F32" for e in entries) and names == self.names:
                return np.frombuffer(grads.data, dtype="<f4", count=self.size), None
            items = [(e.name, grads.raw(e), e.dtype) for e in entries]
        else:
            names = list(grads)
            self.check_names(names, partial)
            items = []
            for name, array in grads.items():
                a = np.asarray(array)
                code = _NUMPY_CODES.get(a.dtype, str(a.dtype))
                self._check_entry(name, a.shape, code)
                items.append((name, a, code))
        flat = (
            np.zeros(self.size, dtype=np.float32) if len(items) < len(self.slots) else np.empty(self.size, np.float32)
        )
        present = np.zeros(len(self.slots), dtype=bool)
        for name, raw, code in items:
            i = self.index[name]
            slot = self.slots[i]
            present[i] = True
            data = raw.reshape(-1)
            flat[slot.offset : slot.stop] = from_bfloat16(data) if code == "BF16" else data
        return flat, None if present.all() else present
