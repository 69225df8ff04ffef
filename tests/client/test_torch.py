"""The PyTorch drop-ins against a real server, with torch.optim as the oracle."""

from __future__ import annotations

import copy

import pytest
import torch

from optserve.client.torch import (
    RemoteAdafactor,
    RemoteAdam,
    RemoteAdamW,
    RemoteNAdam,
    RemoteRAdam,
    RemoteRMSprop,
    RemoteSGD,
)

STEPS = 50
CASES = [
    (RemoteAdam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.05}),
    (RemoteAdam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    (RemoteAdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (RemoteSGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (RemoteRMSprop, torch.optim.RMSprop, {"lr": 0.005, "momentum": 0.5, "centered": True, "weight_decay": 0.01}),
    (RemoteRAdam, torch.optim.RAdam, {"lr": 0.01, "weight_decay": 0.05, "decoupled_weight_decay": True}),
    (RemoteNAdam, torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.05, "momentum_decay": 0.01}),
    (RemoteAdafactor, torch.optim.Adafactor, {"lr": 0.02, "weight_decay": 0.01}),
]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable data: labels are the argmax of a fixed linear map of the inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)
    xs = [torch.randn(32, 6, generator=g) for _ in range(n)]
    return [(x, (x @ w).argmax(dim=1)) for x in xs]


def groups(model: torch.nn.Module, hp: dict, named: bool) -> list[dict]:
    """Two groups: weights with weight decay, biases without (the standard recipe)."""
    items = list(model.named_parameters())
    pick = (lambda n, p: (n, p)) if named else (lambda n, p: p)
    weights = [pick(n, p) for n, p in items if n.endswith("weight")]
    biases = [pick(n, p) for n, p in items if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0, "lr": hp["lr"] * 0.5}]


def train(model, optimizer, data, scheduler=None) -> list[float]:
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("remote_cls", "torch_cls", "hp"), CASES, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("named", [True, False], ids=["named", "plain"])
def test_training_matches_torch_optim_with_groups_and_cosine_schedule(server, remote_cls, torch_cls, hp, named):
    data = batches(STEPS)
    local_model, remote_model = make_model(), make_model()
    local = torch_cls(groups(local_model, hp, named=False), **hp)
    remote = remote_cls(groups(remote_model, hp, named), url=server.url, **hp)
    local_sched = torch.optim.lr_scheduler.CosineAnnealingLR(local, T_max=STEPS)
    remote_sched = torch.optim.lr_scheduler.CosineAnnealingLR(remote, T_max=STEPS)
    local_losses = train(local_model, local, data, local_sched)
    remote_losses = train(remote_model, remote, data, remote_sched)
    assert sum(remote_losses[-5:]) < sum(remote_losses[:5])
    assert remote_losses == pytest.approx(local_losses, rel=1e-5)
    for (name, a), (_, b) in zip(local_model.named_parameters(), remote_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    info = remote.client.session(remote.session_id)
    assert info["step"] == STEPS
    if named:
        assert list(info["tensors"]) == ["0.weight", "2.weight", "0.bias", "2.bias"]
    remote.close(delete=True)


def test_parameters_without_gradient_are_skipped_like_torch(server):
    local_model, remote_model = make_model(), make_model()
    local = torch.optim.Adam(local_model.parameters(), lr=0.01)
    remote = RemoteAdam(remote_model.parameters(), lr=0.01, url=server.url)
    for i, (x, y) in enumerate(batches(6)):
        for model, opt in ((local_model, local), (remote_model, remote)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if i % 2:  # the last layer's bias gets no gradient every other step
                model[2].bias.grad = None
            opt.step()
    for a, b in zip(local_model.parameters(), remote_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    local_state, remote_state = local.state_dict()["state"], remote.state_dict()["state"]
    assert remote_state.keys() == local_state.keys()
    for index in local_state:
        assert remote_state[index].keys() == local_state[index].keys()
        for key, value in local_state[index].items():
            torch.testing.assert_close(remote_state[index][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("remote_cls", "torch_cls", "hp"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_state_dict_round_trips_through_torch_checkpointing(server, tmp_path, remote_cls, torch_cls, hp):
    data = batches(20)
    model = make_model()
    remote = remote_cls(model.parameters(), url=server.url, **hp)
    train(model, remote, data[:10])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": remote.state_dict()}, path)

    # The torch twin loads the remote state dict and continues exactly like the remote one.
    twin_model = make_model(seed=5)
    twin = torch_cls(twin_model.parameters(), **hp)
    saved = torch.load(path)
    twin_model.load_state_dict(saved["model"])
    twin.load_state_dict(saved["optimizer"])
    # A fresh remote optimizer (new session) loads it too.
    fresh_model = make_model(seed=7)
    fresh = remote_cls(fresh_model.parameters(), url=server.url, **hp)
    fresh_model.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])

    train(model, remote, data[10:])
    train(twin_model, twin, data[10:])
    train(fresh_model, fresh, data[10:])
    for a, b, c in zip(model.parameters(), twin_model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_keeps_float32_master_weights(server, dtype):
    data = batches(30)
    model = make_model(dtype=dtype)
    master = copy.deepcopy(model).float()
    remote = RemoteAdamW(model.parameters(), lr=0.01, url=server.url)
    reference = torch.optim.AdamW(master.parameters(), lr=0.01)
    for x, y in data:
        remote.zero_grad()
        torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        assert all(p.grad.dtype == dtype for p in model.parameters())
        # the float32 reference sees exactly the gradients the server received (up-cast from the model's dtype)
        for p, q in zip(model.parameters(), master.parameters()):
            q.grad = p.grad.float()
        remote.step()
        reference.step()
    _, server_params = remote.client.params(remote.session_id)
    for index, (p, q) in enumerate(zip(model.parameters(), master.parameters())):
        assert p.dtype == dtype
        # float32 master weights on the server, the model holds them rounded to its own dtype
        torch.testing.assert_close(torch.from_numpy(server_params[str(index)].copy()), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, torch.from_numpy(server_params[str(index)].copy()).to(dtype), rtol=0, atol=0)
    state = remote.state_dict()["state"]
    assert all(entry["master_param"].dtype == torch.float32 for entry in state.values())
