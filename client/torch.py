"""PyTorch drop-ins: ``torch.optim`` optimizers whose state lives on an optserve server.

    model = Net()
    optimizer = RemoteAdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, url="http://127.0.0.1:8000")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()          # gradients go to the server, updated parameters come back
        scheduler.step()

``RemoteAdam``, ``RemoteAdamW``, ``RemoteSGD``, ``RemoteRMSprop``, ``RemoteRAdam``, ``RemoteNAdam`` and
``RemoteAdafactor`` take their ``torch.optim`` twin's arguments (validated by torch itself: the same exceptions for
the same mistakes) plus ``url=`` (or ``client=``), ``session_id=`` (attach to an existing session), ``timeout=``,
``retry=``, ``nonfinite=``, ``max_grad_norm=``, ``token=``, ``wire_dtype=``, ``overlap=`` and ``overlap_warmup=``;
any other keyword is a TypeError, as in torch. They accept ``model.parameters()``, ``model.named_parameters()`` (the
names become the tensor names on the server; otherwise parameters are named by their index, as in torch's
``state_dict``) and lists of parameter-group dicts.

- Hyperparameters changed in ``param_groups`` (by hand or by any ``lr_scheduler``) travel with the next step; one
  that needs state the session lacks (momentum switched on) makes the server create it, as torch does.
- ``add_param_group`` adds the group's tensors to the session (zero state, as torch's for a new group).
- Parameters whose ``grad`` is None are skipped, their state untouched, as torch does.
- Complex parameters are stepped as their real view (``torch.view_as_real``), as torch's four optimizers do.
- A bfloat16 or float16 model keeps float32 master weights on the server; gradients travel in the model's dtype.
- ``state_dict()`` / ``load_state_dict()`` have torch's shape (``step``, ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ``grad_avg`` and every key torch writes in a parameter
  group), so checkpointing code written for torch works unchanged, both ways; for a non-float32 model each state
  also carries ``master_param``. Loading back the state dict just taken (nothing stepped or changed since) costs
  no transfer. Load the model's state dict before the optimizer's, as usual: loading another state sends the
  model's current parameters with it.
- ``foreach``, ``fused`` and ``capturable`` only choose torch's implementation: accepted (with torch's checks),
  the server has one. ``differentiable=True`` is refused: autograd cannot follow a step taken on the server.
- ``copy.deepcopy`` gives an independent optimizer on a new session holding a copy of the state; pickling raises
  TypeError (pickle ``state_dict()`` instead).
- ``overlap=True`` is the delayed parameter update of ZeRO-Offload (see :mod:`optserve.client.inflight`):
  ``step()`` copies the gradients, sends them and returns at once; the answer is written into the parameters when
  the next ``step()`` starts, so the round trip runs while the loop computes the next forward and backward, at the
  price of gradients one step stale. ``overlap_warmup=N`` takes the first N steps exactly. ``synchronize()``
  writes the step in flight in now; ``state_dict()``, ``load_state_dict()``, ``add_param_group()``, ``close()``
  and ``copy.deepcopy`` do so first. ``zero_grad()`` and schedulers need not wait: the step in flight sends its own
  copy of the gradients and the hyperparameters it was taken with; a change made meanwhile travels with the next
  step, as without overlap. An error of the step in flight is raised by the call that waits for it.
"""

from __future__ import annotations

import copy
import functools
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.optimizer import (
    _device_dtype_check_for_fused,
    _get_capturable_supported_devices,
    _global_optimizer_post_hooks,
    _global_optimizer_pre_hooks,
)
from typing_extensions import Unpack

from . import checkpoint, wire
from .http import Client
from .lease import Lease, settle
from .protocol import Retry
from .stepping import Answer, Sequencer, exchange

__all__ = ["RemoteAdam", "RemoteAdamW", "RemoteSGD", "RemoteRMSprop", "RemoteRAdam", "RemoteNAdam", "RemoteAdafactor"]

_NO_STEP_KEY = ("sgd",)  # torch keeps a per-parameter "step" for every optimizer but these
_WIRE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_EXACT_DTYPES = (torch.float32, torch.complex64)  # held by the server's float32 master weights without rounding


def _real(t: torch.Tensor) -> torch.Tensor:
    """The real tensor the server steps for ``t``: a complex tensor's ``view_as_real`` (shape (..., 2))."""
    return torch.view_as_real(t) if t.is_complex() else t


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU float32 (or float16) numpy view or copy of a tensor (of its real view, if complex)."""
    if t.dtype is torch.float32 and t.is_cpu and not t.requires_grad:
        return t.numpy()  # the common case, without the calls below
    t = _real(t.detach())
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in (torch.float32, torch.float16):
        t = t.float()  # bfloat16 has no numpy type: exact as float32, and the wire rounds back exactly
    return t.numpy()


def _to_torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A float32 array (the server's layout of ``like``) as a new tensor shaped like ``like`` (complex if it is)."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())
    return torch.view_as_complex(t.reshape(*like.shape, 2)) if like.is_complex() else t.reshape(like.shape)


def _plain(value: Any) -> Any:
    """A hyperparameter value as JSON knows it (tensors and tuples from schedulers and torch defaults)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _plain_values(values: Iterable[Any]) -> bool:
    """Only numbers, strings, None and tuples of those: values whose equality says they are unchanged."""
    return all(
        isinstance(v, (tuple, list)) and _plain_values(v) or v is None or type(v) in (bool, int, float, str)
        for v in values
    )


class RemoteOptions(TypedDict, total=False):
    """Where and how the drop-ins reach the server: the keyword arguments they add to their torch twins."""

    url: str  # default: OPTSERVE_URL, else OPTSERVE_HOST/OPTSERVE_PORT, else http://127.0.0.1:8000
    session_id: str | None  # attach to this session instead of creating one
    client: Client | None  # an existing client (url, timeout, retry and token are then its own)
    timeout: float  # seconds, default 60
    retry: Retry | None
    nonfinite: str | None  # "error" or "skip", for a new session
    max_grad_norm: float | None  # server-side clipping, for a new session
    token: str | None  # admin key (to create) or the session's token (to attach)
    wire_dtype: str | None  # "float16"/"bfloat16": gradients sent and parameters answered in it (master stays fp32)
    name: str | None  # create the session under this id (kept after close, like an attached one)
    keep: bool  # keep a session created here after close (default: deleted on close, collection or exit)
    overlap: bool  # delayed parameter update: the step runs while the loop computes the next one (default False)
    overlap_warmup: int  # with overlap, the first steps taken exactly (default 0)


@dataclass
class _Handed:
    """What the last ``state_dict()`` handed out, to recognise it when it is loaded back unchanged."""

    version: int  # the optimizer's version then (every step, load or new group bumps it)
    group_params: list[list[int]]
    tensors: dict[tuple[int, str], tuple[weakref.ref[torch.Tensor], int]]  # state tensors and their _version
    params: list[int]  # the parameters' _version counters


class _RemoteOptimizer(Optimizer):
    """The shared body of the four drop-ins: a ``torch.optim.Optimizer`` that steps on the server.

    Subclasses name their twin (``_twin``), the hyperparameters the server steps with (``_server_hps``), the
    optimizer state torch keeps (``_buffers``) and what torch's ``__setstate__`` fills into a loaded parameter
    group that lacks a key (``_setstate_defaults``).
    """

    _twin: type[Optimizer]
    _server_hps: tuple[str, ...]
    _buffers: tuple[str, ...]
    _setstate_defaults: Mapping[str, Any]

    def __init__(
        self,
        params: Iterable[Any],
        twin_kwargs: dict[str, Any],
        optimizer: str,
        remote: dict[str, Any],
        extra_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        unknown = sorted(set(remote) - set(RemoteOptions.__annotations__))
        if unknown:
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {unknown[0]!r}")
        # torch's own checks of the arguments, with its exceptions and messages; a twin over no data costs nothing
        probe = self._twin([torch.empty(0)], **twin_kwargs)
        if probe.defaults.get("differentiable"):
            raise RuntimeError(
                f"{type(self).__name__} does not support differentiable=True: the step runs on the server, where "
                "autograd cannot follow it"
            )
        self._optimizer = optimizer
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []
        self._connected = False
        overlap, warmup = bool(remote.get("overlap", False)), int(remote.get("overlap_warmup", 0))
        self._inflight: Sequencer[Answer] = Sequencer(overlap, warmup)
        self._snapshot: dict[str, torch.Tensor] = {}  # gradient copies of the step in flight, reused
        self._flat_entries: tuple[wire.TensorEntry, ...] | None = None  # an answer layout checked for _copy_in_flat
        self._flat_key: list[tuple[int, torch.Size]] | None = None  # the parameters the flat views were made of
        self._flat_targets: list[torch.Tensor] = []
        self._flat_sizes: list[int] = []
        # the groups' raw hyperparameter values when they were last found unchanged, and the _sent they matched
        self._unchanged: tuple[list[tuple[Any, ...]], list[dict[str, Any]]] | None = None
        self._watched = (*self._server_hps, "decoupled_weight_decay")  # what _changes and _server_optimizer read
        self._version = 0
        self._handed: _Handed | None = None
        super().__init__(params, {**probe.defaults, **(extra_defaults or {})})
        optimizer = self._optimizer = self._server_optimizer(self.param_groups)  # groups may set their own flags
        client, session_id, token = remote.get("client"), remote.get("session_id"), remote.get("token")
        self._timeout = remote.get("timeout", 60.0)
        self._retry = remote.get("retry")
        self._wire_dtype = wire.check_wire_dtype(remote.get("wire_dtype"))
        self._owns_client = client is None
        self.client = client if client is not None else Client(
            remote.get("url"), timeout=self._timeout, retry=self._retry, token=token
        )  # fmt: skip
        if session_id is not None and token is not None:
            self.client.use_token(session_id, token)
        if session_id is None:
            info = self.client.create_session(
                {n: _to_numpy(p) for n, p in zip(self._names, self._params)},
                optimizer,
                hyperparams={k: _plain(self.defaults[k]) for k in self._server_hps},
                param_groups=self._group_specs(),
                nonfinite=remote.get("nonfinite"),
                max_grad_norm=remote.get("max_grad_norm"),
                session_id=remote.get("name"),
            )
            self._sent = [self._hyperparams(g) for g in self.param_groups]
        else:
            info = self.client.session(session_id)
            shapes = {n: tuple(t["shape"]) for n, t in info["tensors"].items()}
            if shapes != {n: tuple(_real(p).shape) for n, p in zip(self._names, self._params)}:
                raise ValueError(f"session {session_id!r} holds tensors {shapes}, which are not these parameters")
            if info["optimizer"] != optimizer:
                raise ValueError(f"session {session_id!r} steps {info['optimizer']}, not {optimizer}")
            self._sent = [g["hyperparams"] for g in info["param_groups"]]
        self.session_id: str = info["id"]
        self._keep = bool(remote.get("keep")) or remote.get("name") is not None
        self._lease = self._new_lease() if session_id is None else None
        self._step_count: int = info["step"]
        self._connected = True
        self.last_grad_norm: float | None = None
        if session_id is not None:
            self._copy_in(*self.client.params(self.session_id))

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """torch's wrapper of ``step`` (the profiler's ``Optimizer.step#...`` range, the step pre- and post-hooks),
        entered when something would see it: a profiler on, or any hook registered. Without them the step skips
        its ``record_function``, which alone costs 8 us a step here (torch's optimizers pay it too)."""
        hooked = Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self = args[0]
            if (
                self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks
                or _global_optimizer_pre_hooks
                or _global_optimizer_post_hooks
                or torch._C._autograd._profiler_enabled()
            ):
                return hooked(*args, **kwargs)
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            return out

        return wrapper

    # --- helpers ----------------------------------------------------------------------------------------------

    def _hyperparams(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _plain(group[k]) for k in self._server_hps}

    def _group_specs(self, groups: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        specs, start = [], 0
        for group in self.param_groups if groups is None else groups:
            names = self._names[start : start + len(group["params"])]
            start += len(names)
            specs.append({"params": names, **self._hyperparams(group)})
        return specs

    def _server_optimizer(self, groups: list[dict[str, Any]]) -> str:
        """The server's optimizer for these groups (Adam's ``decoupled_weight_decay`` picks adam or adamw)."""
        return self._optimizer

    def _changes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any] | None] | None]:
        """The groups' hyperparameters now, and those changed in ``param_groups`` since they were last sent (per
        group, None if none)."""
        # The usual step changes nothing: the groups' raw values compared at once with those last found unchanged
        # (plain numbers only: a tensor's value can change in place), instead of converted one by one.
        raw = [tuple(group.get(k) for k in self._watched) for group in self.param_groups]
        if self._unchanged is not None and self._unchanged[1] is self._sent and raw == self._unchanged[0]:
            return self._sent, None
        if self._server_optimizer(self.param_groups) != self._optimizer:
            raise ValueError(
                f"{type(self).__name__}: decoupled_weight_decay cannot change after creation (the session steps "
                f"{self._optimizer}); load a state dict with the new setting, or create another optimizer"
            )
        now = [self._hyperparams(group) for group in self.param_groups]
        changes: list[dict[str, Any] | None] = [
            {k: v for k, v in values.items() if sent.get(k) != v} or None for values, sent in zip(now, self._sent)
        ]
        if any(changes):
            return now, changes
        self._unchanged = (raw, self._sent) if all(map(_plain_values, raw)) else None
        return self._sent, None  # equal to now: kept, so that the next step finds it unchanged at once

    def _copy_in(self, step: int, tensors: Mapping[str, np.ndarray]) -> None:
        """Write the session's parameters (the server's layout, float32 or the wire's dtype) into the model, in one
        ``torch._foreach_copy_`` (it bumps the parameters' versions, as an in-place update by torch does)."""
        self._step_count = step
        targets = [_real(p) for p in self._params]
        arrays = [tensors[name] for name in self._names]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the arrays may be read-only views of the answer; only read
            sources = [torch.from_numpy(a).view(t.shape) for a, t in zip(arrays, targets)]
            torch._foreach_copy_(targets, sources)

    def _copy_in_flat(self, step: int, body: wire.Safetensors) -> bool:
        """:meth:`_copy_in` for the usual answer, float32 in this optimizer's tensor order into contiguous float32
        parameters: its data section split into the parameters' sizes in one call (no array per tensor). False,
        with nothing done, for any other answer."""
        if body.entries is not self._flat_entries:  # parsed headers are cached: the same tuple step after step
            offset, usable = 0, len(body.entries) == len(self._names)
            for entry, name in zip(body.entries, self._names):
                usable = usable and entry.name == name and entry.dtype == "F32" and entry.start == offset
                offset = entry.stop
            if not usable:
                return False
            self._flat_entries = body.entries
        key = [(p.data_ptr(), p.shape) for p in self._params]
        if key != self._flat_key:  # the flat views of the parameters, made again if one was replaced (p.data = ...)
            # detached views: written without autograd (no no_grad() needed), and sharing the parameters' version
            # counters, so the copy bumps their versions as an in-place update by torch does
            targets = [_real(p.detach()) for p in self._params]
            if not all(t.dtype is torch.float32 and t.is_cpu and t.is_contiguous() for t in targets):
                return False
            self._flat_targets = [t.view(-1) for t in targets]
            self._flat_sizes = [t.numel() for t in targets]
            self._flat_key = key
        data = body.data
        if not len(data):
            return False
        if data.readonly:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a read-only body (bytes): only read
                flat = torch.frombuffer(data, dtype=torch.float32)
        else:
            flat = torch.frombuffer(data, dtype=torch.float32)
        torch._foreach_copy_(self._flat_targets, flat.split_with_sizes(self._flat_sizes))
        self._step_count = step
        return True

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """What torch refuses of a group at its first step, refused when the group is added; and what a remote
        step cannot do like torch's."""
        params = group["params"]
        if len(params) != len(set(params)):
            raise ValueError(
                f"{type(self).__name__} does not support a parameter listed twice in a group (torch would step it "
                "twice per step with one state)"
            )
        if group.get("differentiable"):
            raise RuntimeError(f"{type(self).__name__} does not support differentiable=True")
        for p in params:
            if group.get("fused"):
                _device_dtype_check_for_fused(p)
            if group.get("capturable") and p.device.type not in _get_capturable_supported_devices():
                raise AssertionError(  # torch's exception and message for this, at its first step
                    "If capturable=True, params and state_steps must be on supported devices: "
                    f"{_get_capturable_supported_devices()}."
                )

    def _required_buffers(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """The state buffers torch creates for a parameter of this group."""
        return self._buffers

    def _state_shape(self, buffer: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The server's shape of ``buffer`` for a parameter of (real) ``shape``: the parameter's own for elementwise
        state; an algorithm with other state (NAdam's mu_product, Adafactor's factors) says its own, as its room on
        the server does; ``(0,)`` for a buffer this parameter keeps none of."""
        return shape

    def _fresh(self, buffer: str, shape: tuple[int, ...]) -> np.ndarray:
        """A buffer as the server starts it for a parameter of ``shape`` (zeros; NAdam's mu_product is 1)."""
        return np.zeros(self._state_shape(buffer, shape), np.float32)

    def _state_tensor(self, buffer: str, array: np.ndarray, p: torch.Tensor) -> torch.Tensor | None:
        """The torch state tensor of ``buffer`` for ``p`` (None where torch keeps none for this parameter)."""
        if self._state_shape(buffer, tuple(_real(p).shape)) == tuple(_real(p).shape):
            return _to_torch(array, p)
        if array.shape == (0,):
            return None
        return torch.from_numpy(np.array(array, dtype=np.float32))

    # --- torch.optim.Optimizer ------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (same checks and defaults); after construction the group's tensors are
        added to the session, with zero state and torch's names (their index, or the names given)."""
        if self._connected:
            self._inflight.settle()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            names = group.get("param_names") or [str(len(self._names) + i) for i in range(len(group["params"]))]
            if len(set(names)) != len(names) or set(names) & set(self._names):
                raise ValueError("parameter names must be unique across parameter groups")
            if self._connected:
                self._add_to_session(group, names)
        except BaseException:
            self.param_groups.pop()
            raise
        self._names.extend(names)
        self._params.extend(group["params"])

    def _add_to_session(self, group: dict[str, Any], names: list[str]) -> None:
        """The session's checkpoint with these tensors added as a new group, put back in its place."""
        cp = checkpoint.decode(self.client.checkpoint(self.session_id))
        for name, p in zip(names, group["params"]):
            value = _to_numpy(p).astype(np.float32)
            cp.params[name] = value
            for buffer, arrays in cp.state.items():
                arrays[name] = np.zeros_like(value) if buffer == "accumulated" else self._fresh(buffer, value.shape)
        cp.config["param_groups"].append({"params": names, **self._hyperparams(group)})
        cp.tensor_steps = cp.tensor_steps + [0] * len(names)
        if cp.momentum_started is not None:
            cp.momentum_started = cp.momentum_started + [False] * len(names)
        if cp.pending is not None:
            cp.pending["present"] = cp.pending["present"] + [False] * len(names)
        self._step_count = self.client.restore(self.session_id, checkpoint.encode(cp))["step"]
        self._sent.append(self._hyperparams(group))
        self._version += 1

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Send the gradients, apply the step on the server, copy the updated parameters into the model; with
        ``overlap=True``, write the step in flight in and send this one in the background."""
        # No torch.no_grad() around it (3 us a step): nothing here records autograd history; the answer is copied
        # in through detached views of the parameters (_copy_in_flat) or under no_grad (_copy_in).
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._inflight.settle()
        names, grads = [], []
        plain = True  # every gradient a CPU float32 tensor outside autograd: numpy views of them as they are
        for name, p in zip(self._names, self._params):
            if (g := p.grad) is not None:
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                names.append(name)
                grads.append(g)
                plain = plain and g.dtype is torch.float32 and g.is_cpu and not g.requires_grad
        if not grads:
            return loss
        pipelined = self._inflight.pipelined()
        # in flight, the gradients are copied: the loop may zero or accumulate into p.grad in place meanwhile
        if pipelined:
            arrays = self._copy_grads(names, grads)
        else:
            arrays = [g.numpy() for g in grads] if plain else [_to_numpy(g) for g in grads]
        dtype: str | dict[str, str] | None = self._wire_dtype
        if dtype is None and not plain:  # bfloat16 travels as bfloat16 (the arrays hold float32 copies, exact)
            dtype = {n: "bfloat16" for n, g in zip(names, grads) if g.dtype == torch.bfloat16} or None
        now, changes = self._changes()
        send = functools.partial(self._exchange, dict(zip(names, arrays)), dtype, changes, self._step_count)
        self._inflight.take(send, functools.partial(self._finish, now), pipelined)
        return loss

    def synchronize(self) -> None:
        """Wait for the step in flight (with ``overlap=True``) and write its answer into the parameters; raises
        its error if it failed. A no-op when no step is in flight."""
        self._inflight.settle()

    def _copy_grads(self, names: list[str], grads: list[torch.Tensor]) -> list[np.ndarray]:
        """The gradients copied into buffers of this optimizer's (kept from step to step), as numpy arrays."""
        sources = [_real(g.detach()) for g in grads]
        targets = []
        for name, g in zip(names, sources):
            kept = self._snapshot.get(name)
            dtype = torch.float16 if g.dtype == torch.float16 else torch.float32
            if kept is None or kept.shape != g.shape or kept.dtype != dtype:
                kept = self._snapshot[name] = torch.empty(g.shape, dtype=dtype)
            targets.append(kept)
        torch._foreach_copy_(targets, sources)
        return [t.numpy() for t in targets]

    def _exchange(
        self,
        grads: dict[str, np.ndarray],
        dtype: str | dict[str, str] | None,
        changes: list[dict[str, Any] | None] | None,
        if_match: int,
    ) -> Answer:
        """One step's round trip (:func:`optserve.client.stepping.exchange`): it touches no parameter."""
        return exchange(
            self.client,
            self.session_id,
            grads,
            if_match,
            timeout=self._timeout,
            retry=self._retry,
            partial=len(grads) < len(self._names),
            changes=changes,
            dtype=dtype,
            answer_dtype=self._wire_dtype,
        )

    def _finish(self, sent: list[dict[str, Any]], answer: Answer) -> None:
        """A step's answer in: the parameters written into the model, the hyperparameters it was sent with noted."""
        self._version += 1
        self._sent = sent
        self.last_grad_norm = answer.result.grad_norm
        body = answer.result.body
        if body is None or not self._copy_in_flat(answer.step, body):
            self._copy_in(answer.step, answer.tensors)
        answer.result.release()  # copied into the model: the receive buffer can serve the next step

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in torch's shape, read from the server's checkpoint of the session (before any step
        has been applied there is no state, and only the session's info is read). torch's state-dict hooks run.
        A step in flight is written in first."""
        self._inflight.settle()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state: dict[int, dict[str, Any]] = {}
        if self.client.session(self.session_id)["step"] > 0:
            cp = checkpoint.decode(self.client.checkpoint(self.session_id))
            steps = dict(zip(cp.names, cp.tensor_steps))
            # SGD: torch holds a momentum buffer only for the tensors stepped with momentum
            started = dict(zip(cp.names, cp.momentum_started or [s > 0 for s in cp.tensor_steps]))
            for index, (name, p) in enumerate(zip(self._names, self._params)):
                if steps[name] == 0:
                    continue
                entry: dict[str, Any] = {}
                if self._optimizer not in _NO_STEP_KEY:
                    entry["step"] = torch.tensor(float(steps[name]))
                for buffer, arrays in cp.state.items():
                    sgd_unstarted = self._optimizer == "sgd" and not started[name]
                    if buffer != "accumulated" and not (buffer == "momentum_buffer" and sgd_unstarted):
                        value = self._state_tensor(buffer, arrays[name], p)
                        if value is not None:
                            entry[buffer] = value
                if p.dtype not in _EXACT_DTYPES:
                    entry["master_param"] = _to_torch(cp.params[name], p)
                if entry:
                    state[index] = entry
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        self._handed = _Handed(
            self._version,
            [g["params"] for g in groups],
            {(i, k): (weakref.ref(v), v._version) for i, e in state.items() for k, v in e.items()},
            [p._version for p in self._params],
        )
        state_dict: dict[str, Any] = {"state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _is_handed(self, state_dict: Mapping[str, Any]) -> bool:
        """``state_dict`` is what the last ``state_dict()`` handed out, unchanged, and nothing moved since: the
        same tensors (maybe in new dicts, as ``accelerate`` makes them) with no in-place change, the same
        parameter ids, no step, load or new group, and the model's parameters untouched."""
        handed = self._handed
        if handed is None or handed.version != self._version:
            return False
        if [list(g["params"]) for g in state_dict["param_groups"]] != handed.group_params:
            return False
        if [p._version for p in self._params] != handed.params:
            return False
        seen = 0
        for index, entry in state_dict["state"].items():
            for key, value in entry.items():
                ref, version = handed.tensors.get((index, key), (None, -1))
                tensor = ref() if ref is not None else None
                if tensor is None or tensor is not value or tensor._version != version:
                    return False
                seen += 1
        return seen == len(handed.tensors)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch-shaped optimizer state into the session (with the model's current parameters), as torch's
        ``load_state_dict`` does, hooks included. The state dict just handed out by ``state_dict()``, unchanged,
        is taken as it is: the session already holds it, and only the groups' values are updated. A step in
        flight is written in first."""
        self._inflight.settle()
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            new = {**saved, "params": group["params"]}
            if "param_names" in group and "param_names" not in new:
                new["param_names"] = group["param_names"]
            for key, default in self._setstate_defaults.items():
                new.setdefault(key, default)
            self._loaded_group(new)
            groups.append(new)
        optimizer = self._server_optimizer(groups)
        if optimizer != self._optimizer or not self._is_handed(state_dict):
            self._restore(state_dict, saved_groups, groups, optimizer)
        self.param_groups = groups
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_group(self, group: dict[str, Any]) -> None:
        """Adjust a loaded group as the twin's ``__setstate__`` does."""

    def _restore(
        self,
        state_dict: Mapping[str, Any],
        saved_groups: list[dict[str, Any]],
        groups: list[dict[str, Any]],
        optimizer: str,
    ) -> None:
        """Put a checkpoint built from ``state_dict`` and the model's parameters in the session's place."""
        info = self.client.session(self.session_id)
        position = {saved: i for i, saved in enumerate(p for g in saved_groups for p in g["params"])}
        saved_state = {position[k]: v for k, v in state_dict["state"].items() if k in position}
        held = set(info["state"])
        for group in groups:
            held.update(self._required_buffers(group))
        held.update(k for entry in saved_state.values() for k in entry if k in self._buffers)
        params: dict[str, np.ndarray] = {}
        buffers: dict[str, dict[str, np.ndarray]] = {b: {} for b in self._buffers if b in held}
        tensor_steps: list[int] = []
        started: list[bool] = []
        for index, (name, p) in enumerate(zip(self._names, self._params)):
            entry = saved_state.get(index, {})
            shape = tuple(_real(p).shape)
            master = entry.get("master_param")
            params[name] = _to_numpy(master if master is not None else p).astype(np.float32).reshape(shape)
            for buffer, arrays in buffers.items():
                value = entry.get(buffer)
                arrays[name] = (
                    self._fresh(buffer, shape)
                    if value is None
                    else _to_numpy(value).astype(np.float32).reshape(self._state_shape(buffer, shape))
                )
            started.append(entry.get("momentum_buffer") is not None)
            if "step" in entry:
                tensor_steps.append(int(_plain(entry["step"])))
            else:  # SGD keeps no step: a momentum buffer means the parameter has been stepped
                tensor_steps.append(1 if started[-1] else 0)
        config = {k: info[k] for k in ("nonfinite", "max_grad_norm", "schedule", "accumulate")}
        config.update(
            optimizer=optimizer,
            hyperparams={k: _plain(self.defaults[k]) for k in self._server_hps},
            param_groups=self._group_specs(groups),
        )
        cp = checkpoint.Checkpoint(
            config,
            max(tensor_steps, default=0),
            tensor_steps,
            params,
            buffers,
            momentum_started=started if optimizer == "sgd" else None,
        )
        restored = self.client.restore(self.session_id, checkpoint.encode(cp))
        self._optimizer = optimizer
        self._sent = [self._hyperparams(g) for g in groups]
        self._version += 1
        self._copy_in(restored["step"], params)  # what the session holds now (rounded, for a low-precision model)

    def _new_lease(self) -> Lease | None:
        """The lease that deletes a session created here when this optimizer goes (unless kept or named)."""
        return None if self._keep else Lease(self, self.client.url, self.client.credentials, self.session_id)

    def close(self, delete: bool | None = None) -> None:
        """Release the connection. The session is deleted on the server if this optimizer created it without a
        name and without ``keep=True`` (``delete=None``), or whenever ``delete`` is True; ``False`` keeps it.
        A step in flight is written in first; its error, if it failed, is raised after the release."""
        try:
            self._inflight.settle()
        finally:
            self._inflight.close()
            settle(self._lease, self.client, self.session_id, delete)
            if self._owns_client:
                self.client.close()

    # --- copies -------------------------------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> _RemoteOptimizer:
        """An independent optimizer over copies of the parameters, on a new session holding a copy of this one's
        state (its checkpoint, imported under a new id). A client passed in is shared, an own client is not."""
        self._inflight.settle()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("client", "_handed", "session_id", "_lease", "_snapshot", "_flat_key", "_flat_targets"):
                setattr(new, key, copy.deepcopy(value, memo))
        new._handed = None
        new._snapshot, new._flat_key, new._flat_targets = {}, None, []
        if self._owns_client:
            new.client = Client(self.client.url, timeout=self._timeout, retry=self._retry)
            new.client.credentials.default = self.client.credentials.default
        else:
            new.client = self.client
        new.session_id = uuid.uuid4().hex
        token = self.client.credentials.sessions.get(self.session_id)
        if token is not None:  # the checkpoint carries the token's digest: the same token opens the copy
            new.client.use_token(new.session_id, token)
        info = new.client.restore(new.session_id, self.client.checkpoint(self.session_id))
        new._step_count = info["step"]
        new._lease = new._new_lease()  # the copy's session is its own, an anonymous one
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"cannot pickle (or copy.copy) {type(self).__name__}: its state lives in session {self.session_id!r} "
            "on the server; save optimizer.state_dict() instead (torch.save works on it), or copy.deepcopy it"
        )


class _AdamFamily(_RemoteOptimizer):
    _twin: type[Optimizer] = torch.optim.Adam
    _server_hps = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "eps_root")
    _buffers = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _setstate_defaults = {
        "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "decoupled_weight_decay": False, "fused": None, "eps_root": 0.0,
    }  # fmt: skip

    def _server_optimizer(self, groups: list[dict[str, Any]]) -> str:
        decoupled = {bool(g.get("decoupled_weight_decay", False)) for g in groups}
        if len(decoupled) > 1:
            raise ValueError(
                f"{type(self).__name__} steps every group with decoupled weight decay or none: the parameter groups "
                "mix decoupled_weight_decay True and False"
            )
        return "adamw" if decoupled == {True} else "adam"

    def _required_buffers(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return self._buffers if group["amsgrad"] else self._buffers[:2]


class RemoteAdam(_AdamFamily):
    """``torch.optim.Adam`` with its state on the server (``decoupled_weight_decay=True`` makes it AdamW)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        eps_root: float = 0.0,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        twin = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach,
                    maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused,
                    decoupled_weight_decay=decoupled_weight_decay)  # fmt: skip
        optimizer = "adamw" if decoupled_weight_decay else "adam"
        super().__init__(params, twin, optimizer, dict(remote), {"eps_root": eps_root})


class RemoteAdamW(_AdamFamily):
    """``torch.optim.AdamW`` with its state on the server."""

    _twin = torch.optim.AdamW

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        eps_root: float = 0.0,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        twin = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                    foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused)  # fmt: skip
        super().__init__(params, twin, "adamw", dict(remote), {"eps_root": eps_root})

    def _loaded_group(self, group: dict[str, Any]) -> None:
        group["decoupled_weight_decay"] = True  # as torch's AdamW.__setstate__


class RemoteSGD(_RemoteOptimizer):
    """``torch.optim.SGD`` with its state on the server."""

    _twin = torch.optim.SGD
    _server_hps = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _buffers = ("momentum_buffer",)
    _setstate_defaults = {
        "nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False,
    }  # fmt: skip

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        twin = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                    maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)  # fmt: skip
        super().__init__(params, twin, "sgd", dict(remote))

    def _required_buffers(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return self._buffers if group["momentum"] != 0 else ()


class RemoteRMSprop(_RemoteOptimizer):
    """``torch.optim.RMSprop`` with its state on the server."""

    _twin = torch.optim.RMSprop
    _server_hps = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
    _buffers = ("square_avg", "momentum_buffer", "grad_avg")
    _setstate_defaults = {
        "momentum": 0, "centered": False, "foreach": None, "maximize": False, "differentiable": False,
        "capturable": False,
    }  # fmt: skip

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        twin = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                    centered=centered, capturable=capturable, foreach=foreach, maximize=maximize,
                    differentiable=differentiable)  # fmt: skip
        super().__init__(params, twin, "rmsprop", dict(remote))

    def _required_buffers(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        return ("square_avg", *(("momentum_buffer",) if group["momentum"] > 0 else ()),
                *(("grad_avg",) if group["centered"] else ()))  # fmt: skip


class RemoteRAdam(_RemoteOptimizer):
    """``torch.optim.RAdam`` with its state on the server (``decoupled_weight_decay`` per group, as in torch)."""

    _twin = torch.optim.RAdam
    _server_hps = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize")
    _buffers = ("exp_avg", "exp_avg_sq")
    _setstate_defaults = {
        "foreach": None, "maximize": False, "differentiable": False, "decoupled_weight_decay": False,
        "capturable": False,
    }  # fmt: skip

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        twin = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                    decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, maximize=maximize,
                    capturable=capturable, differentiable=differentiable)  # fmt: skip
        super().__init__(params, twin, "radam", dict(remote))


class RemoteNAdam(_RemoteOptimizer):
    """``torch.optim.NAdam`` with its state on the server (``momentum_decay`` and ``decoupled_weight_decay`` per
    group, as in torch; each parameter's ``mu_product`` is a 0-d tensor, as torch's)."""

    _twin = torch.optim.NAdam
    _server_hps = ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "maximize")
    _buffers = ("exp_avg", "exp_avg_sq", "mu_product")
    _setstate_defaults = {
        "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "decoupled_weight_decay": False,
    }  # fmt: skip

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        twin = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                    decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, maximize=maximize,
                    capturable=capturable, differentiable=differentiable)  # fmt: skip
        super().__init__(params, twin, "nadam", dict(remote))

    def _state_shape(self, buffer: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return () if buffer == "mu_product" else shape

    def _fresh(self, buffer: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.ones((), np.float32) if buffer == "mu_product" else np.zeros(shape, np.float32)


class RemoteAdafactor(_RemoteOptimizer):
    """``torch.optim.Adafactor`` with its state on the server: a tensor of two dimensions or more keeps its row and
    column factors (``row_var`` (..., R, 1), ``col_var`` (..., 1, C)), a smaller one its ``variance``, as torch."""

    _twin = torch.optim.Adafactor
    _server_hps = ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize")
    _buffers = ("row_var", "col_var", "variance")
    _setstate_defaults = {"foreach": None}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        twin = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                    maximize=maximize)  # fmt: skip
        super().__init__(params, twin, "adafactor", dict(remote))

    def _state_shape(self, buffer: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        factored = len(shape) > 1
        if buffer == "row_var":
            return (*shape[:-1], 1) if factored else (0,)
        if buffer == "col_var":
            return (*shape[:-2], 1, shape[-1]) if factored else (0,)
        return (0,) if factored else shape

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for p in self._params:
            if p.grad is not None and p.is_complex():
                raise RuntimeError("Adafactor does not support complex parameters")  # torch's words, at its step
        return super().step(closure)
