"""Overlap (the delayed parameter update) and ``step_async``, against a real server, with torch.optim as the oracle.

With overlap, step k+1's gradients are computed at the parameters before step k's update: the expected sequence is
torch.optim applied to exactly those stale gradients.
"""

from __future__ import annotations

import asyncio
import copy
import time

import httpx
import numpy as np
import pytest
import torch

from optserve.client import AsyncClient, Client, RemoteOptimizer
from optserve.client.errors import NotFound
from optserve.client.torch import RemoteAdam, RemoteAdamW, RemoteRMSprop, RemoteSGD

STEPS = 30
CASES = [
    (RemoteAdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (RemoteAdam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    (RemoteSGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (RemoteRMSprop, torch.optim.RMSprop, {"lr": 0.005, "momentum": 0.5}),
]


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)
    xs = [torch.randn(32, 6, generator=g) for _ in range(n)]
    return [(x, (x @ w).argmax(dim=1)) for x in xs]


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def stale_reference(torch_cls, hp, data, warmup: int = 0, scheduler=None) -> tuple[torch.nn.Module, list[float]]:
    """torch.optim on one-step-stale gradients: step k+1 uses the gradient taken at the parameters that were
    current before step k was applied (after the first ``warmup`` exact steps)."""
    model = make_model()
    opt = torch_cls(model.parameters(), **hp)
    sched = scheduler(opt) if scheduler else None
    held: list[torch.Tensor] | None = None  # the parameters the stale loop computes its gradients at
    losses = []
    for k, (x, y) in enumerate(data):
        at = model if held is None else copy.deepcopy(model)
        if held is not None:
            with torch.no_grad():
                for p, h in zip(at.parameters(), held):
                    p.copy_(h)
        at.zero_grad()
        loss = loss_of(at, x, y)
        loss.backward()
        losses.append(loss.item())
        grads = [p.grad.clone() for p in at.parameters()]
        if k >= warmup:  # overlapped from here on: the next gradient is taken before this update lands
            held = [p.detach().clone() for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()
        if sched is not None:
            sched.step()
    return model, losses


def train(model, optimizer, data, scheduler=None) -> list[float]:
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("remote_cls", "torch_cls", "hp"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_overlap_equals_torch_on_one_step_stale_gradients(server, remote_cls, torch_cls, hp):
    data = batches(STEPS)
    expected, expected_losses = stale_reference(torch_cls, hp, data)
    model = make_model()
    opt = remote_cls(model.parameters(), url=server.url, overlap=True, **hp)
    losses = train(model, opt, data)
    opt.synchronize()
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    for a, b in zip(expected.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert opt.client.session(opt.session_id)["step"] == STEPS  # each step applied once
    # and it is not the exact run: the gradients really were stale
    exact = make_model()
    train(exact, torch_cls(exact.parameters(), **hp), data)
    assert not torch.allclose(next(exact.parameters()), next(model.parameters()), atol=1e-4)
    opt.close(delete=True)


def test_warmup_steps_are_exact_then_overlap_with_a_scheduler(server):
    hp = {"lr": 0.02, "weight_decay": 0.05}
    data = batches(STEPS)

    def cosine(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)

    expected, expected_losses = stale_reference(torch.optim.AdamW, hp, data, warmup=5, scheduler=cosine)
    model = make_model()
    opt = RemoteAdamW(model.parameters(), url=server.url, overlap=True, overlap_warmup=5, **hp)
    losses = train(model, opt, data, cosine(opt))
    opt.synchronize()
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    for a, b in zip(expected.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the first 5 steps alone are the exact run's
    exact_model = make_model()
    exact = torch.optim.AdamW(exact_model.parameters(), **hp)
    assert train(exact_model, exact, data[:6], cosine(exact))[:6] == pytest.approx(losses[:6], rel=1e-5)
    opt.close(delete=True)


def test_step_returns_before_the_answer_and_the_parameters_change_only_at_the_next_step(server):
    model = make_model()
    opt = RemoteAdamW(model.parameters(), url=server.url, overlap=True, lr=0.1)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    opt.step()
    assert opt._inflight.pending
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # the loop computes at the old parameters meanwhile
    opt.synchronize()
    assert not opt._inflight.pending
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.client.session(opt.session_id)["step"] == 1
    opt.close(delete=True)


def test_zero_grad_and_in_place_accumulation_cannot_change_the_step_in_flight(server):
    """The step in flight sends its own copy of the gradients: zeroing them in place (set_to_none=False) or
    accumulating into them while it travels changes nothing of it."""
    hp = {"lr": 0.05}
    data = batches(4)
    expected, _ = stale_reference(torch.optim.AdamW, hp, data)
    model = make_model()
    opt = RemoteAdamW(model.parameters(), url=server.url, overlap=True, **hp)
    for x, y in data:
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # in place, while the step travels
        loss_of(model, x, y).backward()  # accumulates in place into the zeroed tensors
        opt.zero_grad(set_to_none=False)
    opt.synchronize()
    for a, b in zip(expected.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    opt.close(delete=True)


def test_state_dict_waits_for_the_step_in_flight(server):
    model = make_model()
    opt = RemoteAdamW(model.parameters(), url=server.url, overlap=True, lr=0.05)
    for x, y in batches(3):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    assert opt._inflight.pending
    state = opt.state_dict()
    assert not opt._inflight.pending
    assert {int(e["step"]) for e in state["state"].values()} == {3}  # the third step is in it
    # the model holds the parameters of that state: a copy resumed from it continues identically
    twin_model = copy.deepcopy(model)
    twin = RemoteAdamW(twin_model.parameters(), url=server.url, lr=0.05)
    twin.load_state_dict(state)
    x, y = batches(1, seed=5)[0]
    for m, o in ((model, opt), (twin_model, twin)):
        o.zero_grad()
        loss_of(m, x, y).backward()
        o.step()
    opt.synchronize()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(a, b)
    opt.close(delete=True)
    twin.close(delete=True)


def test_an_error_in_flight_is_raised_by_the_next_call_and_nothing_is_applied_twice(server):
    model = make_model()
    opt = RemoteAdamW(model.parameters(), url=server.url, overlap=True, lr=0.05)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.step()
    opt.synchronize()
    before = [p.detach().clone() for p in model.parameters()]
    with Client(server.url) as other:
        other.delete_session(opt.session_id)  # the next step in flight fails: the session is gone
    opt.step()  # returns: the failure is in flight
    with pytest.raises(NotFound):
        opt.zero_grad()  # zero_grad does not wait ...
        opt.step()  # ... the next step does, and raises the error of the one in flight
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # nothing written in
    loss_of(model, x, y).backward()
    opt.step()  # raised once: this one is sent (and fails in flight again)
    assert opt._inflight.pending
    with pytest.raises(NotFound):
        opt.close()  # close waits too, releases, then raises it


def test_an_error_in_flight_surfaces_in_state_dict(server):
    model = make_model()
    opt = RemoteAdamW(model.parameters(), url=server.url, overlap=True, lr=0.05)
    loss_of(model, *batches(1)[0]).backward()
    with Client(server.url) as other:
        other.delete_session(opt.session_id)
    opt.step()
    with pytest.raises(NotFound):
        opt.state_dict()
    assert not opt._inflight.pending


def test_exactly_once_across_retried_steps_in_flight(server_process):
    """A relay that drops or cuts answers of steps in flight: each retried step (same Idempotency-Key) is applied
    once, the overlap run equals the stale reference, and the session's step count is the steps taken."""
    from faultproxy import FaultProxy

    hp = {"lr": 0.02}
    data = batches(20)
    expected, _ = stale_reference(torch.optim.AdamW, hp, data)
    with FaultProxy(
        server_process.url, seed=3, drop_response=0.2, cut_response=0.2, match=lambda line: b"/step" in line
    ) as proxy:
        model = make_model()
        opt = RemoteAdamW(model.parameters(), url=proxy.url, overlap=True, keep=True, **hp)
        train(model, opt, data)
        opt.synchronize()
        faults = proxy.faults()
    assert faults["drop_response"] + faults["cut_response"] >= 3, faults
    for a, b in zip(expected.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with Client(server_process.url) as client:
        info = client.session(opt.session_id)
        assert info["step"] == len(data)
        assert info["counters"]["steps_applied"] == len(data)
        assert info["counters"]["replays"] == faults["drop_response"] + faults["cut_response"]
        client.delete_session(opt.session_id)


def test_add_param_group_and_deepcopy_wait_for_the_step_in_flight(server):
    model = make_model()
    extra = torch.nn.Parameter(torch.ones(4))
    opt = RemoteAdamW(model.parameters(), url=server.url, overlap=True, lr=0.05)
    loss_of(model, *batches(1)[0]).backward()
    opt.step()
    copied = copy.deepcopy(opt)  # settles first: the copy holds the state after step 1
    assert not opt._inflight.pending
    assert copied.client.session(copied.session_id)["step"] == 1
    opt.step()
    opt.add_param_group({"params": [extra]})
    assert opt.client.session(opt.session_id)["step"] == 2
    assert len(opt.client.session(opt.session_id)["tensors"]) == 5
    copied.close(delete=True)
    opt.close(delete=True)


def test_overlap_warmup_must_not_be_negative(server):
    with pytest.raises(ValueError, match="overlap_warmup"):
        RemoteAdamW(make_model().parameters(), url=server.url, overlap=True, overlap_warmup=-1)


# --- numpy ---------------------------------------------------------------------------------------------------------


def quadratic_grads(params: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    target = np.linspace(-1, 1, params["w"].size, dtype=np.float32).reshape(params["w"].shape) * (1 + 0.1 * k)
    return {"w": (params["w"] - target).astype(np.float32), "b": params["b"] * 2 + 0.1}


def numpy_stale_reference(steps: int, warmup: int = 0) -> dict[str, torch.Tensor]:
    w = torch.nn.Parameter(torch.zeros(3, 4))
    b = torch.nn.Parameter(torch.ones(5))
    opt = torch.optim.AdamW([w, b], lr=0.05)
    held = None
    for k in range(steps):
        at = {"w": w.detach().numpy().copy(), "b": b.detach().numpy().copy()} if held is None else held
        grads = quadratic_grads(at, k)
        held = None if k < warmup else {"w": w.detach().numpy().copy(), "b": b.detach().numpy().copy()}
        w.grad, b.grad = torch.from_numpy(grads["w"]), torch.from_numpy(grads["b"])
        opt.step()
    return {"w": w.detach(), "b": b.detach()}


@pytest.mark.parametrize("warmup", [0, 3])
def test_numpy_overlap_equals_torch_on_stale_gradients(server, warmup):
    params = {"w": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)}
    opt = RemoteOptimizer(params, url=server.url, optimizer="adamw", lr=0.05, overlap=True, overlap_warmup=warmup)
    for k in range(12):
        grads = quadratic_grads(params, k)
        opt.step(grads)
        assert opt._inflight.pending == (k >= warmup)
        if k >= warmup:  # in flight: params unchanged until the next call, however long the caller computes
            returned = {n: a.copy() for n, a in params.items()}
            time.sleep(0.05)
            assert all(np.array_equal(params[n], returned[n]) for n in params)
        grads["w"][...] = 1e6  # the caller reuses its arrays: the step in flight sent a copy
    opt.synchronize()
    expected = numpy_stale_reference(12, warmup)
    for n in params:
        np.testing.assert_allclose(params[n], expected[n].numpy(), rtol=1e-5, atol=1e-6)
    assert opt.client.session(opt.session_id)["step"] == 12
    opt.close()


def test_numpy_step_async_future(server):
    params = {"w": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)}
    exact = {n: a.copy() for n, a in params.items()}
    opt = RemoteOptimizer(params, url=server.url, lr=0.05)
    ref = RemoteOptimizer(exact, url=server.url, lr=0.05)
    for k in range(5):
        future = opt.step_async(quadratic_grads(params, k))
        assert future.result(timeout=30) is params
        ref.step(quadratic_grads(exact, k))
        for n in params:
            np.testing.assert_array_equal(params[n], exact[n])
    future = opt.step_async(quadratic_grads(params, 5))
    with Client(server.url) as other:
        assert other.session(opt.session_id)["step"] in (5, 6)
    opt.pull()  # waits for the step in flight first
    assert opt.step_count == 6 and future.done()
    opt.close()
    ref.close()


def test_numpy_error_in_flight_is_raised_once(server):
    params = {"w": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)}
    opt = RemoteOptimizer(params, url=server.url, lr=0.05, overlap=True)
    with Client(server.url) as other:
        other.delete_session(opt.session_id)
    opt.step(quadratic_grads(params, 0))
    with pytest.raises(NotFound):
        opt.step(quadratic_grads(params, 1))
    opt.synchronize()  # raised once: nothing left in flight
    future = opt.step_async(quadratic_grads(params, 2))
    with pytest.raises(NotFound):
        future.result(timeout=30)
    with pytest.raises(NotFound):
        opt.close()


def test_client_step_async_and_async_client_step_async(server):
    with Client(server.url) as client:
        sid = client.create_session({"w": np.zeros(4, np.float32)}, "sgd", hyperparams={"lr": 1.0})["id"]
        futures = [client.step_async(sid, {"w": np.ones(4, np.float32)}, if_match=i) for i in range(3)]
        assert [f.result(timeout=30).step for f in futures] == [1, 2, 3]  # in order, each once
        np.testing.assert_array_equal(client.params(sid)[1]["w"], -3 * np.ones(4, np.float32))

        async def run() -> list[int]:
            async with AsyncClient(server.url) as aclient:
                task = aclient.step_async(sid, {"w": np.ones(4, np.float32)}, if_match=3)
                first = (await task).step
                second = await aclient.step_async(sid, {"w": np.ones(4, np.float32)}, if_match=first)
                return [first, second.step]

        assert asyncio.run(run()) == [4, 5]
        client.delete_session(sid)


def test_overlap_keyword_is_checked_like_the_others(server):
    with pytest.raises(TypeError, match="overlapp"):
        RemoteAdamW(make_model().parameters(), url=server.url, overlapp=True)
    assert httpx.get(f"{server.url}/healthz").status_code == 200


# --- the lean per-step path ----------------------------------------------------------------------------------------


def test_answer_goes_into_a_parameter_whose_data_was_replaced(server):
    """The answer is copied into cached flat views of the parameters: replacing ``p.data`` (as some code does to
    move or cast weights) is noticed, and the update lands in the new tensor, as torch.optim's would."""
    local_model, remote_model = make_model(), make_model()
    local = torch.optim.AdamW(local_model.parameters(), lr=0.05)
    remote = RemoteAdamW(remote_model.parameters(), url=server.url, lr=0.05)
    data = batches(4)
    for k, (x, y) in enumerate(data):
        if k == 2:
            for m in (local_model, remote_model):
                m[0].weight.data = m[0].weight.data.clone()  # new storage under the same parameter
        for m, o in ((local_model, local), (remote_model, remote)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
    for a, b in zip(local_model.parameters(), remote_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    remote.close(delete=True)


def test_non_contiguous_and_complex_parameters_take_the_general_path(server):
    weight = torch.nn.Parameter(torch.randn(4, 6).t())  # a transposed view: not contiguous
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    twins = [torch.nn.Parameter(weight.detach().clone()), torch.nn.Parameter(z.detach().clone())]
    remote = RemoteAdamW([weight, z], url=server.url, lr=0.1)
    local = torch.optim.AdamW(twins, lr=0.1)
    for _ in range(3):
        for params, opt in (([weight, z], remote), (twins, local)):
            opt.zero_grad()
            (params[0].sum() * 2 + (params[1].abs() ** 2).sum()).backward()
            opt.step()
    torch.testing.assert_close(weight, twins[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, twins[1], rtol=1e-5, atol=1e-6)
    remote.close(delete=True)
