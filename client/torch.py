"""PyTorch drop-ins: ``torch.optim`` optimizers whose state lives on an optserve server.

    model = Net()
    optimizer = RemoteAdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, url="http://127.0.0.1:8000")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()          # gradients go to the server, updated parameters come back
        scheduler.step()

``RemoteAdam``, ``RemoteAdamW``, ``RemoteSGD`` and ``RemoteRMSprop`` take their ``torch.optim`` twin's arguments plus
``url=`` (or ``client=``), ``session_id=`` (attach to an existing session), ``timeout=`` and ``retry=``. They accept
``model.parameters()``, ``model.named_parameters()`` (the names become the tensor names on the server; otherwise
parameters are named by their index, as in torch's ``state_dict``) and lists of parameter-group dicts.

- Hyperparameters changed in ``param_groups`` (by hand or by any ``lr_scheduler``) travel with the next step.
- Parameters whose ``grad`` is None are skipped, their state untouched, as torch does.
- A bfloat16 or float16 model keeps float32 master weights on the server; gradients travel in the model's dtype.
- ``state_dict()`` / ``load_state_dict()`` have torch's shape (``step``, ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ``grad_avg``), so checkpointing code written for torch
  works unchanged; for a non-float32 model each state also carries ``master_param``. Load the model's state dict
  before the optimizer's, as usual: loading sends the model's current parameters with the state.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

import numpy as np
import torch
from torch.optim import Optimizer
from typing_extensions import Unpack

from . import checkpoint, wire
from .errors import PreconditionFailed
from .http import DEFAULT_URL, Client
from .protocol import Retry, StepResult

__all__ = ["RemoteAdam", "RemoteAdamW", "RemoteSGD", "RemoteRMSprop"]

_STEP_KEY_OPTIMIZERS = ("adam", "adamw", "rmsprop")  # torch keeps a per-parameter "step" for these, not for SGD
_WIRE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU float32 (or float16) numpy view or copy of a tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in (torch.float32, torch.float16):
        t = t.float()  # bfloat16 has no numpy type: exact as float32, and the wire rounds back exactly
    return t.numpy()


def _plain(value: Any) -> Any:
    """A hyperparameter value as JSON knows it (tensors and tuples from schedulers and torch defaults)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


class RemoteOptions(TypedDict, total=False):
    """Where and how the drop-ins reach the server: the keyword arguments they add to their torch twins."""

    url: str  # default http://127.0.0.1:8000
    session_id: str | None  # attach to this session instead of creating one
    client: Client | None  # an existing client (url, timeout, retry and token are then its own)
    timeout: float  # seconds, default 60
    retry: Retry | None
    nonfinite: str | None  # "error" or "skip", for a new session
    max_grad_norm: float | None  # server-side clipping, for a new session
    token: str | None  # admin key (to create) or the session's token (to attach)
    wire_dtype: str | None  # "float16"/"bfloat16": gradients sent and parameters answered in it (master stays fp32)


class _RemoteOptimizer(Optimizer):
    """The shared body of the four drop-ins: a ``torch.optim.Optimizer`` that steps on the server."""

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], optimizer: str, **remote: Unpack[RemoteOptions]
    ) -> None:
        super().__init__(params, defaults)
        self._optimizer = optimizer
        self._hp_names = tuple(defaults)
        client, session_id, token = remote.get("client"), remote.get("session_id"), remote.get("token")
        self._timeout = remote.get("timeout", 60.0)
        self._retry = remote.get("retry")
        self._wire_dtype = wire.check_wire_dtype(remote.get("wire_dtype"))
        self._owns_client = client is None
        self.client = client if client is not None else Client(
            remote.get("url", DEFAULT_URL), timeout=self._timeout, retry=self._retry, token=token
        )  # fmt: skip
        if session_id is not None and token is not None:
            self.client.use_token(session_id, token)
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []
        for group in self.param_groups:
            names = group.get("param_names") or [str(len(self._names) + i) for i in range(len(group["params"]))]
            self._names.extend(names)
            self._params.extend(group["params"])
        if len(set(self._names)) != len(self._names):
            raise ValueError("parameter names must be unique across parameter groups")
        if session_id is None:
            info = self.client.create_session(
                {n: _to_numpy(p) for n, p in zip(self._names, self._params)},
                optimizer,
                hyperparams={k: _plain(v) for k, v in defaults.items()},
                param_groups=self._group_specs(),
                nonfinite=remote.get("nonfinite"),
                max_grad_norm=remote.get("max_grad_norm"),
            )
            self._sent = [self._hyperparams(g) for g in self.param_groups]
        else:
            info = self.client.session(session_id)
            shapes = {n: tuple(t["shape"]) for n, t in info["tensors"].items()}
            if shapes != {n: tuple(p.shape) for n, p in zip(self._names, self._params)}:
                raise ValueError(f"session {session_id!r} holds tensors {shapes}, which are not these parameters")
            self._sent = [g["hyperparams"] for g in info["param_groups"]]
        self.session_id: str = info["id"]
        self._step_count: int = info["step"]
        self.last_grad_norm: float | None = None
        if session_id is not None:
            self._copy_in(*self.client.params(self.session_id))

    # --- helpers ----------------------------------------------------------------------------------------------

    def _hyperparams(self, group: dict[str, Any]) -> dict[str, Any]:
        return {k: _plain(group[k]) for k in self._hp_names}

    def _group_specs(self) -> list[dict[str, Any]]:
        specs, start = [], 0
        for group in self.param_groups:
            names = self._names[start : start + len(group["params"])]
            start += len(names)
            specs.append({"params": names, **self._hyperparams(group)})
        return specs

    def _changes(self) -> list[dict[str, Any] | None] | None:
        """Hyperparameters changed in ``param_groups`` since they were last sent, per group."""
        changes: list[dict[str, Any] | None] = []
        for group, sent in zip(self.param_groups, self._sent):
            now = self._hyperparams(group)
            diff = {k: v for k, v in now.items() if sent.get(k) != v}
            changes.append(diff or None)
        return changes if any(changes) else None

    def _copy_in(self, step: int, tensors: dict[str, np.ndarray]) -> None:
        self._step_count = step
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the arrays are read-only views of the answer; only read
            for name, p in zip(self._names, self._params):
                p.copy_(torch.from_numpy(tensors[name]).reshape(p.shape))

    # --- torch.optim.Optimizer ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Send the gradients, apply the step on the server, copy the updated parameters into the model."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for name, p in zip(self._names, self._params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            grads[name] = _to_numpy(p.grad)
            dtypes[name] = self._wire_dtype or _WIRE_DTYPES.get(p.grad.dtype, "float32")
        if not grads:
            return loss
        changes = self._changes()

        def send() -> StepResult:
            return self.client.step(
                self.session_id,
                grads,
                if_match=self._step_count,
                idempotency_key=uuid.uuid4().hex,
                partial=len(grads) < len(self._names),
                changes=changes,
                dtype=dtypes,
                answer_dtype=self._wire_dtype,
                retry=self._retry,
            )

        try:
            result = send()
        except PreconditionFailed as e:
            if not e.server_behind(self._step_count):
                raise
            # The server restarted from a snapshot older than our last step: take its parameters and step there.
            self._copy_in(*self.client.params(self.session_id))
            result = send()
        if changes:
            self._sent = [self._hyperparams(g) for g in self.param_groups]
        self.last_grad_norm = result.grad_norm
        if result.params is None:  # a contribution: wait for the other contributors to complete the step
            self._copy_in(*self.client.params(self.session_id, min_step=self._step_count + 1, timeout=self._timeout))
        else:
            self._copy_in(result.step, result.params)
            result.release()  # copied into the model: the receive buffer can serve the next step
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in torch's shape, read from the server's checkpoint of the session."""
        cp = checkpoint.decode(self.client.checkpoint(self.session_id))
        steps = dict(zip(cp.names, cp.tensor_steps))
        state: dict[int, dict[str, Any]] = {}
        for index, (name, p) in enumerate(zip(self._names, self._params)):
            if steps[name] == 0:
                continue
            entry: dict[str, Any] = {}
            if self._optimizer in _STEP_KEY_OPTIMIZERS:
                entry["step"] = torch.tensor(float(steps[name]))
            for buffer, arrays in cp.state.items():
                if buffer != "accumulated":
                    entry[buffer] = torch.from_numpy(arrays[name].copy())
            if p.dtype != torch.float32:
                entry["master_param"] = torch.from_numpy(cp.params[name].copy())
            if entry:
                state[index] = entry
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch-shaped optimizer state into the session (with the model's current parameters)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
        info = self.client.session(self.session_id)
        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        params: dict[str, np.ndarray] = {}
        buffers: dict[str, dict[str, np.ndarray]] = {b: {} for b in info["state"]}
        tensor_steps: list[int] = []
        for index, (name, p) in enumerate(zip(self._names, self._params)):
            entry = saved_state.get(index, {})
            master = entry.get("master_param")
            params[name] = _to_numpy(master if master is not None else p).astype(np.float32)
            for buffer, arrays in buffers.items():
                value = entry.get(buffer)
                arrays[name] = (
                    np.zeros(tuple(p.shape), np.float32)
                    if value is None
                    else _to_numpy(value).astype(np.float32).reshape(tuple(p.shape))
                )
            if "step" in entry:
                tensor_steps.append(int(_plain(entry["step"])))
            else:  # SGD keeps no step: a momentum buffer means the parameter has been stepped
                tensor_steps.append(1 if entry.get("momentum_buffer") is not None else 0)
        config = {k: info[k] for k in ("nonfinite", "max_grad_norm", "schedule", "accumulate")}
        config.update(
            optimizer=self._optimizer,
            hyperparams={k: _plain(v) for k, v in self.defaults.items() if k in self._hp_names},
            param_groups=self._group_specs(),
        )
        cp = checkpoint.Checkpoint(config, max(tensor_steps, default=0), tensor_steps, params, buffers)
        restored = self.client.restore(self.session_id, checkpoint.encode(cp))
        self._step_count = restored["step"]
        self._sent = [self._hyperparams(g) for g in self.param_groups]
        self._copy_in(*self.client.params(self.session_id))

    def close(self, delete: bool = False) -> None:
        """Release the connection (and delete the session on the server when ``delete``)."""
        if delete:
            self.client.delete_session(self.session_id)
        if self._owns_client:
            self.client.close()


class RemoteAdam(_RemoteOptimizer):
    """``torch.optim.Adam`` with its state on the server (``decoupled_weight_decay=True`` makes it AdamW)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        eps_root: float = 0.0,
        decoupled_weight_decay: bool = False,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        eps_root=eps_root)  # fmt: skip
        super().__init__(params, defaults, "adamw" if decoupled_weight_decay else "adam", **remote)


class RemoteAdamW(_RemoteOptimizer):
    """``torch.optim.AdamW`` with its state on the server."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        eps_root: float = 0.0,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        eps_root=eps_root)  # fmt: skip
        super().__init__(params, defaults, "adamw", **remote)


class RemoteSGD(_RemoteOptimizer):
    """``torch.optim.SGD`` with its state on the server."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)  # fmt: skip
        super().__init__(params, defaults, "sgd", **remote)


class RemoteRMSprop(_RemoteOptimizer):
    """``torch.optim.RMSprop`` with its state on the server."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                        maximize=maximize)  # fmt: skip
        super().__init__(params, defaults, "rmsprop", **remote)
