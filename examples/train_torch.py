"""A PyTorch classifier of handwritten digits (scikit-learn's bundled 8x8 digits, no download) trained with
``RemoteAdamW``: the only change from a plain torch script is the optimizer line.

    python examples/train_torch.py                 # optimizer state on an optserve server (started here)
    python examples/train_torch.py --local         # the same script on torch.optim.AdamW, to compare the curves
    python examples/train_torch.py --url http://127.0.0.1:8000 --epochs 20
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm


def data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return x_train, x_test, y_train, y_test


def main() -> None:
    parser = argparse.ArgumentParser(description="Digits classifier with its optimizer state on optserve.")
    parser.add_argument("--url", help="optserve server (default: start one in this process)")
    parser.add_argument("--local", action="store_true", help="use torch.optim.AdamW instead of the server")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    args = parser.parse_args()

    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = data()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    steps_per_epoch = -(-len(x_train) // args.batch_size)

    with contextlib.ExitStack() as stack:
        if args.local:
            optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-2)
            where = "torch.optim.AdamW (local)"
        else:
            from optserve.client.torch import RemoteAdamW

            url = args.url
            if url is None:
                from optserve.service.embedded import serve_in_thread

                url = stack.enter_context(serve_in_thread()).url
                # The server shares this process: keep torch's spinning worker threads off its cores.
                torch.set_num_threads(1)
            optimizer = RemoteAdamW(groups, lr=args.lr, weight_decay=1e-2, url=url)  # <- the one changed line
            where = f"RemoteAdamW on {url}, session {optimizer.session_id}"
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
        print(f"training with {where}")

        generator = torch.Generator().manual_seed(0)
        step = 0
        for epoch in range(1, args.epochs + 1):
            order = torch.randperm(len(x_train), generator=generator)
            total, seen = 0.0, 0
            bar = tqdm(range(0, len(x_train), args.batch_size), desc=f"epoch {epoch:2d}", leave=False)
            for start in bar:
                idx = order[start : start + args.batch_size]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                step += 1
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if args.max_steps is not None and step >= args.max_steps:
                    break
            with torch.no_grad():
                accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
            print(f"epoch {epoch:2d}  train loss {total / seen:.4f}  test accuracy {accuracy:.3f}")
            if args.max_steps is not None and step >= args.max_steps:
                break
        if not args.local:
            optimizer.close(delete=True)


if __name__ == "__main__":
    main()
