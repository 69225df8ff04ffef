"""Hyperparameter changes that need state the session does not hold yet, over real HTTP, with torch as the oracle.

torch creates optimizer state when it is first needed: SGD's momentum buffer at a tensor's first step with momentum
(from that step's gradient), RMSprop's and Adam's buffers at a tensor's first step. A scheduler (``OneCycleLR``) or
user code that switches momentum on, before the first step or mid-run, therefore trains in torch; the server
creates the buffer then. Switched off, a buffer keeps its values, and switching it on again resumes from them, as
torch's state does. Where torch 2.13 itself fails (RMSprop's momentum or ``centered`` and Adam's ``amsgrad`` switched
on after a tensor's first step raise KeyError), the server starts the buffer at zero, torch's initial value: the
oracle is then torch with that zero buffer put into its state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from optserve.client import Client, checkpoint
from optserve.client.errors import LimitExceeded
from optserve.service.embedded import serve_in_thread
from optserve.service.settings import Settings

SHAPES = {"w": (4, 3), "b": (3,), "c": (5,)}
GROUPS = [["w", "b"], ["c"]]  # two parameter groups, in layout order
TOL = {"rtol": 1e-5, "atol": 1e-6}


def params0(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def grads_at(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


class Twin:
    """A server session and a torch optimizer stepped alike; ``change`` applies the same hyperparameter change to
    both (in-band with the next step, or by PATCH), ``step`` steps both (``skip``: tensors without a gradient)."""

    def __init__(self, client: Client, optimizer: str, torch_cls: type, hp: Mapping[str, Any]) -> None:
        self.client = client
        p0 = params0()
        self.tensors = {n: torch.tensor(a) for n, a in p0.items()}
        self.torch = torch_cls([{"params": [self.tensors[n] for n in g]} for g in GROUPS], **hp)
        specs = [{"params": g} for g in GROUPS]
        self.sid = client.create_session(p0, optimizer, hyperparams=dict(hp), param_groups=specs)["id"]
        self.at = 0
        self.pending: list[dict[str, Any] | None] | None = None

    def change(self, group: int | None, patch: bool = False, **hp: Any) -> None:
        for i, g in enumerate(self.torch.param_groups):
            if group is None or group == i:
                g.update(hp)
        if patch:
            self.client.update_hyperparams(self.sid, group, **hp)
        else:
            self.pending = [hp if group is None or group == i else None for i in range(len(GROUPS))]

    def step(self, skip: tuple[str, ...] = ()) -> None:
        grads = {n: g for n, g in grads_at(self.at).items() if n not in skip}
        for n, t in self.tensors.items():
            t.grad = torch.from_numpy(grads[n]) if n in grads else None
        self.torch.step()
        result = self.client.step(self.sid, grads, partial=bool(skip), changes=self.pending, if_match=self.at)
        self.pending = None
        self.at += 1
        assert result.step == self.at and result.params is not None
        for n, t in self.tensors.items():
            np.testing.assert_allclose(result.params[n], t.numpy(), **TOL, err_msg=f"{n} at step {self.at}")

    def start_at_zero(self, group: int, buffer: str) -> None:
        """What the server does where torch raises KeyError: the buffer of already stepped tensors starts at 0."""
        for t in self.torch.param_groups[group]["params"]:
            state = self.torch.state[t]
            if state and buffer not in state:
                state[buffer] = torch.zeros_like(t)

    def check_state(self) -> None:
        """Every buffer torch holds, the server holds with the same values."""
        cp = checkpoint.decode(self.client.checkpoint(self.sid))
        for n, t in self.tensors.items():
            for key, value in self.torch.state[t].items():
                if key != "step":
                    np.testing.assert_allclose(cp.state[key][n], value.numpy(), **TOL, err_msg=f"{key}/{n}")


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


def test_sgd_momentum_switched_on_mid_run_off_and_on_again_matches_torch(client):
    twin = Twin(client, "sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.0, "dampening": 0.3})
    for _ in range(3):
        twin.step()
    assert client.session(twin.sid)["state"] == []
    twin.change(0, momentum=0.9)  # in-band: the buffer starts from this step's gradient, as torch's does
    twin.step(skip=("b",))  # b's buffer starts one step later, at its own first step with momentum
    twin.step()
    twin.check_state()
    twin.change(1, patch=True, momentum=0.5, nesterov=False)  # by PATCH, for the other group
    twin.step()
    twin.step(skip=("w",))
    twin.change(None, momentum=0.0)  # off: the buffers keep their values...
    twin.step()
    twin.change(None, patch=True, momentum=0.8)  # ...and on again, torch resumes from them
    for _ in range(3):
        twin.step()
    twin.check_state()
    assert client.session(twin.sid)["state"] == ["momentum_buffer"]


def test_sgd_momentum_buffers_started_survive_a_checkpoint_export_and_import(client):
    twin = Twin(client, "sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.0, "dampening": 0.5})
    twin.step()
    twin.change(None, momentum=0.9)
    twin.step(skip=("c",))  # w and b have started their buffer, c has not
    body = client.checkpoint(twin.sid)
    assert checkpoint.decode(body).momentum_started == [True, True, False]
    # imported under the id (replacing the session): the next steps are torch's, c's buffer starting from its gradient
    client.restore(twin.sid, body)
    twin.step()
    twin.step()
    twin.check_state()


def test_sgd_momentum_buffers_started_survive_a_restart_from_snapshots(servers):
    client = servers(data_dir="kept")
    twin = Twin(client, "sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.0, "dampening": 0.5})
    twin.step()
    twin.change(None, patch=True, momentum=0.9)
    twin.step(skip=("c",))
    servers.stop_all()  # a graceful stop snapshots every session
    twin.client = servers(data_dir="kept")
    twin.step()
    twin.step()
    twin.check_state()


def test_a_checkpoint_without_momentum_started_reads_as_before(client):
    """Checkpoints and snapshots written before momentum could change have no ``momentum_started``: every stepped
    tensor of a group with momentum has started its buffer, the others have not."""
    p0 = params0()
    specs = [{"params": GROUPS[0], "momentum": 0.9}, {"params": GROUPS[1]}]
    sid = client.create_session(p0, "sgd", hyperparams={"lr": 0.1}, param_groups=specs)["id"]
    local = {n: torch.tensor(a) for n, a in p0.items()}
    opt = torch.optim.SGD([{"params": [local[n] for n in g]} for g in GROUPS], lr=0.1)
    opt.param_groups[0]["momentum"] = 0.9

    def step(at: int) -> dict[str, np.ndarray]:
        for n, t in local.items():
            t.grad = torch.from_numpy(grads_at(at)[n])
        opt.step()
        result = client.step(sid, grads_at(at))
        assert result.params is not None
        return result.params

    step(0)
    cp = checkpoint.decode(client.checkpoint(sid))
    cp.momentum_started = None
    client.restore(sid, checkpoint.encode(cp))
    assert checkpoint.decode(client.checkpoint(sid)).momentum_started == [True, True, False]
    client.update_hyperparams(sid, 1, momentum=0.5, dampening=0.5)
    opt.param_groups[1].update(momentum=0.5, dampening=0.5)
    for at in (1, 2):
        got = step(at)
    for n, t in local.items():
        np.testing.assert_allclose(got[n], t.numpy(), **TOL)


def test_rmsprop_momentum_and_centered_switched_on_before_the_first_step_match_torch(client):
    """What OneCycleLR does at construction: momentum set in every group before any step."""
    twin = Twin(client, "rmsprop", torch.optim.RMSprop, {"lr": 0.01})
    twin.change(None, momentum=0.95, centered=True)
    for _ in range(4):
        twin.step()
    twin.change(None, momentum=0.85)
    twin.step()
    twin.check_state()
    assert client.session(twin.sid)["state"] == ["grad_avg", "momentum_buffer", "square_avg"]


def test_rmsprop_momentum_switched_on_mid_run_starts_from_zero_off_and_on_again_resumes(client):
    twin = Twin(client, "rmsprop", torch.optim.RMSprop, {"lr": 0.01, "weight_decay": 0.1})
    twin.step()
    twin.step()
    twin.change(1, patch=True, momentum=0.5, centered=True)
    twin.start_at_zero(1, "momentum_buffer")
    twin.start_at_zero(1, "grad_avg")
    twin.step()
    twin.step()
    twin.change(1, momentum=0.0)
    twin.step()
    twin.change(1, momentum=0.7)
    twin.step()
    twin.check_state()


def test_adam_amsgrad_switched_on_mid_run_starts_from_zero(client):
    twin = Twin(client, "adam", torch.optim.Adam, {"lr": 0.01})
    twin.step()
    twin.change(None, amsgrad=True)
    twin.start_at_zero(0, "max_exp_avg_sq")
    twin.start_at_zero(1, "max_exp_avg_sq")
    twin.step()
    twin.step()
    twin.change(0, patch=True, amsgrad=False)
    twin.step()
    twin.check_state()


class Servers:
    """``servers(budget=..., data_dir=...)`` starts a server with those settings and answers a client of it;
    ``stop_all()`` stops every server started (gracefully: snapshots are written)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.stack = contextlib.ExitStack()

    def __call__(self, budget: int | None = None, data_dir: str | None = None) -> Client:
        folder = self.tmp_path / (data_dir or f"data{len(self.stack._exit_callbacks)}")
        extra = {} if budget is None else {"memory_budget_bytes": budget}
        settings = Settings(data_dir=folder, snapshot_every_seconds=0, **extra)
        embedded = self.stack.enter_context(serve_in_thread(settings=settings, log_level="critical"))
        return self.stack.enter_context(Client(embedded.url))

    def stop_all(self) -> None:
        self.stack.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    started.stop_all()


def test_a_buffer_beyond_the_memory_budget_is_refused_507_and_nothing_changes(servers):
    p0 = {"w": np.ones(200, np.float32)}  # 800 bytes of parameters; momentum needs 800 more
    client = servers(budget=1500)
    sid = client.create_session(p0, "sgd", hyperparams={"lr": 0.1})["id"]
    before = client.checkpoint(sid)
    with pytest.raises(LimitExceeded) as e:
        client.update_hyperparams(sid, momentum=0.9)
    assert e.value.status == 507 and e.value.problem["needed_bytes"] == 800
    assert e.value.problem["used_bytes"] == 800 and e.value.problem["budget_bytes"] == 1500
    with pytest.raises(LimitExceeded):  # in-band: the step is refused with its change
        client.step(sid, {"w": np.ones(200, np.float32)}, changes={"momentum": 0.9, "lr": 0.5})
    info = client.session(sid)
    assert info["step"] == 0 and info["state"] == [] and info["hyperparams"]["momentum"] == 0.0
    assert info["hyperparams"]["lr"] == 0.1
    assert client.checkpoint(sid) == before
    # a change that needs no new buffer still goes through
    assert client.step(sid, {"w": np.ones(200, np.float32)}, changes={"lr": 0.5}).step == 1

    roomy = servers(budget=1600)
    sid = roomy.create_session(p0, "sgd", hyperparams={"lr": 0.1})["id"]
    roomy.update_hyperparams(sid, momentum=0.9)
    assert roomy.session(sid)["state"] == ["momentum_buffer"]
    result = roomy.step(sid, {"w": np.ones(200, np.float32)})
    assert result.params is not None
    np.testing.assert_allclose(result.params["w"], np.float32(0.9))  # 1 - lr * buf, buf = g at its first step
    # the new buffer counts: a session of 1 parameter no longer fits
    with pytest.raises(LimitExceeded):
        roomy.create_session({"x": np.ones(1, np.float32)}, "sgd")
