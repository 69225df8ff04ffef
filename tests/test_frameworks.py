"""The torch drop-ins inside the training frameworks users run them in: HF Transformers' ``Trainer``, PyTorch
Lightning and accelerate, each on a tiny model built from a config (nothing downloaded), trained side by side with
the ``torch.optim`` twin to the same parameters (rtol 1e-5, atol 1e-6), checkpointed by the framework mid-run, and
resumed from that checkpoint by new objects (model, optimizer, and so a new session) to exactly the parameters of the
uninterrupted run: the optimizer state travels in the framework's checkpoint (``torch.save`` of ``state_dict()``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from optserve.client import Client
from optserve.client.torch import RemoteAdamW
from optserve.service.embedded import EmbeddedServer

pytestmark = pytest.mark.server

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")
accelerate = pytest.importorskip("accelerate")

LR = 5e-3
STEPS = 8  # checkpoints at step 4, resumed from there to step 8


def assert_same_parameters(actual: torch.nn.Module, expected: torch.nn.Module, exact: bool = False) -> None:
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    for (name, a), (_, b) in zip(actual.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.fixture
def no_sessions_left(server: EmbeddedServer) -> Iterator[Client]:
    """A client to the server; the sessions a test creates are gone at its end (deleted by the test; any left over
    fails the test, after being deleted so that the next test starts clean)."""
    with Client(server.url) as client:
        before = {s["id"] for s in client.list_sessions()}
        yield client
        left = {s["id"] for s in client.list_sessions()} - before
        for session_id in left:
            client.delete_session(session_id)
        assert not left, f"sessions left on the server: {sorted(left)}"


# --- HF Transformers Trainer ------------------------------------------------------------------------------------


def tiny_llama() -> torch.nn.Module:
    """A one-layer Llama from a config: 6K parameters, no dropout, no biases."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class TokenDataset(torch.utils.data.Dataset):
    """32 random sequences of 8 tokens, the labels being the inputs (causal language modelling)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 100, (32, 8), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir: Path) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=LR,
        weight_decay=0.01,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )


def hf_train(output_dir: Path, resume: str | None = None, **optimizer: Any) -> tuple[torch.nn.Module, Any]:
    """Train the tiny Llama for STEPS steps (checkpoints every 4) with the Trainer's optimizer arguments, where a
    callable ``optimizers`` makes the optimizer from the model."""
    model = tiny_llama()
    if callable(optimizer.get("optimizers")):
        optimizer["optimizers"] = (optimizer["optimizers"](model), None)
    trainer = transformers.Trainer(
        model=model, args=training_args(output_dir), train_dataset=TokenDataset(), **optimizer
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def optimizers_argument(optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any) -> dict[str, Any]:
    return {"optimizers": lambda model: optimizer_cls(model.parameters(), lr=LR, **kwargs)}


def optimizer_cls_and_kwargs_argument(optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any) -> dict[str, Any]:
    return {"optimizer_cls_and_kwargs": (optimizer_cls, {"lr": LR, **kwargs})}


@pytest.mark.parametrize("argument", [optimizers_argument, optimizer_cls_and_kwargs_argument])
def test_hf_trainer_trains_like_torch_and_resumes_from_its_checkpoint(server, no_sessions_left, tmp_path, argument):
    local, _ = hf_train(tmp_path / "local", **argument(torch.optim.AdamW))
    remote, trainer = hf_train(tmp_path / "remote", **argument(RemoteAdamW, url=server.url))
    assert_same_parameters(remote, local)
    optimizer = trainer.optimizer.optimizer  # the Trainer's accelerate wraps ours in an AcceleratedOptimizer
    assert isinstance(optimizer, RemoteAdamW)
    assert no_sessions_left.session(optimizer.session_id)["step"] == STEPS
    # the Trainer's optimizer.pt holds the state itself (torch.save of state_dict()), not a reference to a session
    saved = torch.load(tmp_path / "remote" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert {"step", "exp_avg", "exp_avg_sq"} <= saved["state"][0].keys()
    assert saved["state"][0]["step"] == 4

    # a new Trainer (new model, new optimizer, new session) resumes from the step-4 checkpoint
    resumed, resumed_trainer = hf_train(
        tmp_path / "resumed", resume=str(tmp_path / "remote" / "checkpoint-4"), **argument(RemoteAdamW, url=server.url)
    )
    resumed_optimizer = resumed_trainer.optimizer.optimizer
    assert resumed_optimizer.session_id != optimizer.session_id
    assert no_sessions_left.session(resumed_optimizer.session_id)["step"] == STEPS  # 4 loaded, 4 stepped
    assert_same_parameters(resumed, remote, exact=True)
    optimizer.close(delete=True)
    resumed_optimizer.close(delete=True)


# --- PyTorch Lightning ------------------------------------------------------------------------------------------


def regression_data() -> torch.utils.data.DataLoader:
    """16 samples of a noisy linear map, in 4 batches (no shuffling: every run sees the same order)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    y = x @ torch.randn(6, 2, generator=g) + 0.1 * torch.randn(16, 2, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def tiny_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


class Regressor(lightning.LightningModule):
    """A LightningModule as users write one; ``url`` given, its optimizer is the remote twin."""

    def __init__(self, url: str | None = None) -> None:
        super().__init__()
        self.net = tiny_mlp()
        self.url = url

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.url is None:
            optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
        else:
            optimizer = RemoteAdamW(self.parameters(), lr=LR, url=self.url)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lightning_fit(checkpoints: Path, url: str | None = None, ckpt_path: Path | None = None) -> tuple[Regressor, Any]:
    """Two epochs of 4 steps, a checkpoint at the end of each."""
    module = Regressor(url)
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoints, every_n_epochs=1, save_top_k=-1)],
    )
    trainer.fit(module, regression_data(), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers")
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the resumed run checkpoints into its own folder
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # Lightning on torch 2.13
def test_lightning_trains_like_torch_and_resumes_from_its_checkpoint(server, no_sessions_left, tmp_path):
    local, _ = lightning_fit(tmp_path / "local")
    remote, trainer = lightning_fit(tmp_path / "remote", url=server.url)
    assert_same_parameters(remote, local)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, RemoteAdamW)
    assert no_sessions_left.session(optimizer.session_id)["step"] == STEPS
    checkpoint = tmp_path / "remote" / "epoch=0-step=4.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]
    assert saved["state"][0]["step"] == 4

    resumed, resumed_trainer = lightning_fit(tmp_path / "resumed", url=server.url, ckpt_path=checkpoint)
    resumed_optimizer = resumed_trainer.optimizers[0]
    assert no_sessions_left.session(resumed_optimizer.session_id)["step"] == STEPS  # 4 loaded, 4 stepped
    assert_same_parameters(resumed, remote, exact=True)
    optimizer.close(delete=True)
    resumed_optimizer.close(delete=True)


# --- accelerate ---------------------------------------------------------------------------------------------------


def accelerate_run(make_optimizer: Any, state: Path, resume: bool = False) -> tuple[torch.nn.Module, Any]:
    """accelerate's training loop (gradient accumulation over 2 batches, clipping, a scheduler): 4 epochs of 2 steps,
    the state saved after epoch 2; ``resume`` loads that state instead and trains epochs 3 and 4."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_mlp()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    model, optimizer, data, scheduler = accelerator.prepare(model, optimizer, regression_data(), scheduler)
    if resume:
        accelerator.load_state(state)
    for epoch in range(2 if resume else 0, 4):
        for x, y in data:
            with accelerator.accumulate(model):
                accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        if epoch == 1 and not resume:
            accelerator.save_state(state)
    return accelerator.unwrap_model(model), optimizer.optimizer  # ours, inside accelerate's AcceleratedOptimizer


def test_accelerate_trains_like_torch_and_resumes_from_its_saved_state(server, no_sessions_left, tmp_path):
    def remote(model: torch.nn.Module) -> RemoteAdamW:
        return RemoteAdamW(model.parameters(), lr=LR, url=server.url)

    local, _ = accelerate_run(lambda model: torch.optim.AdamW(model.parameters(), lr=LR), tmp_path / "local")
    model, optimizer = accelerate_run(remote, tmp_path / "state")
    assert_same_parameters(model, local)
    assert isinstance(optimizer, RemoteAdamW)
    assert no_sessions_left.session(optimizer.session_id)["step"] == STEPS
    saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)  # torch.save of state_dict()
    assert saved["state"][0]["step"] == 4

    resumed, resumed_optimizer = accelerate_run(remote, tmp_path / "state", resume=True)
    assert no_sessions_left.session(resumed_optimizer.session_id)["step"] == STEPS  # 4 loaded, 4 stepped
    assert_same_parameters(resumed, model, exact=True)
    optimizer.close(delete=True)
    resumed_optimizer.close(delete=True)
