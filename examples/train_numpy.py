"""A two-layer numpy network trained with its AdamW state on an optserve server.

    python examples/train_numpy.py                      # starts a server in this process
    python examples/train_numpy.py --url http://127.0.0.1:8000 --steps 500
    python examples/train_numpy.py --url http://127.0.0.1:8000 --token="$OPTSERVE_API_KEY"   # a server with auth on

Data: three interleaved spirals (generated). Biases get no weight decay (a second parameter group); gradients are
clipped to a global norm of 1 on the server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

import numpy as np

from optserve.client import RemoteOptimizer


def spirals(n_per_class: int = 200, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.normal(0, 0.2, n_per_class)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def init(hidden: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": (rng.standard_normal((2, hidden)) * 0.5).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "W2": (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros(classes, np.float32),
    }


def forward_backward(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float, dict]:
    """Cross-entropy loss, accuracy and gradients of a tanh MLP."""
    h = np.tanh(x @ p["W1"] + p["b1"])
    logits = h @ p["W2"] + p["b2"]
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(prob[np.arange(n), y] + 1e-12).mean())
    accuracy = float((prob.argmax(axis=1) == y).mean())
    d_logits = prob
    d_logits[np.arange(n), y] -= 1
    d_logits /= n
    d_h = (d_logits @ p["W2"].T) * (1 - h**2)
    grads = {"W1": x.T @ d_h, "b1": d_h.sum(0), "W2": h.T @ d_logits, "b2": d_logits.sum(0)}
    return loss, accuracy, {k: v.astype(np.float32) for k, v in grads.items()}


def arguments(description: str, steps: int = 400) -> argparse.ArgumentParser:
    """The options of the examples that train this network: ``--url``, ``--token``, ``--steps``, ``--lr``,
    ``--hidden``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", help="optserve server (default: start one in this process)")
    parser.add_argument(
        "--token",
        default=os.environ.get("OPTSERVE_API_KEY") or None,
        help="admin key of a server with auth on (default: $OPTSERVE_API_KEY)",
    )
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--hidden", type=int, default=64)
    return parser


def server_url(stack: contextlib.ExitStack, url: str | None) -> str:
    """``url``, or the URL of a server started in this process for as long as ``stack`` is open."""
    if url is None:
        from optserve.service.embedded import serve_in_thread

        url = stack.enter_context(serve_in_thread()).url
        print(f"started an optserve server at {url}")
    return url


def remote_adamw(params: dict[str, np.ndarray], url: str, lr: float, **options: Any) -> RemoteOptimizer:
    """AdamW on the server: no weight decay on the biases (a second group), gradients clipped to a norm of 1."""
    return RemoteOptimizer(
        params,
        url=url,
        optimizer="adamw",
        lr=lr,
        weight_decay=1e-3,
        param_groups=[{"params": ["b1", "b2"], "weight_decay": 0.0}],
        max_grad_norm=1.0,
        **options,
    )


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    x, y = spirals()
    params = init(args.hidden, classes=3)
    with contextlib.ExitStack() as stack:
        opt = stack.enter_context(remote_adamw(params, server_url(stack, args.url), args.lr, token=args.token))
        print(f"session {opt.session_id}: {sum(p.size for p in params.values())} parameters, AdamW on the server")
        for step in range(1, args.steps + 1):
            loss, accuracy, grads = forward_backward(params, x, y)
            opt.step(grads)
            if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
                print(f"step {step:5d}  loss {loss:.4f}  accuracy {accuracy:.3f}  grad norm {opt.last.grad_norm:.3f}")
        loss, accuracy, _ = forward_backward(params, x, y)
        print(f"final loss {loss:.4f}, accuracy {accuracy:.3f} after {opt.step_count} server steps")
        opt.close(delete=True)


if __name__ == "__main__":
    main()
