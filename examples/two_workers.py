"""Two worker processes train one model through one optserve session (a parameter server).

    python examples/two_workers.py                  # starts a server in this process
    python examples/two_workers.py --url http://127.0.0.1:8000 --steps 200

The session accumulates k=2 gradient contributions per step: each worker computes the gradient of its own half of
the data and sends it; the first answer is 202 (one more awaited), the second applies one AdamW step on the average,
and both workers continue from the same parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_numpy import forward_backward, init, server_url, spirals  # noqa: E402  (the model and data of train_numpy.py)

from optserve.client import Client, RemoteOptimizer  # noqa: E402


def worker(rank: int, url: str, session_id: str, steps: int, results: mp.Queue) -> None:
    x, y = spirals()
    x, y = x[rank::2], y[rank::2]  # this worker's half of the data
    params = {name: np.zeros_like(value) for name, value in init(64, 3).items()}
    with RemoteOptimizer(params, url=url, session_id=session_id) as opt:  # attaches: copies the server's params in
        for step in range(1, steps + 1):
            loss, accuracy, grads = forward_backward(params, x, y)
            opt.step(grads)  # returns once the other worker's contribution completed the step
            if step % max(1, steps // 5) == 0 or step == steps:
                results.put(("progress", rank, step, loss, accuracy))
        results.put(("done", rank, opt.step_count, {k: v.copy() for k, v in params.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description="Two processes, one session, accumulate=2.")
    parser.add_argument("--url", help="optserve server (default: start one in this process)")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = server_url(stack, args.url)
        client = stack.enter_context(Client(url))
        info = client.create_session(init(64, 3), "adamw", hyperparams={"lr": 0.02, "weight_decay": 1e-3}, accumulate=2)
        print(f"session {info['id']}: accumulate={info['accumulate']}, {info['num_params']} parameters")

        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        workers = [ctx.Process(target=worker, args=(rank, url, info["id"], args.steps, results)) for rank in (0, 1)]
        for w in workers:
            w.start()
        finals = {}
        while len(finals) < 2:
            message = results.get(timeout=300)
            if message[0] == "progress":
                _, rank, step, loss, accuracy = message
                print(f"worker {rank}  step {step:4d}  loss on its half {loss:.4f}  accuracy {accuracy:.3f}")
            else:
                _, rank, step_count, params = message
                finals[rank] = (step_count, params)
        for w in workers:
            w.join(timeout=30)

        server_info = client.session(info["id"])
        same = all(np.array_equal(finals[0][1][k], finals[1][1][k]) for k in finals[0][1])
        x, y = spirals()
        loss, accuracy, _ = forward_backward(finals[0][1], x, y)
        print(
            f"server step {server_info['step']} ({server_info['counters']['contributions']} contributions waited "
            f"for a partner); workers at steps {finals[0][0]} and {finals[1][0]}; identical params: {same}"
        )
        print(f"full data: loss {loss:.4f}, accuracy {accuracy:.3f}")
        client.delete_session(info["id"])
        if not same or server_info["step"] != args.steps or any(code for code in (w.exitcode for w in workers)):
            sys.exit(1)


if __name__ == "__main__":
    main()
