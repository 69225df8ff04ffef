"""End to end: a real ``optserve serve`` process trains a numpy model through ``RemoteOptimizer``."""

from __future__ import annotations

import numpy as np
import pytest

from optserve.client import RemoteOptimizer
from optserve.service import reference
from optserve.service.hyperparams import make_hyperparams

pytestmark = pytest.mark.server


def make_data(n: int = 256, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w_true = rng.standard_normal(d).astype(np.float32)
    y = (x @ w_true + 0.1 * rng.standard_normal(n) > 0).astype(np.float32)
    return x, y


def loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Binary cross-entropy of a logistic regression and its gradients."""
    logits = x @ params["W1"][:, 0] + params["b1"][0]
    prob = 1.0 / (1.0 + np.exp(-logits))
    eps = 1e-7
    loss = float(-np.mean(y * np.log(prob + eps) + (1 - y) * np.log(1 - prob + eps)))
    err = ((prob - y) / len(y)).astype(np.float32)
    return loss, {
        "W1": (x.T @ err)[:, None].astype(np.float32),
        "b1": np.array([err.sum()], dtype=np.float32),
    }


def initial_params(d: int) -> dict[str, np.ndarray]:
    return {"W1": np.zeros((d, 1), np.float32), "b1": np.zeros(1, np.float32)}


def test_logistic_regression_trains_remotely_like_the_local_reference(server_process) -> None:
    x, y = make_data()
    hyper = {"lr": 0.05, "weight_decay": 0.01}

    params = initial_params(x.shape[1])
    losses = []
    with RemoteOptimizer(params, url=server_process.url, optimizer="adamw", **hyper) as opt:
        for _ in range(100):
            loss, grads = loss_and_grads(params, x, y)
            losses.append(loss)
            returned = opt.step(grads)
            assert returned is params
        assert opt.step_count == 100

    local = initial_params(x.shape[1])
    hp = make_hyperparams("adamw", hyper)
    state = {name: {s: np.zeros_like(p) for s in hp.state_names()} for name, p in local.items()}
    for t in range(1, 101):
        _, grads = loss_and_grads(local, x, y)
        for name in local:
            local[name], state[name] = reference.step("adamw", local[name], grads[name], state[name], t, hp)

    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses[::10], losses[10::10]))
    for name in params:
        assert params[name].dtype == np.float32
        np.testing.assert_allclose(params[name], local[name], rtol=1e-5, atol=1e-6)
