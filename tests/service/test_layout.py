"""FlatLayout: group ordering, and gathering gradients without a copy when they come in the session's order."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.client import wire
from optserve.service.errors import InvalidInput
from optserve.service.layout import FlatLayout

SHAPES = {"a": (2, 3), "b": (4,), "c": (), "d": (3, 1)}


def make_layout() -> FlatLayout:
    # b and d in group 0, a and c in group 1: the layout puts group 0 first, keeping creation order inside a group
    groups = {"a": 1, "b": 0, "c": 1, "d": 0}
    return FlatLayout([(name, shape, groups[name]) for name, shape in SHAPES.items()])


def grads(order: list[str], dtype: str = "float32") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {n: rng.standard_normal(SHAPES[n]).astype(np.float32) for n in order}


def test_tensors_are_ordered_group_by_group_and_each_group_is_one_range() -> None:
    layout = make_layout()
    assert layout.names == ["b", "d", "a", "c"]
    assert layout.group_ranges == {0: (0, 7), 1: (7, 14)}
    assert layout.size == 14
    flat = layout.flatten(grads(["a", "b", "c", "d"]))
    views = layout.views(flat)
    assert all(np.shares_memory(v, flat) for v in views.values())


def test_gradients_in_session_order_are_a_view_of_the_body() -> None:
    layout = make_layout()
    g = grads(layout.names)
    body = wire.encode(g)
    flat, present = layout.gather(wire.parse(body))
    assert present is None
    assert np.shares_memory(flat, np.frombuffer(body, np.uint8))
    assert not flat.flags.writeable
    np.testing.assert_array_equal(flat, np.concatenate([g[n].reshape(-1) for n in layout.names]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_other_orders_and_reduced_precision_are_copied_into_place(dtype: str) -> None:
    layout = make_layout()
    g = grads(["c", "a", "d", "b"])
    body = wire.encode(g, dtype=dtype)
    flat, present = layout.gather(wire.parse(body))
    assert present is None
    assert flat.dtype == np.float32
    assert not np.shares_memory(flat, np.frombuffer(body, np.uint8))
    sent = wire.decode(body)[0]
    for name, view in layout.views(flat).items():
        np.testing.assert_array_equal(view, np.asarray(sent[name], dtype=np.float32))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda g: g.pop("a"), "missing tensor"),
        (lambda g: g.update(e=np.zeros(1, np.float32)), "unknown tensor"),
        (lambda g: g.update(a=np.zeros((3, 2), np.float32)), "shape"),
        (lambda g: g.update(a=np.zeros((2, 3), np.float64)), "dtype"),
        (lambda g: g.update(a=np.zeros((2, 3), np.int32)), "dtype"),
    ],
)
def test_mismatched_gradients_are_refused(change, message: str) -> None:
    layout = make_layout()
    g = grads(layout.names)
    change(g)
    for form in (wire.parse(wire.encode(g)), g):
        with pytest.raises(InvalidInput, match=message):
            layout.gather(form)
