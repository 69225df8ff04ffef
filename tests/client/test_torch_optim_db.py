"""The torch drop-ins against torch's own optimizer test database (``torch.testing._internal.common_optimizers``).

For every Remote twin (Adam, AdamW, SGD, RMSprop, RAdam, NAdam, Adafactor), every configuration
``optim_inputs_func(device="cpu")`` gives, each also with the
implementation flags torch's tests add (``fused``, ``differentiable``: see
``_get_optim_inputs_including_global_cliquey_kwargs``) and with ``foreach=True``, trains a small model 20 steps
with torch and with the Remote twin, with plain, grouped and named parameters: the parameters must agree (rtol
1e-5, atol 1e-6), or both must refuse with the same exception type. Every ``optim_error_inputs_func(device="cpu")``
entry must be refused (or warned about) by the Remote twin as by torch: same type, same message. Every
``scheduler_inputs`` entry runs with every base configuration. One server for the module; every session is deleted
after its run.

The counts are printed at the end (``pytest -s``) and written to ``optim_db_counts.json`` in pytest's base temp
folder.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import (  # needs expecttest (the test extra)
    OptimizerErrorEnum,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

from optserve.client import Client
from optserve.client.torch import (
    RemoteAdafactor,
    RemoteAdam,
    RemoteAdamW,
    RemoteNAdam,
    RemoteRAdam,
    RemoteRMSprop,
    RemoteSGD,
)

STEPS = 20
TOL = {"rtol": 1e-5, "atol": 1e-6}
TWINS: dict[type, type] = {
    torch.optim.Adam: RemoteAdam,
    torch.optim.AdamW: RemoteAdamW,
    torch.optim.SGD: RemoteSGD,
    torch.optim.RMSprop: RemoteRMSprop,
    torch.optim.RAdam: RemoteRAdam,
    torch.optim.NAdam: RemoteNAdam,
    torch.optim.Adafactor: RemoteAdafactor,
}
INFOS = [info for info in optim_db if info.optim_cls in TWINS]
MODES = ("plain", "grouped", "named")
COUNTS: Counter[str] = Counter()


def _configs() -> list[Any]:
    out = []
    for info in INFOS:
        inputs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
        # torch's helper adds foreach only where foreach kernels exist (not CPU), but torch takes foreach=True on
        # CPU too, and so must the twins
        inputs += [
            OptimizerInput(None, {**c.kwargs, "foreach": True}, f"{c.desc} & foreach")
            for c in info.optim_inputs_func(device="cpu")
        ]
        out += [pytest.param(info, c, id=f"{info.name}-{i}-{c.desc}") for i, c in enumerate(inputs)]
    return out


def _errors() -> list[Any]:
    out = []
    for info in INFOS:
        inputs = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
        out += [pytest.param(info, e, id=f"{info.name}-{e.optimizer_error_input.desc}") for e in inputs]
    return out


def _schedulers() -> list[Any]:
    out = []
    for info in INFOS:
        for config in info.optim_inputs_func(device="cpu"):
            for s, constructors in enumerate(info.scheduler_inputs):
                out.append(pytest.param(info, config, constructors, id=f"{info.name}-{config.desc}-sched{s}"))
    return out


@pytest.fixture(scope="module", autouse=True)
def counts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Counter[str]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits (and slows torch 10x on a busy machine)
    try:
        yield COUNTS
    finally:
        torch.set_num_threads(threads)
    cuda_only = 0
    for info in INFOS:  # what torch's database has only for CUDA devices (not run on this CPU machine)
        cuda_only += len(info.optim_inputs_func(device="cuda")) - len(info.optim_inputs_func(device="cpu"))
    summary = {**dict(sorted(COUNTS.items())), "configs_cuda_only_not_run": cuda_only}
    (tmp_path_factory.getbasetemp() / "optim_db_counts.json").write_text(json.dumps(summary, indent=2))
    print("\ntorch optim_db against the Remote twins:", json.dumps(summary, indent=2))


@pytest.fixture(scope="module")
def client(server) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


DATA = [
    (x, (x[:, :3]).argmax(dim=1))
    for x in (torch.randn(8, 5, generator=torch.Generator().manual_seed(i)) for i in range(STEPS))
]


def params_of(model: torch.nn.Module, mode: str, kwargs: dict[str, Any]) -> Any:
    if mode == "plain":
        return model.parameters()
    if mode == "named":
        return model.named_parameters()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    lr = float(kwargs.get("lr", 1e-3))
    return [{"params": weights}, {"params": biases, "lr": lr * 0.5, "weight_decay": 0.0}]


def train(
    make: Callable[[Any], torch.optim.Optimizer], mode: str, kwargs: dict[str, Any], schedulers: list[Any] = ()
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model()
    opt = make(params_of(model, mode, kwargs))
    scheds = [build(opt) for build in schedulers]
    for x, y in DATA:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        for s in scheds:
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s.step(loss.item())
            else:
                s.step()
    return model, opt


def compare(info: Any, kwargs: dict[str, Any], client: Client, mode: str, schedulers: list[Any] = ()) -> str:
    """Train torch's optimizer and the Remote twin alike: "matched" or "refused" (both raised the same type).

    Each gets its own copy of ``kwargs``: a scheduler changes a Tensor lr in place."""
    remote_cls = TWINS[info.optim_cls]
    torch_kwargs, kwargs = copy.deepcopy(kwargs), copy.deepcopy(kwargs)
    try:
        local, _ = train(lambda p: info.optim_cls(p, **torch_kwargs), mode, kwargs, schedulers)
    except Exception as e:  # noqa: BLE001 - torch refuses: the twin must refuse alike
        with pytest.raises(type(e)):
            _, opt = train(lambda p: remote_cls(p, client=client, **kwargs), mode, kwargs, schedulers)
            opt.close(delete=True)  # type: ignore[attr-defined]
        return "refused"
    remote, opt = train(lambda p: remote_cls(p, client=client, **kwargs), mode, kwargs, schedulers)
    opt.close(delete=True)  # type: ignore[attr-defined]
    for (name, a), b in zip(local.named_parameters(), remote.parameters()):
        torch.testing.assert_close(b, a, **TOL, msg=f"{name} ({mode})")
    return "matched"


@pytest.mark.parametrize(("info", "config"), _configs())
def test_every_config_trains_like_torch_or_is_refused_alike(client, info, config):
    for mode in MODES:
        COUNTS["configs_run"] += 1
        outcome = compare(info, dict(config.kwargs), client, mode)
        COUNTS[f"configs_{outcome}"] += 1


@pytest.mark.parametrize(("info", "error_input"), _errors())
def test_every_error_input_is_refused_as_torch_refuses_it(client, info, error_input):
    optim_input = error_input.optimizer_error_input
    remote_cls = TWINS[info.optim_cls]
    kwargs = optim_input.kwargs

    def params() -> Any:
        return optim_input.params if optim_input.params is not None else [torch.nn.Parameter(torch.randn(2, 2))]

    def steps(cls: type, **extra: Any) -> None:
        opt = cls(params(), **kwargs, **extra)
        if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.ones_like(p)
            opt.step()
        if hasattr(opt, "close"):
            opt.close(delete=True)

    COUNTS["error_inputs_run"] += 1
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            steps(info.optim_cls)
        # the twin warns the same, then refuses: it cannot step one parameter twice per step as torch does
        with pytest.warns(error_input.error_type, match=error_input.error_regex), pytest.raises(ValueError):
            steps(remote_cls, client=client)
        COUNTS["error_inputs_warned_as_torch_then_refused"] += 1
        return
    with pytest.raises(error_input.error_type, match=error_input.error_regex):
        steps(info.optim_cls)
    with warnings.catch_warnings(), pytest.raises(error_input.error_type, match=error_input.error_regex):
        warnings.simplefilter("ignore")
        steps(remote_cls, client=client)
    COUNTS["error_inputs_refused_as_torch"] += 1


@pytest.mark.parametrize(("info", "config", "schedulers"), _schedulers())
def test_every_scheduler_input_schedules_like_torch(client, info, config, schedulers):
    COUNTS["scheduler_runs"] += 1
    COUNTS[f"scheduler_runs_{compare(info, dict(config.kwargs), client, 'plain', schedulers)}"] += 1
