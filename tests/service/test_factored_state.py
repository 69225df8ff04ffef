"""State that is not one float per parameter: Adafactor's factored second moment and NAdam's per-tensor mu_product.

The session, the memory budget, the session info and checkpoints ask the algorithm for its state's shapes: a 2-D
tensor's Adafactor state is its rows plus its columns, a 1-D tensor's its size; NAdam keeps one float per tensor
besides its two moments. Against a real server (in a thread), with its memory budget. Neither is elementwise: they
are not sharded (the Ray store's shards cut flat buffers inside tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from optserve.client import Client, checkpoint
from optserve.client.errors import LimitExceeded
from optserve.service import shards
from optserve.service.embedded import serve_in_thread
from optserve.service.errors import InvalidInput
from optserve.service.session import Session, SessionConfig
from optserve.service.settings import Settings

ROWS, COLS, BIAS = 300, 200, 200
PARAMS = {"w": np.ones((ROWS, COLS), np.float32), "b": np.ones(BIAS, np.float32), "s": np.ones((), np.float32)}
N = ROWS * COLS + BIAS + 1


@pytest.fixture
def budget_server(tmp_path: Path) -> Iterator[Client]:
    """A server whose memory budget holds these parameters with Adafactor's state, not with AdamW's."""
    budget = 4 * (N + ROWS + COLS + BIAS + 1) + 1000
    settings = Settings(data_dir=tmp_path / "data", snapshot_every_seconds=0, memory_budget_bytes=budget)
    with contextlib.ExitStack() as stack:
        embedded = stack.enter_context(serve_in_thread(settings=settings, log_level="critical"))
        yield stack.enter_context(Client(embedded.url))


def test_adafactor_state_is_rows_plus_columns_in_the_session_and_the_budget(budget_server: Client) -> None:
    with pytest.raises(LimitExceeded) as e:  # AdamW: the parameters and two moments of their size
        budget_server.create_session(PARAMS, "adamw")
    assert e.value.problem["needed_bytes"] == 4 * 3 * N
    info = budget_server.create_session(PARAMS, "adafactor", session_id="fact")
    assert info["state"] == ["col_var", "row_var", "variance"]
    assert info["state_bytes"] == 4 * (ROWS + COLS + BIAS + 1)  # w: rows + columns; b and s: their size
    assert info["elementwise"] is False
    grads = {"w": np.full((ROWS, COLS), 0.5, np.float32), "b": np.ones(BIAS, np.float32), "s": np.ones((), np.float32)}
    result = budget_server.step("fact", grads)
    assert result.params is not None and np.all(result.params["w"] < 1)

    body = budget_server.checkpoint("fact")
    shapes = {name: array.shape for name, array in safetensors.numpy.load(body).items()}  # any safetensors reader
    assert shapes["row_var/w"] == (ROWS, 1) and shapes["col_var/w"] == (1, COLS)
    assert shapes["variance/b"] == (BIAS,) and shapes["variance/s"] == ()
    assert shapes["variance/w"] == shapes["row_var/b"] == shapes["col_var/s"] == (0,)  # kept by none of them
    cp = checkpoint.decode(body)
    # the first step's factors are the mean squares of the gradient's rows and columns (beta2_t = 1 at step 1)
    np.testing.assert_allclose(cp.state["row_var"]["w"], np.full((ROWS, 1), 0.25, np.float32), rtol=1e-6)
    np.testing.assert_allclose(cp.state["col_var"]["w"], np.full((1, COLS), 0.25, np.float32), rtol=1e-6)

    budget_server.restore("fact", body)  # the file loads back as it was written
    assert budget_server.checkpoint("fact") == body
    budget_server.step("fact", grads)
    assert budget_server.session("fact")["step"] == 2


def test_a_checkpoint_whose_state_has_the_parameters_shape_is_refused_for_adafactor(budget_server: Client) -> None:
    budget_server.create_session(PARAMS, "adafactor", session_id="fact")
    cp = checkpoint.decode(budget_server.checkpoint("fact"))
    cp.state["row_var"]["w"] = np.zeros((ROWS, COLS), np.float32)  # one float per parameter: not Adafactor's
    with pytest.raises(ValueError, match=r"row_var/w has shape \[300, 200\], adafactor keeps \[300, 1\]"):
        budget_server.restore("fact", checkpoint.encode(cp))
    assert budget_server.session("fact")["step"] == 0


def test_nadam_keeps_one_mu_product_per_tensor_starting_at_one() -> None:
    session = Session("n", SessionConfig(optimizer="nadam"), PARAMS)
    assert session.state["mu_product"].tolist() == [1.0, 1.0, 1.0]  # torch's initial value, one per tensor
    assert session.nbytes == 4 * (3 * N + 3)
    session.step({"w": np.ones((ROWS, COLS), np.float32), "b": np.ones(BIAS, np.float32)}, partial=True)
    beta1, decay = 0.9, 4e-3
    mu = np.float32(beta1 * (1 - 0.5 * 0.96 ** (1 * decay)))
    assert session.state["mu_product"].tolist() == [float(mu), float(mu), 1.0]  # s had no gradient: untouched


@pytest.mark.parametrize("optimizer", ["nadam", "adafactor"])
def test_an_algorithm_that_is_not_elementwise_is_not_sharded(optimizer: str) -> None:
    config = SessionConfig(optimizer=optimizer, shards=2)
    with pytest.raises(InvalidInput, match=f"{optimizer} cannot be sharded"):
        shards.split_params("s", config, dict(PARAMS), 2)
    with pytest.raises(InvalidInput, match=f"{optimizer} cannot be sharded"):
        shards.split(Session("s", config, PARAMS), 2)


def test_an_elementwise_new_algorithm_sharded_steps_bit_for_bit_like_the_whole_session() -> None:
    """RAdam is elementwise: its ranges stepped apart (cutting w inside) give the whole session's bits."""
    config = SessionConfig(optimizer="radam", hyperparams={"lr": 0.01, "weight_decay": 0.1}, shards=3)
    whole = Session("s", config.model_copy(update={"shards": 1}), PARAMS)
    parts = [Session(sid, cfg, pieces) for sid, cfg, pieces in shards.split_params("s", config, dict(PARAMS), 3)]
    rng = np.random.default_rng(5)
    for _ in range(10):  # past RAdam's rectification threshold (rho_t > 5 from step 6)
        g = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in PARAMS.items()}
        whole.step(g)
        flat, _ = whole.layout.gather(g)
        for j, part in enumerate(parts):
            assert part.config.shard is not None
            lo, hi = part.config.shard.lo, part.config.shard.hi
            part.step(shards.pieces(whole.layout, j, lo, hi, flat))
    merged = shards.merge("s", parts)
    assert np.array_equal(merged.params, whole.params)
    assert all(np.array_equal(merged.state[n], whole.state[n]) for n in whole.state)
