"""What reduced-precision transport costs in accuracy: one training run per wire dtype (float32, bfloat16, float16).

    python examples/wire_dtype.py                      # starts a server in this process
    python examples/wire_dtype.py --url http://127.0.0.1:8000 --steps 800

With ``wire_dtype`` the gradients are sent and the updated parameters come back in half the bytes; the server
keeps float32 master weights and moments, so the rounding never accumulates in the optimizer state: the model
trains on parameters rounded once per step. Same model, data and hyperparameters as ``train_numpy.py``.
"""

from __future__ import annotations

import contextlib

import numpy as np
from train_numpy import arguments, forward_backward, init, remote_adamw, server_url, spirals

DTYPES = ("float32", "bfloat16", "float16")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def train(
    url: str, dtype: str, steps: int, lr: float, hidden: int, token: str | None = None
) -> tuple[float, float, dict[str, np.ndarray]]:
    x, y = spirals()
    params = init(hidden, classes=3)
    with remote_adamw(params, url, lr, wire_dtype=None if dtype == "float32" else dtype, token=token) as opt:
        for _ in range(steps):
            _, _, grads = forward_backward(params, x, y)
            opt.step(grads)
        opt.close(delete=True)
    loss, accuracy, _ = forward_backward(params, x, y)
    return loss, accuracy, params


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    with contextlib.ExitStack() as stack:
        url = server_url(stack, args.url)
        runs = {dtype: train(url, dtype, args.steps, args.lr, args.hidden, args.token) for dtype in DTYPES}
    n = sum(p.size for p in runs["float32"][2].values())
    print(f"{args.steps} AdamW steps of a {n}-parameter network, one run per wire dtype")
    print("| wire dtype | data bytes per step, each way | final loss | accuracy | max abs(param - float32 run) |")
    print("|------------|-------------------------------|------------|----------|------------------------------|")
    for dtype, (loss, accuracy, params) in runs.items():
        drift = max(float(np.abs(params[k] - runs["float32"][2][k]).max()) for k in params)
        print(f"| {dtype:10} | {n * BYTES[dtype]:29d} | {loss:10.4f} | {accuracy:8.3f} | {drift:28.2e} |")


if __name__ == "__main__":
    main()
