"""A PyTorch classifier of handwritten digits (scikit-learn's bundled 8x8 digits, no download) trained with
``RemoteAdamW``: the only change from a plain torch script is the optimizer line.

    python examples/train_torch.py                 # optimizer state on an optserve server (started here)
    python examples/train_torch.py --local         # the same script on torch.optim.AdamW, to compare the curves
    python examples/train_torch.py --overlap       # RemoteAdamW(overlap=True): the step runs during the next one
    python examples/train_torch.py --compare --plot curves.png   # all three, a table and a plot of the curves
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


def train(kind: str, args: argparse.Namespace, url: str | None) -> list[tuple[float, float]]:
    """One run with the optimizer ``kind`` (local, remote or overlap); (train loss, test accuracy) per epoch."""
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = data()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    steps_per_epoch = -(-len(x_train) // args.batch_size)

    if kind == "local":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-2)
        where = "torch.optim.AdamW (local)"
    else:
        from optserve.client.torch import RemoteAdamW

        overlap = kind == "overlap"
        optimizer = RemoteAdamW(groups, lr=args.lr, weight_decay=1e-2, url=url, overlap=overlap)  # <- the one line
        where = f"RemoteAdamW{'(overlap=True)' if overlap else ''} on {url}, session {optimizer.session_id}"
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    print(f"training with {where}")

    generator = torch.Generator().manual_seed(0)
    step = 0
    curve = []
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
        if kind == "overlap":
            optimizer.synchronize()  # type: ignore[attr-defined]  # the last step in flight, before testing
        with torch.no_grad():
            accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
        print(f"epoch {epoch:2d}  train loss {total / seen:.4f}  test accuracy {accuracy:.3f}")
        curve.append((total / seen, accuracy))
        if args.max_steps is not None and step >= args.max_steps:
            break
    if kind != "local":
        optimizer.close(delete=True)  # type: ignore[attr-defined]
    return curve


def report(curves: dict[str, list[tuple[float, float]]], plot: str | None) -> None:
    """The runs side by side (a markdown table), and a PNG of their loss curves if ``plot`` names a file."""
    print(
        "\n| epoch | " + " | ".join(f"{k} loss" for k in curves) + " | " + " | ".join(f"{k} acc" for k in curves) + " |"
    )
    print("|---" * (1 + 2 * len(curves)) + "|")
    for epoch in range(max(len(c) for c in curves.values())):
        cells = [f"{c[epoch][0]:.4f}" if epoch < len(c) else "" for c in curves.values()]
        cells += [f"{c[epoch][1]:.3f}" if epoch < len(c) else "" for c in curves.values()]
        print(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    print("\nfinal test accuracy: " + ", ".join(f"{k} {c[-1][1]:.3f}" for k, c in curves.items()))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        labels = {"local": "torch.optim.AdamW (local)", "remote": "RemoteAdamW", "overlap": "RemoteAdamW(overlap=True)"}
        styles = {"local": "-", "remote": "--", "overlap": ":"}
        for kind, curve in curves.items():
            epochs = range(1, len(curve) + 1)
            width = 3.5 if kind == "local" else 1.5  # under the remote curve, which it equals
            losses = [loss for loss, _ in curve]
            ax.plot(epochs, losses, styles[kind], linewidth=width, marker="o", markersize=3, label=labels[kind])
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        ax.set_yscale("log")
        ax.set_title("digits MLP: training loss per epoch")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot)
        print(f"plot written to {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Digits classifier with its optimizer state on optserve.")
    parser.add_argument("--url", help="optserve server (default: start one in this process)")
    parser.add_argument("--local", action="store_true", help="use torch.optim.AdamW instead of the server")
    parser.add_argument("--overlap", action="store_true", help="RemoteAdamW(overlap=True): gradients one step stale")
    parser.add_argument("--compare", action="store_true", help="run local, remote and overlap, and compare them")
    parser.add_argument("--plot", help="with --compare: write the three loss curves to this PNG file")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    args = parser.parse_args()
    kinds = (
        ["local", "remote", "overlap"]
        if args.compare
        else ["local" if args.local else "overlap" if args.overlap else "remote"]
    )

    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None and kinds != ["local"]:
            from optserve.service.embedded import serve_in_thread

            url = stack.enter_context(serve_in_thread()).url
            # The server shares this process: keep torch's spinning worker threads off its cores.
            torch.set_num_threads(1)
        curves = {kind: train(kind, args, url) for kind in kinds}
    if args.compare:
        report(curves, args.plot)


if __name__ == "__main__":
    main()
