"""Optimizer math: torch parity, fused == reference bit for bit, read-only gradients, defaults and validation.

Three implementations of every configuration are run on the same random problem (several tensor shapes, two
parameter groups with different ``lr`` and ``weight_decay``, gradients depending on the parameters):

- ``torch.optim`` (the specification),
- each algorithm's reference form (one tensor at a time),
- its fast forms through :mod:`optserve.service.fused` (one flat float32 buffer per state laid out by the
  algorithm's state shapes, one ``step_run`` call per group), on both backends.

Every algorithm of the registry (:mod:`optserve.service.algorithms`) must have configurations here: the lists below
are checked against it, so a new algorithm cannot go untested.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from optserve.service import fused, kernels, reference
from optserve.service.algorithms import ALGORITHMS
from optserve.service.hyperparams import HyperparamError, make_hyperparams
from optserve.service.layout import FlatLayout


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test of the fast path runs on both backends: the numba kernels and the chunked numpy fallback."""
    if request.param == "numba" and not kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(fused, "BACKEND", request.param)
    return str(request.param)


TORCH_CLASSES = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "radam": torch.optim.RAdam,
    "nadam": torch.optim.NAdam,
    "adafactor": torch.optim.Adafactor,
}

# Learning rates of group 0 and group 1, per optimizer.
GROUP_LRS = {
    "adam": (1e-2, 3e-3),
    "adamw": (1e-2, 3e-3),
    "sgd": (5e-2, 2e-2),
    "rmsprop": (1e-2, 3e-3),
    "radam": (1e-2, 3e-3),
    "nadam": (1e-2, 3e-3),
    "adafactor": (1e-2, 3e-3),
}

# (optimizer, values shared by both groups). When weight_decay is given, group 1 uses three times that value.
CONFIGS = [
    pytest.param("adam", {}, id="adam"),
    pytest.param("adam", {"weight_decay": 0.05}, id="adam-l2"),
    pytest.param("adam", {"amsgrad": True, "betas": [0.8, 0.99]}, id="adam-amsgrad"),
    pytest.param("adam", {"maximize": True}, id="adam-maximize"),
    pytest.param("adamw", {"weight_decay": 0.05}, id="adamw"),
    pytest.param("adamw", {"weight_decay": 0.05, "amsgrad": True}, id="adamw-amsgrad"),
    pytest.param("sgd", {}, id="sgd"),
    pytest.param("sgd", {"momentum": 0.9, "dampening": 0.3}, id="sgd-momentum-dampening"),
    pytest.param("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05}, id="sgd-nesterov-l2"),
    pytest.param("sgd", {"maximize": True}, id="sgd-maximize"),
    pytest.param("rmsprop", {}, id="rmsprop"),
    pytest.param("rmsprop", {"momentum": 0.9}, id="rmsprop-momentum"),
    pytest.param(
        "rmsprop",
        {"centered": True, "momentum": 0.9, "weight_decay": 0.05},
        id="rmsprop-centered-momentum-l2",
    ),
    pytest.param("rmsprop", {"maximize": True}, id="rmsprop-maximize"),
    pytest.param("radam", {}, id="radam"),
    pytest.param("radam", {"weight_decay": 0.05, "betas": [0.8, 0.95]}, id="radam-l2"),
    pytest.param("radam", {"weight_decay": 0.05, "decoupled_weight_decay": True}, id="radam-decoupled"),
    pytest.param("radam", {"maximize": True, "betas": [0.9, 0.9]}, id="radam-maximize-rectified-early"),
    pytest.param("nadam", {}, id="nadam"),
    pytest.param("nadam", {"weight_decay": 0.05, "momentum_decay": 0.01}, id="nadam-l2-momentum_decay"),
    pytest.param("nadam", {"weight_decay": 0.05, "decoupled_weight_decay": True}, id="nadam-decoupled"),
    pytest.param("nadam", {"maximize": True, "betas": [0.8, 0.99]}, id="nadam-maximize"),
    pytest.param("adafactor", {}, id="adafactor"),
    pytest.param("adafactor", {"weight_decay": 0.05, "d": 2.0}, id="adafactor-decay-d"),
    pytest.param("adafactor", {"beta2_decay": -0.5, "eps": [1e-20, 1e-2]}, id="adafactor-beta2_decay-eps"),
    pytest.param("adafactor", {"maximize": True}, id="adafactor-maximize"),
]

EPS_ROOT_CONFIGS = [
    pytest.param("adam", {"eps_root": 1e-3}, id="adam-eps_root"),
    pytest.param("adamw", {"eps_root": 1e-3, "weight_decay": 0.05, "amsgrad": True}, id="adamw-amsgrad-eps_root"),
]


def test_every_registered_algorithm_is_tested():
    """The parity, bit-for-bit, read-only and defaults tests below are generated from these lists: each algorithm
    of the registry must be in all of them (a new one fails here until it has its configurations)."""
    assert set(TORCH_CLASSES) == set(ALGORITHMS)
    assert set(GROUP_LRS) == set(ALGORITHMS)
    assert {p.values[0] for p in CONFIGS} == set(ALGORITHMS)
    assert {optimizer for optimizer, _ in READ_ONLY_CONFIGS} >= set(ALGORITHMS) - {"adamw"}


SMALL_SHAPES = [(7, 5), (13,), (3, 4, 2), ()]
SMALL_GROUPS = [[0, 1], [2, 3]]  # tensor indices of each parameter group, in flat-buffer order


def group_values(optimizer: str, values: dict) -> list[dict]:
    """Per-group hyperparameter values: different lr always, different weight_decay when there is any."""
    groups = []
    for gi, lr in enumerate(GROUP_LRS[optimizer]):
        v = {**values, "lr": lr}
        if "weight_decay" in v:
            v["weight_decay"] = values["weight_decay"] * (1 + 2 * gi)
        groups.append(v)
    return groups


def make_problem(shapes, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    noise = [[np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes] for _ in range(steps)]
    return params, noise


def gradient(p: np.ndarray, noise: np.ndarray, maximize: bool) -> np.ndarray:
    """A float32 gradient that depends on p; the p term has the sign that keeps the trajectory bounded."""
    coef = np.float32(-0.1 if maximize else 0.1)
    return np.asarray(p * coef + noise, dtype=np.float32)


def tensor_hps(optimizer, groups, gvalues):
    hps = [make_hyperparams(optimizer, v) for v in gvalues]
    return {i: hps[gi] for gi, grp in enumerate(groups) for i in grp}


def initial_state(optimizer: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    algorithm = ALGORITHMS[optimizer]
    return np.full(algorithm.state_shape(name, shape), algorithm.initial.get(name, 0.0), np.float32)


def run_reference(optimizer, groups, gvalues, params, noise):
    hp_of = tensor_hps(optimizer, groups, gvalues)
    ps = [p.copy() for p in params]
    states = [
        {name: initial_state(optimizer, name, p.shape) for name in hp_of[i].state_names()} for i, p in enumerate(ps)
    ]
    for t, step_noise in enumerate(noise, start=1):
        for i in range(len(ps)):
            g = gradient(ps[i], step_noise[i], hp_of[i].maximize)
            new_p, new_state = reference.step(optimizer, ps[i], g, states[i], t, hp_of[i])
            ps[i] = np.asarray(new_p, dtype=np.float32)
            states[i] = {k: np.asarray(v, dtype=np.float32) for k, v in new_state.items()}
    return ps, states


def run_fused(optimizer, groups, gvalues, params, noise):
    """Lay the tensors out group by group in flat buffers (each state buffer in the algorithm's own shapes); one
    read-only gradient and one step_run per group, as a session steps."""
    algorithm = ALGORITHMS[optimizer]
    hps = [make_hyperparams(optimizer, v) for v in gvalues]
    group_of = {i: gi for gi, grp in enumerate(groups) for i in grp}
    layout = FlatLayout([(str(i), p.shape, group_of[i]) for i, p in enumerate(params)])
    state_layouts = {name: layout.for_state(algorithm.state_shape, name) for name in algorithm.buffers}
    flat_p = layout.flatten({str(i): p for i, p in enumerate(params)})
    names = sorted({name for hp in hps for name in hp.state_names()})
    state = {
        name: np.full(state_layouts[name].size, algorithm.initial.get(name, 0.0), dtype=np.float32) for name in names
    }
    maximize = np.zeros(layout.size, dtype=bool)
    for gi, hp in enumerate(hps):
        start, stop = layout.group_ranges[gi]
        maximize[start:stop] = hp.maximize
    for t, step_noise in enumerate(noise, start=1):
        flat_noise = layout.flatten({str(i): n for i, n in enumerate(step_noise)})
        flat_g = np.where(maximize, gradient(flat_p, flat_noise, True), gradient(flat_p, flat_noise, False)).astype(
            np.float32
        )
        flat_g.setflags(write=False)
        for gi, hp in enumerate(hps):
            start, stop = layout.group_ranges[gi]
            fused.step_run(optimizer, flat_p, flat_g, state, layout, state_layouts, start, stop, t, hp)

    views = layout.views(flat_p)
    ps = [views[str(i)].copy() for i in range(len(params))]
    hp_of = tensor_hps(optimizer, groups, gvalues)
    state_views = {name: state_layouts[name].views(buf) for name, buf in state.items()}
    states = [{name: state_views[name][str(i)].copy() for name in hp_of[i].state_names()} for i in range(len(params))]
    return ps, states


def run_torch(optimizer, groups, gvalues, params, noise):
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    param_groups = []
    for grp, v in zip(groups, gvalues):
        kw = {k: tuple(x) if k == "betas" else x for k, x in v.items()}
        param_groups.append({"params": [tparams[i] for i in grp], **kw})
    opt = TORCH_CLASSES[optimizer](param_groups)
    maximize = {i: bool(v.get("maximize", False)) for grp, v in zip(groups, gvalues) for i in grp}
    for step_noise in noise:
        for i, tp in enumerate(tparams):
            tp.grad = torch.from_numpy(gradient(tp.detach().numpy(), step_noise[i], maximize[i]))
        opt.step()
    ps = [tp.detach().numpy().copy() for tp in tparams]
    states = [
        {k: v.detach().numpy().copy() for k, v in opt.state[tp].items() if k != "step" and v is not None}
        for tp in tparams
    ]
    return ps, states


def assert_close_to_torch(label, ours, theirs):
    (ps, states), (tps, tstates) = ours, theirs
    for i, (p, tp) in enumerate(zip(ps, tps)):
        np.testing.assert_allclose(p, tp, rtol=1e-5, atol=1e-6, err_msg=f"{label}: param {i}")
    for i, (s, ts) in enumerate(zip(states, tstates)):
        s = {k: v for k, v in s.items() if v.shape != (0,)}  # an entry this tensor keeps none of (Adafactor's)
        assert set(s) == set(ts), f"{label}: state names of tensor {i}: {sorted(s)} vs torch {sorted(ts)}"
        for name in s:
            np.testing.assert_allclose(s[name], ts[name], rtol=1e-5, atol=1e-6, err_msg=f"{label}: {name} of {i}")


def assert_bitwise_equal(ours, theirs):
    (ps, states), (rps, rstates) = ours, theirs
    for i, (p, rp) in enumerate(zip(ps, rps)):
        assert p.dtype == rp.dtype == np.float32
        assert np.array_equal(p, rp), f"param {i}: max abs diff {np.max(np.abs(p - rp))}"
    for i, (s, rs) in enumerate(zip(states, rstates)):
        assert set(s) == set(rs)
        for name in s:
            assert np.array_equal(s[name], rs[name]), (
                f"{name} of tensor {i}: max diff {np.max(np.abs(s[name] - rs[name]))}"
            )


# 1. torch parity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("optimizer", "values"), CONFIGS)
def test_reference_and_fused_match_torch(optimizer, values):
    gvalues = group_values(optimizer, values)
    assert gvalues[0]["lr"] != gvalues[1]["lr"]
    params, noise = make_problem(SMALL_SHAPES, steps=200, seed=0)
    theirs = run_torch(optimizer, SMALL_GROUPS, gvalues, params, noise)
    # The problem actually moved (so a no-op optimizer could not pass).
    assert max(np.max(np.abs(p - p0)) for p, p0 in zip(theirs[0], params)) > 1e-2
    assert_close_to_torch("reference", run_reference(optimizer, SMALL_GROUPS, gvalues, params, noise), theirs)
    assert_close_to_torch("fused", run_fused(optimizer, SMALL_GROUPS, gvalues, params, noise), theirs)


# 2. fused == reference, bit for bit ------------------------------------------------------------------------------

BIG_SHAPES = [(7, 5), (3 * fused.CHUNK + 5,), (13,), ()]
BIG_GROUPS = [[0], [1, 2, 3]]  # group 1 starts at offset 35 and spans more than three chunks


@pytest.mark.parametrize(("optimizer", "values"), CONFIGS + EPS_ROOT_CONFIGS)
@pytest.mark.parametrize(
    ("shapes", "groups"),
    [(SMALL_SHAPES, SMALL_GROUPS), (BIG_SHAPES, BIG_GROUPS)],
    ids=["small", "multi-chunk"],
)
def test_fused_matches_reference_bitwise(optimizer, values, shapes, groups):
    gvalues = group_values(optimizer, values)
    steps = 50 if shapes is SMALL_SHAPES else 8
    params, noise = make_problem(shapes, steps=steps, seed=1)
    assert_bitwise_equal(
        run_fused(optimizer, groups, gvalues, params, noise),
        run_reference(optimizer, groups, gvalues, params, noise),
    )


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_eps_root_one_step_formula(optimizer):
    lr, eps, eps_root, wd, (b1, b2) = 0.1, 1e-8, 0.25, 0.1, (0.9, 0.999)
    values = {"lr": lr, "eps": eps, "eps_root": eps_root, "weight_decay": wd, "betas": [b1, b2]}
    params, noise = make_problem([(50,)], steps=1, seed=2)
    groups = [[0]]
    ref = run_reference(optimizer, groups, [values], params, noise)[0][0]
    fus = run_fused(optimizer, groups, [values], params, noise)[0][0]
    assert np.array_equal(ref, fus)

    p = params[0].astype(np.float64)
    g = gradient(params[0], noise[0][0], False).astype(np.float64)
    if optimizer == "adamw":
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m, v = (1 - b1) * g, (1 - b2) * g * g
    bc1, bc2 = 1 - b1, 1 - b2
    expected = p - lr / bc1 * m / (np.sqrt(v / bc2 + eps_root) + eps)
    np.testing.assert_allclose(ref, expected, rtol=1e-5)
    np.testing.assert_allclose(fus, expected, rtol=1e-5)
    # eps_root matters here: without it the result is clearly different.
    no_root = run_reference(optimizer, groups, [{**values, "eps_root": 0.0}], params, noise)[0][0]
    assert not np.allclose(no_root, expected, rtol=1e-3)


# 3. the gradient is only read ------------------------------------------------------------------------------------

READ_ONLY_CONFIGS = [
    ("adam", {}),
    ("adam", {"amsgrad": True}),
    ("adamw", {}),
    ("sgd", {}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", {}),
    ("rmsprop", {"momentum": 0.9, "centered": True}),
    ("radam", {}),
    ("radam", {"decoupled_weight_decay": True, "betas": [0.9, 0.9]}),
    ("nadam", {}),
    ("nadam", {"decoupled_weight_decay": True, "momentum_decay": 0.01}),
    ("adafactor", {}),
]


@pytest.mark.parametrize("maximize_and_decay", [True, False], ids=["maximize-wd", "plain"])
@pytest.mark.parametrize(
    ("optimizer", "values"), READ_ONLY_CONFIGS, ids=lambda x: x if isinstance(x, str) else "-".join(x) or "-"
)
def test_fused_never_writes_the_gradient(optimizer, values, maximize_and_decay):
    if maximize_and_decay:
        values = {**values, "maximize": True, "weight_decay": 0.1}
    elif optimizer == "adamw":
        values = {**values, "weight_decay": 0.0}
    hp = make_hyperparams(optimizer, values)
    n = fused.CHUNK + 7
    shape = (7, n // 7) if not ALGORITHMS[optimizer].elementwise else (n,)  # a 2-D tensor for factored state
    n = int(np.prod(shape))
    rng = np.random.default_rng(3)
    p = rng.standard_normal(n).astype(np.float32)
    layout = FlatLayout([("w", shape, 0)])
    layouts = {name: layout.for_state(ALGORITHMS[optimizer].state_shape, name) for name in hp.state_names()}
    state = {name: initial_state(optimizer, name, shape).reshape(-1) for name in hp.state_names()}
    ref_p = p.reshape(shape).copy()
    ref_state = {k: v.reshape(layouts[k].slots[0].shape).copy() for k, v in state.items()}
    for t in (1, 2, 3):
        g = rng.standard_normal(n).astype(np.float32)
        g_copy = g.copy()
        g.setflags(write=False)
        fused.step_run(optimizer, p, g, state, layout, layouts, 0, n, t, hp)  # raises if it writes into g
        assert np.array_equal(g, g_copy)
        ref_p, ref_state = reference.step(optimizer, ref_p, g_copy.reshape(shape), ref_state, t, hp)
    assert np.array_equal(p, ref_p.reshape(-1))
    for name in state:
        assert np.array_equal(state[name], np.asarray(ref_state[name]).reshape(-1))


# 4. defaults ---------------------------------------------------------------------------------------------------

DEFAULT_KEYS = {
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "momentum",
    "dampening",
    "nesterov",
    "alpha",
    "centered",
    "decoupled_weight_decay",
    "momentum_decay",
    "beta2_decay",
    "d",
}
# torch's Adam spells decoupled weight decay with a flag; here it is the optimizer's name (adam or adamw)
NAMED_BY_OPTIMIZER = {"adam": {"decoupled_weight_decay"}, "adamw": {"decoupled_weight_decay"}}


@pytest.mark.parametrize("optimizer", sorted(TORCH_CLASSES))
def test_defaults_equal_torch(optimizer):
    torch_defaults = TORCH_CLASSES[optimizer]([torch.nn.Parameter(torch.zeros(1))]).defaults
    ours = dataclasses.asdict(make_hyperparams(optimizer))
    # Every hyperparameter we serve exists in torch (except eps_root, ours) and vice versa, among DEFAULT_KEYS.
    assert set(ours) - {"eps_root"} == set(torch_defaults) & DEFAULT_KEYS - NAMED_BY_OPTIMIZER.get(optimizer, set())
    for key in set(ours) - {"eps_root"}:
        theirs = torch_defaults[key]
        if key == "betas":
            theirs = tuple(theirs)
        assert ours[key] == theirs, f"{optimizer}.{key}: ours {ours[key]!r}, torch {theirs!r}"
        assert type(ours[key]) is type(theirs) or not isinstance(theirs, bool), key
    if "eps_root" in ours:
        assert ours["eps_root"] == 0.0


# 5. validation -------------------------------------------------------------------------------------------------

INVALID = [
    ("adam", {"lr": -0.1}, r"learning rate \(lr\).*-0\.1"),
    ("sgd", {"lr": -1}, r"learning rate \(lr\)"),
    ("rmsprop", {"lr": -1e-3}, r"learning rate \(lr\)"),
    ("adam", {"betas": [1.0, 0.999]}, r"betas\[0\].*\[0, 1\)"),
    ("adamw", {"betas": [-0.1, 0.9]}, r"betas\[0\].*\[0, 1\)"),
    ("adam", {"betas": [0.9, 1.0]}, r"betas\[1\].*\[0, 1\)"),
    ("adam", {"betas": [0.9]}, r"betas must be a pair"),
    ("adam", {"betas": [0.9, 0.99, 0.999]}, r"betas must be a pair"),
    ("adam", {"betas": 0.9}, r"betas must be a pair"),
    ("adam", {"eps": -1e-8}, r"epsilon \(eps\)"),
    ("rmsprop", {"eps": -1.0}, r"epsilon \(eps\)"),
    ("adam", {"eps_root": -1e-8}, r"eps_root"),
    ("adam", {"weight_decay": -0.01}, r"weight_decay.*>= 0"),
    ("adamw", {"weight_decay": -0.01}, r"weight_decay.*>= 0"),
    ("sgd", {"weight_decay": -0.01}, r"weight_decay.*>= 0"),
    ("rmsprop", {"weight_decay": -0.01}, r"weight_decay.*>= 0"),
    ("sgd", {"momentum": -0.5}, r"momentum"),
    ("rmsprop", {"alpha": -0.5}, r"alpha"),
    ("adam", {"lr": float("nan")}, r"learning rate \(lr\) must be finite"),
    ("sgd", {"lr": float("inf")}, r"must be finite"),
    ("adam", {"betas": [float("nan"), 0.9]}, r"must be finite"),
    ("adam", {"lrr": 1}, r"unknown hyperparameter.*lrr.*known:.*\blr\b"),
    ("sgd", {"betas": [0.9, 0.999]}, r"unknown hyperparameter.*betas"),
    ("rmsprop", {"eps_root": 0.0}, r"unknown hyperparameter.*eps_root"),
    ("adam", {"lr": True}, r"lr must be a number"),
    ("sgd", {"momentum": False}, r"momentum must be a number"),
    ("adam", {"betas": [True, 0.9]}, r"betas must be a number"),
    ("adam", {"lr": "0.1"}, r"lr must be a number.*'0\.1'"),
    ("adam", {"amsgrad": 1}, r"amsgrad must be true or false"),
    ("sgd", {"nesterov": "yes"}, r"nesterov must be true or false"),
    ("sgd", {"nesterov": True}, r"Nesterov momentum requires a momentum > 0"),
    ("sgd", {"nesterov": True, "momentum": 0.0}, r"Nesterov momentum requires a momentum > 0"),
    ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, r"zero dampening"),
    ("radam", {"betas": [0.9, 1.0]}, r"betas\[1\].*\[0, 1\)"),
    ("radam", {"decoupled_weight_decay": 1}, r"decoupled_weight_decay must be true or false"),
    ("nadam", {"momentum_decay": -0.1}, r"momentum_decay.*>= 0"),
    ("nadam", {"eps_root": 0.0}, r"unknown hyperparameter.*eps_root"),
    ("adafactor", {"beta2_decay": 0.5}, r"beta2_decay.*<= 0"),
    ("adafactor", {"d": 0.5}, r"clipping threshold \(d\).*>= 1"),
    ("adafactor", {"eps": [-1e-3, 1e-3]}, r"epsilon1"),
    ("adafactor", {"eps": [None, None]}, r"eps must be a number"),
    ("adafactor", {"eps": [1e-30]}, r"eps must be a pair"),
    ("adafactor", {"betas": [0.9, 0.99]}, r"unknown hyperparameter.*betas"),
]


@pytest.mark.parametrize(("optimizer", "values", "match"), INVALID)
def test_invalid_hyperparameters_rejected(optimizer, values, match):
    with pytest.raises(HyperparamError, match=match):
        make_hyperparams(optimizer, values)


def test_unknown_optimizer_rejected():
    with pytest.raises(HyperparamError, match=r"unknown optimizer 'adagrad'.*adam, adamw, sgd, rmsprop"):
        make_hyperparams("adagrad")
    assert issubclass(HyperparamError, ValueError)


def test_optimizer_name_is_case_insensitive():
    assert make_hyperparams("AdamW") == make_hyperparams("adamw")


def test_base_inheritance():
    base = make_hyperparams("adam", {"lr": 0.1, "betas": [0.8, 0.9], "weight_decay": 0.01, "amsgrad": True})
    group = make_hyperparams("adam", {"lr": 0.5, "eps": 1e-6}, base=base)
    assert group.lr == 0.5 and group.eps == 1e-6  # overridden
    assert group.betas == (0.8, 0.9) and group.weight_decay == 0.01 and group.amsgrad is True  # inherited
    assert base.lr == 0.1 and base.eps == 1e-8  # the base is untouched
    assert make_hyperparams("adam", {}, base=base) == base
    assert make_hyperparams("adam", None, base=base) == base
    # adamw's default weight_decay applies without a base, but a base's explicit value wins.
    assert make_hyperparams("adamw").weight_decay == 1e-2
    assert make_hyperparams("adamw", {"lr": 0.2}, base=make_hyperparams("adamw", {"weight_decay": 0})).weight_decay == 0
    # Overrides on top of a base are still validated.
    with pytest.raises(HyperparamError, match=r"learning rate"):
        make_hyperparams("adam", {"lr": -1.0}, base=base)
    with pytest.raises(HyperparamError, match=r"unknown hyperparameter.*lrr"):
        make_hyperparams("adam", {"lrr": 1.0}, base=base)
    sgd_base = make_hyperparams("sgd", {"momentum": 0.9, "nesterov": True})
    with pytest.raises(HyperparamError, match=r"Nesterov"):
        make_hyperparams("sgd", {"momentum": 0.0}, base=sgd_base)
    assert make_hyperparams("sgd", {"lr": 0.3}, base=sgd_base).nesterov is True


def test_adafactor_eps1_may_be_null_and_is_echoed_as_given():
    hp = make_hyperparams("adafactor", {"eps": [None, 1e-2]})
    assert hp.eps == (None, 1e-2)
    assert make_hyperparams("adafactor", {"eps": [1e-30, 1e-3]}).eps == (1e-30, 1e-3)


def test_betas_list_becomes_tuple():
    assert make_hyperparams("adam", {"betas": [0.5, 0.6]}).betas == (0.5, 0.6)
    assert make_hyperparams("adam", {"lr": 1}).lr == 1.0 and isinstance(make_hyperparams("adam", {"lr": 1}).lr, float)


@pytest.mark.parametrize(("optimizer", "values"), CONFIGS)
@pytest.mark.parametrize("threads", [2, 3])
def test_kernel_split_over_threads_gives_the_same_bits(backend, optimizer, values, threads):
    """A range of PARALLEL_MIN or more elements is stepped by several threads (the caller steps the first part):
    bit for bit what one thread computes, including at the boundaries between parts."""
    if backend != "numba":
        pytest.skip("the split is the numba backend's")
    if not ALGORITHMS[optimizer].elementwise:
        pytest.skip("only an elementwise algorithm's range is split (the others step tensor by tensor)")
    hp = make_hyperparams(optimizer, values)
    n = kernels.PARALLEL_MIN + 4099
    rng = np.random.default_rng(7)
    start_params = rng.standard_normal(n).astype(np.float32)
    results = []
    for split in (1, threads):
        params = start_params.copy()
        state = {name: np.zeros(n, np.float32) for name in hp.state_names()}
        for t in range(1, 4):
            grads = np.random.default_rng(t).standard_normal(n).astype(np.float32)
            kernels.step_range(optimizer, params, grads, state, 5, n - 3, t, hp, 0.5, threads=split)
        results.append((params, state))
    (p1, s1), (p2, s2) = results
    assert np.array_equal(p1, p2)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert np.array_equal(p1[:5], start_params[:5]) and np.array_equal(p1[-3:], start_params[-3:])
