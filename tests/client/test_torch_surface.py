"""The torch drop-ins where a training script written for ``torch.optim`` leans on more than ``step``: parameter
groups added later, state dicts both ways, typos, complex parameters, copies, torch's exceptions, schedulers that
switch momentum on, hooks and ``accelerate``'s wrap. Real server, torch.optim as the oracle."""

from __future__ import annotations

import contextlib
import copy
import pickle
import re
from collections.abc import Iterator

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from optserve.client import Client
from optserve.client.errors import InvalidInput, NotFound
from optserve.client.torch import (
    RemoteAdafactor,
    RemoteAdam,
    RemoteAdamW,
    RemoteNAdam,
    RemoteRAdam,
    RemoteRMSprop,
    RemoteSGD,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(16, 4, generator=g)
    return x, (x[:, :2] - x[:, 2:]).argmax(dim=1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
    optimizer.zero_grad()
    x, y = batch(i)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, **TOL, msg=name)


@pytest.fixture
def url(server) -> Iterator[str]:
    """The server's URL; every session created meanwhile is deleted afterwards."""
    with Client(server.url) as client:
        before = {s["id"] for s in client.list_sessions()}
        yield server.url
        for s in client.list_sessions():
            if s["id"] not in before:
                with contextlib.suppress(NotFound):  # its optimizer's lease deleted it meanwhile (collected)
                    client.delete_session(s["id"])


# --- add_param_group -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
def test_add_param_group_steps_the_new_group_like_torch(url, named):
    """Progressive unfreezing: the head trains first, then the body joins with its own lr."""
    local, remote = make_model(), make_model()
    for model in (local, remote):
        model[0].requires_grad_(False)
    pick = (lambda m, i: list(m[i].named_parameters(prefix=str(i)))) if named else (lambda m, i: m[i].parameters())
    local_opt = torch.optim.AdamW(pick(local, 2), lr=0.01)
    remote_opt = RemoteAdamW(pick(remote, 2), lr=0.01, url=url)
    for i in range(3):
        train_step(local, local_opt, i)
        train_step(remote, remote_opt, i)
    for model, opt in ((local, local_opt), (remote, remote_opt)):
        model[0].requires_grad_(True)
        opt.add_param_group({"params": pick(model, 0), "lr": 0.005, "weight_decay": 0.0})
    for i in range(3, 8):
        train_step(local, local_opt, i)
        train_step(remote, remote_opt, i)
    assert_same_params(local, remote)
    names = list(remote_opt.client.session(remote_opt.session_id)["tensors"])
    assert names == (["2.weight", "2.bias", "0.weight", "0.bias"] if named else ["0", "1", "2", "3"])
    local_sd, remote_sd = local_opt.state_dict(), remote_opt.state_dict()
    assert remote_sd["state"].keys() == local_sd["state"].keys() == {0, 1, 2, 3}
    for index, entry in local_sd["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(remote_sd["state"][index][key], value, **TOL)
    assert remote_sd["param_groups"][1]["lr"] == 0.005


def test_add_param_group_refuses_what_torch_refuses_and_leaves_the_optimizer_as_it_was(url):
    model = make_model()
    opt = RemoteSGD(model[2].parameters(), lr=0.1, url=url)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [model[2].weight]})
    with pytest.raises(TypeError, match="param_group must be a dict"):
        opt.add_param_group([model[0].weight])  # type: ignore[arg-type]
    assert len(opt.param_groups) == 1
    assert len(opt.client.session(opt.session_id)["tensors"]) == 2


# --- state dicts both ways -----------------------------------------------------------------------------------------


def test_a_decoupled_adam_state_dict_loads_into_torch_adam_as_adamw(url):
    model = make_model()
    remote = RemoteAdam(model.parameters(), lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, url=url)
    for i in range(3):
        train_step(model, remote, i)
    twin_model = copy.deepcopy(model)
    twin = torch.optim.Adam(twin_model.parameters())  # L2 Adam, until the state dict says otherwise
    twin.load_state_dict(remote.state_dict())
    assert twin.param_groups[0]["decoupled_weight_decay"] is True
    for i in range(3, 6):
        train_step(model, remote, i)
        train_step(twin_model, twin, i)
    assert_same_params(model, twin_model)


def test_an_adamw_state_dict_makes_remote_adam_step_as_adamw_and_a_hand_change_is_refused(url):
    local, remote = make_model(), make_model()
    local_opt = torch.optim.AdamW(local.parameters(), lr=0.01, weight_decay=0.2)
    for i in range(3):
        train_step(local, local_opt, i)
    remote.load_state_dict(local.state_dict())
    remote_opt = RemoteAdam(remote.parameters(), url=url)  # L2 Adam, until the state dict says otherwise
    remote_opt.load_state_dict(local_opt.state_dict())
    assert remote_opt.client.session(remote_opt.session_id)["optimizer"] == "adamw"
    for i in range(3, 6):
        train_step(local, local_opt, i)
        train_step(remote, remote_opt, i)
    assert_same_params(local, remote)
    remote_opt.param_groups[0]["decoupled_weight_decay"] = False  # torch would switch to L2 here: refused, loudly
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        train_step(remote, remote_opt, 6)


@pytest.mark.parametrize(
    ("remote_cls", "torch_cls", "hp"),
    [
        (RemoteAdam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "foreach": False}),
        (RemoteAdam, torch.optim.Adam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
        (RemoteAdamW, torch.optim.AdamW, {"lr": 0.01, "fused": True}),
        (RemoteSGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (RemoteRMSprop, torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}),
        (RemoteRAdam, torch.optim.RAdam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
        (RemoteNAdam, torch.optim.NAdam, {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
        (RemoteAdafactor, torch.optim.Adafactor, {"lr": 0.01, "eps": (None, 1e-2), "d": 2.0}),
    ],
    ids=["adam-amsgrad", "adam-decoupled", "adamw-fused", "sgd", "rmsprop", "radam", "nadam", "adafactor"],
)
def test_every_param_group_key_round_trips_both_ways(url, remote_cls, torch_cls, hp):
    local, remote = make_model(), make_model()
    local_opt = torch_cls(local.parameters(), **hp)
    remote_opt = remote_cls(remote.parameters(), url=url, **hp)
    for i in range(3):
        train_step(local, local_opt, i)
        train_step(remote, remote_opt, i)
    torch_group = local_opt.state_dict()["param_groups"][0]
    remote_group = remote_opt.state_dict()["param_groups"][0]
    assert {k: v for k, v in remote_group.items() if k != "eps_root"} == torch_group

    # torch -> remote: a fresh remote optimizer built with other values takes every one of torch's
    other = {**hp, "lr": 0.5, "maximize": True}
    fresh_model = copy.deepcopy(local)
    fresh = remote_cls(fresh_model.parameters(), url=url, **other)
    fresh.load_state_dict(local_opt.state_dict())
    assert {k: v for k, v in fresh.param_groups[0].items() if k != "eps_root"} == local_opt.param_groups[0] | {
        "params": fresh.param_groups[0]["params"]
    }
    # remote -> torch: the twin built with other values takes every one of the remote's
    twin_model = copy.deepcopy(remote)
    twin = torch_cls(twin_model.parameters(), **other)
    twin.load_state_dict(remote_opt.state_dict())
    for i in range(3, 6):
        for model, opt in ((local, local_opt), (fresh_model, fresh), (twin_model, twin)):
            train_step(model, opt, i)
    assert_same_params(local, fresh_model)
    assert_same_params(local, twin_model)


def test_sgd_state_dict_holds_momentum_buffers_only_where_torch_does(url):
    local, remote = make_model(), make_model()
    groups = lambda m: [{"params": m[0].parameters(), "momentum": 0.9}, {"params": m[2].parameters()}]  # noqa: E731
    local_opt = torch.optim.SGD(groups(local), lr=0.1)
    remote_opt = RemoteSGD(groups(remote), lr=0.1, url=url)
    train_step(local, local_opt, 0)
    train_step(remote, remote_opt, 0)
    assert remote_opt.state_dict()["state"].keys() == local_opt.state_dict()["state"].keys() == {0, 1}


# --- unknown arguments and torch's exceptions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote_cls", "torch_cls", "kwargs"),
    [
        (RemoteAdamW, torch.optim.AdamW, {"weight_decai": 0.1}),
        (RemoteSGD, torch.optim.SGD, {"momentun": 0.9}),
        (RemoteRMSprop, torch.optim.RMSprop, {"centred": True}),
        (RemoteSGD, torch.optim.SGD, {"capturable": True}),
        (RemoteAdamW, torch.optim.AdamW, {"decoupled_weight_decay": False}),
        (RemoteRMSprop, torch.optim.RMSprop, {"fused": True}),
        (RemoteAdafactor, torch.optim.Adafactor, {"betas": (0.9, 0.999)}),
        (RemoteNAdam, torch.optim.NAdam, {"eps_root": 1e-8}),
        (RemoteRAdam, torch.optim.RAdam, {"fused": True}),
    ],
)
def test_unknown_keyword_arguments_are_a_type_error_as_in_torch(url, remote_cls, torch_cls, kwargs):
    with pytest.raises(TypeError) as expected:
        torch_cls(make_model().parameters(), **kwargs)
    with pytest.raises(TypeError, match=re.escape(str(expected.value).replace(torch_cls.__name__, ""))):
        remote_cls(make_model().parameters(), url=url, **kwargs)


def test_adafactor_refuses_complex_parameters_at_the_step_as_torch_does(url):
    def steps(cls, **extra):
        w = torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)
        opt = cls([w], **extra)  # accepted, as by torch
        (w.abs() ** 2).sum().backward()
        opt.step()

    with pytest.raises(RuntimeError) as expected:
        steps(torch.optim.Adafactor)
    with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
        steps(RemoteAdafactor, url=url)


@pytest.mark.parametrize(
    ("remote_cls", "torch_cls", "kwargs"),
    [
        (RemoteAdam, torch.optim.Adam, {"lr": torch.tensor([0.1, 0.2])}),
        (RemoteAdam, torch.optim.Adam, {"betas": (0.9, torch.tensor(0.99))}),
        (RemoteAdam, torch.optim.Adam, {"lr": -0.1}),
        (RemoteAdamW, torch.optim.AdamW, {"betas": (1.0, 0.999)}),
        (RemoteAdam, torch.optim.Adam, {"lr": torch.tensor(0.01), "foreach": True}),
        (RemoteAdam, torch.optim.Adam, {"fused": True, "foreach": True}),
        (RemoteSGD, torch.optim.SGD, {"nesterov": True}),
        (RemoteSGD, torch.optim.SGD, {"weight_decay": -1.0}),
        (RemoteRMSprop, torch.optim.RMSprop, {"alpha": -0.5}),
        (RemoteRAdam, torch.optim.RAdam, {"betas": (0.9, 1.0)}),
        (RemoteNAdam, torch.optim.NAdam, {"momentum_decay": -1e-3}),
        (RemoteAdafactor, torch.optim.Adafactor, {"beta2_decay": 0.5}),
        (RemoteAdafactor, torch.optim.Adafactor, {"d": 0.5}),
        (RemoteAdafactor, torch.optim.Adafactor, {"eps": (-1.0, 1e-3)}),
    ],
)
def test_invalid_arguments_raise_torchs_exception_before_the_server_is_asked(remote_cls, torch_cls, kwargs):
    with pytest.raises(Exception) as expected:
        torch_cls(make_model().parameters(), **kwargs)
    # no server at this address: the refusal must come before any request
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        remote_cls(make_model().parameters(), url="http://127.0.0.1:9", **kwargs)


def test_a_value_the_server_refuses_is_a_value_error(url):
    model = make_model()
    opt = RemoteSGD(model.parameters(), lr=0.1, url=url)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="finite") as e:
        train_step(model, opt, 0)
    assert isinstance(e.value, InvalidInput)


def test_differentiable_is_refused_and_the_implementation_flags_are_accepted(url):
    with pytest.raises(RuntimeError, match="differentiable"):
        RemoteAdam(make_model().parameters(), differentiable=True, url=url)
    local, remote = make_model(), make_model()
    local_opt = torch.optim.RMSprop(local.parameters(), lr=0.01, foreach=True)
    remote_opt = RemoteRMSprop(remote.parameters(), lr=0.01, foreach=True, url=url)
    for i in range(3):
        train_step(local, local_opt, i)
        train_step(remote, remote_opt, i)
    assert_same_params(local, remote)


# --- complex parameters --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote_cls", "torch_cls", "hp"),
    [
        (RemoteAdam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
        (RemoteAdamW, torch.optim.AdamW, {"lr": 0.01}),
        (RemoteSGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}),
        (RemoteRMSprop, torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5, "maximize": True}),
        (RemoteRAdam, torch.optim.RAdam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
        (RemoteNAdam, torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    ],
    ids=["adam", "adamw", "sgd", "rmsprop", "radam", "nadam"],
)
def test_complex_parameters_train_like_torch(url, remote_cls, torch_cls, hp):
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(3, 4, dtype=torch.complex64, generator=g)
    b0 = torch.randn(4, generator=g)
    target = torch.randn(5, 4, dtype=torch.complex64, generator=g)
    x = torch.randn(5, 3, dtype=torch.complex64, generator=g)

    def run(opt_cls, **extra):
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        opt = opt_cls([w, b], **hp, **extra)
        for _ in range(10):
            opt.zero_grad()
            ((x @ w + b - target).abs() ** 2).mean().backward()
            opt.step()
        return w, b, opt

    w_torch, b_torch, torch_opt = run(torch_cls)
    w_remote, b_remote, remote_opt = run(remote_cls, url=url)
    assert w_remote.dtype == torch.complex64 and w_remote.imag.abs().sum() > 0
    torch.testing.assert_close(w_remote, w_torch, **TOL)
    torch.testing.assert_close(b_remote, b_torch, **TOL)
    # the state dict holds complex state, as torch's does, and loads into torch
    remote_state = remote_opt.state_dict()["state"]
    for key, value in torch_opt.state_dict()["state"][0].items():
        assert remote_state[0][key].dtype == value.dtype
        torch.testing.assert_close(remote_state[0][key], value, **TOL)


# --- copies --------------------------------------------------------------------------------------------------------


def test_deepcopy_is_an_independent_optimizer_on_a_new_session(url):
    model = make_model()
    opt = RemoteAdamW(model.parameters(), lr=0.01, url=url)
    for i in range(3):
        train_step(model, opt, i)
    # the usual way: model and optimizer copied together, so the copy steps the copied model
    pair = copy.deepcopy({"model": model, "opt": opt})
    model2, opt2 = pair["model"], pair["opt"]
    assert opt2.session_id != opt.session_id
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    reference = copy.deepcopy(model)
    twin = torch.optim.AdamW(reference.parameters(), lr=0.01)
    twin.load_state_dict(opt.state_dict())
    for i in range(3, 6):
        train_step(model2, opt2, i)
        train_step(reference, twin, i)
    assert_same_params(reference, model2)
    # the original did not move
    assert opt.client.session(opt.session_id)["step"] == 3
    train_step(model, opt, 3)
    assert opt.client.session(opt.session_id)["step"] == 4
    opt2.close(delete=True)


def test_pickle_is_refused_with_a_clear_error(url):
    opt = RemoteSGD(make_model().parameters(), lr=0.1, url=url)
    with pytest.raises(TypeError, match=r"cannot pickle .*state_dict\(\)"):
        pickle.dumps(opt)


# --- schedulers, hooks, closures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remote_cls", "torch_cls"),
    [(RemoteSGD, torch.optim.SGD), (RemoteRMSprop, torch.optim.RMSprop)],
    ids=["sgd", "rmsprop"],
)
def test_one_cycle_lr_turns_momentum_on_as_in_torch(url, remote_cls, torch_cls):
    local, remote = make_model(), make_model()
    local_opt = torch_cls(local.parameters(), lr=0.01, momentum=0)
    remote_opt = remote_cls(remote.parameters(), lr=0.01, momentum=0, url=url)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10) for o in (local_opt, remote_opt)]
    for i in range(10):
        train_step(local, local_opt, i)
        train_step(remote, remote_opt, i)
        for s in scheds:
            s.step()
    assert_same_params(local, remote)
    assert "momentum_buffer" in remote_opt.client.session(remote_opt.session_id)["state"]


def test_sgd_momentum_switched_on_mid_run_by_hand_matches_torch(url):
    local, remote = make_model(), make_model()
    local_opt = torch.optim.SGD(local.parameters(), lr=0.05, dampening=0.2)
    remote_opt = RemoteSGD(remote.parameters(), lr=0.05, dampening=0.2, url=url)
    for i in range(8):
        if i == 3:
            for opt in (local_opt, remote_opt):
                opt.param_groups[0]["momentum"] = 0.9
        train_step(local, local_opt, i)
        train_step(remote, remote_opt, i)
    assert_same_params(local, remote)


def test_step_and_state_dict_hooks_run_as_in_torch(url):
    model = make_model()
    opt = RemoteAdam(model.parameters(), lr=0.01, url=url)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train_step(model, opt, 0)
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls == ["step_pre", "step_post", "sd_pre", "load_pre", "load_post"]


def test_global_hooks_and_the_profiler_see_the_step_as_in_torch(url):
    """The step skips torch's wrapper only when nothing would see it: global hooks and a profiler do."""
    model = make_model()
    opt = RemoteAdamW(model.parameters(), lr=0.01, url=url)
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append("pre")),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("post")),
    ]
    try:
        train_step(model, opt, 0)
    finally:
        for handle in handles:
            handle.remove()
    train_step(model, opt, 1)
    assert calls == ["pre", "post"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(model, opt, 2)
    assert "Optimizer.step#RemoteAdamW.step" in {e.key for e in prof.key_averages()}


def test_the_step_bumps_the_parameters_versions_as_torch_does(url):
    model = make_model()
    opt = RemoteAdamW(model.parameters(), lr=0.01, url=url)
    before = [p._version for p in model.parameters()]
    train_step(model, opt, 0)
    assert all(p._version > v for p, v in zip(model.parameters(), before))
    assert all(not p.grad.requires_grad and p.requires_grad for p in model.parameters())


def test_hyperparameters_changed_after_unchanged_steps_travel(url):
    """Unchanged groups are recognised at once from their plain values; a change after them travels, and so does
    a tensor lr changed in place (never taken as unchanged because it is the same object)."""
    local, remote = make_model(), make_model()
    local_opt = torch.optim.AdamW(local.parameters(), lr=torch.tensor(0.01), betas=(0.9, 0.99))
    remote_opt = RemoteAdamW(remote.parameters(), lr=torch.tensor(0.01), betas=(0.9, 0.99), url=url)
    for i in range(9):
        if i == 3:
            for opt in (local_opt, remote_opt):
                opt.param_groups[0]["lr"].fill_(0.03)
        if i == 6:
            for opt in (local_opt, remote_opt):
                opt.param_groups[0]["lr"] = 0.002
                opt.param_groups[0]["betas"] = (0.8, 0.99)
        train_step(local, local_opt, i)
        train_step(remote, remote_opt, i)
    assert_same_params(local, remote)
    remote_opt.param_groups[0]["decoupled_weight_decay"] = False
    with pytest.raises(ValueError, match="decoupled_weight_decay cannot change"):
        train_step(remote, remote_opt, 9)


def test_step_with_a_closure_returns_its_loss(url):
    local, remote = make_model(), make_model()
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    remote_opt = RemoteSGD(remote.parameters(), lr=0.1, url=url)
    x, y = batch(0)

    def closure(model, opt):
        def run():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return run

    assert remote_opt.step(closure(remote, remote_opt)) == local_opt.step(closure(local, local_opt))
    assert_same_params(local, remote)


# --- a state dict loaded back as it was handed out -----------------------------------------------------------------


class CountingClient(Client):
    """A client that records the requests it sends (method and path)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.sent: list[tuple[str, str]] = []

    def _send_once(self, call):  # type: ignore[no-untyped-def]
        self.sent.append((call.method, call.path.split("?")[0].rsplit("/", 1)[-1]))
        return super()._send_once(call)


def move_to_device(obj, device):  # what accelerate.utils.send_to_device does to a state dict
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to_device(v, device) for v in obj]
    return obj.to(device) if isinstance(obj, torch.Tensor) else obj


@pytest.mark.parametrize("stepped", [0, 2])
def test_loading_back_the_state_dict_just_taken_costs_no_transfer(url, stepped):
    """accelerate's AcceleratedOptimizer calls state_dict() then load_state_dict() when it wraps the optimizer."""
    model = make_model()
    client = CountingClient(url)
    opt = RemoteAdamW(model.parameters(), lr=0.01, client=client)
    for i in range(stepped):
        train_step(model, opt, i)
    client.sent.clear()
    opt.load_state_dict(move_to_device(opt.state_dict(), "cpu"))
    assert client.sent == (
        [("GET", opt.session_id)] if stepped == 0 else [("GET", opt.session_id), ("GET", "checkpoint")]
    )
    # and training goes on exactly as torch's
    reference = make_model()
    twin = torch.optim.AdamW(reference.parameters(), lr=0.01)
    for i in range(stepped):
        train_step(reference, twin, i)
    for i in range(stepped, stepped + 3):
        train_step(model, opt, i)
        train_step(reference, twin, i)
    assert_same_params(reference, model)
    client.close()


@pytest.mark.parametrize("change", ["tensor-in-place", "tensor-replaced", "model", "stepped", "lr"])
def test_a_state_dict_changed_since_it_was_taken_is_loaded(url, change):
    model = make_model()
    client = CountingClient(url)
    opt = RemoteAdam(model.parameters(), lr=0.01, client=client)
    reference = make_model()
    twin = torch.optim.Adam(reference.parameters(), lr=0.01)
    for i in range(2):
        train_step(model, opt, i)
        train_step(reference, twin, i)
    sd = opt.state_dict()
    if change == "tensor-in-place":
        sd["state"][0]["exp_avg"].mul_(2)
    elif change == "tensor-replaced":
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"] * 2
    elif change == "model":
        with torch.no_grad():
            model[0].weight.mul_(2)
    elif change == "stepped":
        train_step(model, opt, 5)
    else:
        sd["param_groups"][0]["lr"] = 0.02
    client.sent.clear()
    opt.load_state_dict(sd)
    transferred = ("PUT", "checkpoint") in client.sent
    assert transferred == (change != "lr")  # a group value travels with the next step, like any change
    # the torch twin given the same state dict, and the same model, trains alike
    reference.load_state_dict(model.state_dict())
    twin.load_state_dict(sd)
    for i in range(2, 5):
        train_step(model, opt, i)
        train_step(reference, twin, i)
    assert_same_params(reference, model)
    client.close()
