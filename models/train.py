"""Training a patch classifier: the paper's recipe, resumable and deterministic.

The recipe (Lu & Perer): random horizontal flip and Gaussian blur, normalisation to mean 0.5 / std 0.5,
cross-entropy, Adam with learning rate 1e-4, batch 32, 50 epochs, the weights with the lowest validation
loss kept, 8:1:1 patient-level split (from the patch set). Every value is a field of :class:`Recipe`
(and a ``mammo train`` flag). The slim model's default schedule on a CPU is shorter
(:data:`SLIM_CPU_EPOCHS`); the checkpoint's ``recipe`` says which was used and why.

One addition to the paper: the paper fine-tuned ImageNet weights, which cannot be had here, and VGG16's
plain convolutions trained from scratch do not learn (see :class:`models.vgg.ConvBN`). So by default
each convolution is followed by batch norm while training (``batch_norm``), folded into the convolution
when the model is saved: the checkpoint is plain VGG16 with torchvision's layer names.

Determinism: epoch ``e`` draws its patch order, its augmentation and its dropout from generators seeded
by ``(seed, e)``, so an interrupted run that resumes from the end of epoch ``e - 1`` produces the same
weights as an uninterrupted one (same device and thread count).

Resume: after each epoch ``resume.pt`` (model, optimiser, best weights, history) is written atomically to
the output folder; running the same training again continues from it. The finished model is
``model.pt`` (see :mod:`models.checkpoint`), evaluated on val and test before it is written so the file
carries its metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import LoadedModel, base_meta, normalise, save_checkpoint
from models.data import PatchData
from models.device import pick_device
from models.evaluate import DEFAULT_BOOTSTRAP, DEFAULT_RULE, evaluate_model, plot_roc
from models.vgg import build_vgg, fold_batch_norm, with_batch_norm
from workspace.base.errors import ModelError
from workspace.base.progress import progress
from workspace.base.schema import utc_now

PAPER_EPOCHS = 50
SLIM_CPU_EPOCHS = 20
"""The slim model's default on a CPU: 20 epochs keep training within half an hour on two shared cores
(729 training patches, about 80 s an epoch with batch norm). The shipped demo model was given 40
(``--epochs 40``: its validation loss was still falling at 20; lowest at epoch 39, 3511 s in all; the
checkpoint's ``training``, printed by ``bench/check_shortcut.py``). The paper's 50 stay the default on a
GPU and for vgg16_1ch."""

RESUME_FILE = "resume.pt"
MODEL_FILE = "model.pt"


@dataclass
class Recipe:
    """Every training hyperparameter (all recorded in the checkpoint)."""

    arch: str = "vgg16_slim"
    epochs: int | None = None  # None: 50 (the paper), or SLIM_CPU_EPOCHS for vgg16_slim on a CPU
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"
    batch_norm: bool = True  # batch norm after each convolution while training, folded away when saved
    loss: str = "cross_entropy"
    hflip_p: float = 0.5
    blur_p: float = 0.5
    blur_kernel: int = 5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    normalisation: dict = field(default_factory=lambda: {"mean": 0.5, "std": 0.5})
    selection: str = "lowest_val_loss"
    seed: int = 0
    operating_point_rule: str = DEFAULT_RULE
    bootstrap: int = DEFAULT_BOOTSTRAP

    def resolved(self, device: torch.device) -> Recipe:
        """A copy with ``epochs`` filled in for ``device``."""
        if self.epochs is not None:
            return dataclasses.replace(self)
        short = self.arch == "vgg16_slim" and device.type == "cpu"
        return dataclasses.replace(self, epochs=SLIM_CPU_EPOCHS if short else PAPER_EPOCHS)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["blur_sigma"] = list(self.blur_sigma)
        return out


@dataclass
class TrainResult:
    path: Path
    digest: str
    meta: dict
    history: list[dict]
    resumed_from_epoch: int


def augment(x: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and Gaussian blur, per patch, drawn from ``generator`` (on the CPU)."""
    from torchvision.transforms.v2.functional import gaussian_blur

    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < recipe.hflip_p
    blur = torch.rand(n, generator=generator) < recipe.blur_p
    lo, hi = recipe.blur_sigma
    sigmas = lo + (hi - lo) * torch.rand(n, generator=generator)
    x = x.clone()
    if flip.any():
        x[flip] = x[flip].flip(-1)
    for i in torch.nonzero(blur).flatten().tolist():
        s = float(sigmas[i])
        x[i] = gaussian_blur(x[i], [recipe.blur_kernel, recipe.blur_kernel], [s, s])
    return x


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + stream) % (2**63 - 1)


@torch.inference_mode()
def _val_loss(model: torch.nn.Module, data: PatchData, positions: np.ndarray, recipe: Recipe,
              device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(positions), recipe.batch_size):
        chunk = positions[start:start + recipe.batch_size]
        logits = model(normalise(data.batch(chunk), recipe.normalisation, device))
        y = torch.from_numpy(data.labels[chunk]).to(device)
        total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        count += len(chunk)
    return total / max(count, 1)


BN_STAT_PATCHES = 128
"""Training patches whose activations set the batch-norm statistics at the end of each epoch."""


@torch.no_grad()
def _settle_batch_norm(model: torch.nn.Module, data: PatchData, positions: np.ndarray, recipe: Recipe,
                       device: torch.device) -> None:
    """Set every batch norm's running mean and variance to their exact values over ``positions`` (no
    augmentation) for the weights as they are now.

    The usual running averages (momentum 0.1) trail weights that move every step, so the eval-mode network
    is not the one that was trained: without this pass the blob model of
    ``tests/test_models_train.py::test_training_learns_and_the_checkpoint_carries_its_recipe_and_metrics``
    reaches a low training loss and a test AUC far below the asserted 0.9 (Wu & Johnson, "Rethinking
    'batch' in BatchNorm", 2021).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    body = getattr(model, "features", model)  # every batch norm is in the convolution stack: skip the head
    for start in range(0, len(positions), recipe.batch_size):
        body(normalise(data.batch(positions[start:start + recipe.batch_size]), recipe.normalisation, device))
    for m in norms:
        m.momentum = 0.1
    model.eval()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _comparable(recipe_dict: dict) -> dict:
    # the number of epochs may grow between runs ("train 10 more epochs"); nothing else may change
    return {k: v for k, v in recipe_dict.items() if k != "epochs"}


def train(data: PatchData, recipe: Recipe, out_dir: str | os.PathLike, *, device: str | torch.device | None = None,
          restart: bool = False, name: str | None = None, training_domain: dict | None = None) -> TrainResult:
    """Train (or continue training) ``recipe.arch`` on ``data``; write ``out_dir/model.pt``.
    ``training_domain``: the profile of the training images (:func:`workspace.data.domain.domain_profile`),
    kept in the checkpoint for the domain check of every later read."""
    device = pick_device(device)
    recipe = recipe.resolved(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = data.indices("train"), data.indices("val")
    if len(train_idx) == 0:
        raise ModelError(f"patch set {data.name!r} has no training patches")
    if len(np.unique(data.labels[train_idx])) < 2:
        raise ModelError(f"patch set {data.name!r} has only one class in its training split")

    torch.manual_seed(_epoch_seed(recipe.seed, -1, 0))  # the initial weights
    model = build_vgg(recipe.arch)
    if recipe.batch_norm:
        model = with_batch_norm(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    history: list[dict] = []
    best = {"val_loss": math.inf, "epoch": -1, "state": None}
    start_epoch = 0

    resume_path = out_dir / RESUME_FILE
    if resume_path.exists() and restart:
        resume_path.unlink()
    if resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if state["data_digest"] != data.digest or _comparable(state["recipe"]) != _comparable(recipe.to_dict()):
            raise ModelError(f"{out_dir} holds an unfinished training with another recipe or patch set; "
                             "continue it with the same settings, or start again with --restart")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        history = list(state["history"])
        best = {"val_loss": state["best_val_loss"], "epoch": state["best_epoch"], "state": state["best_state"]}
        start_epoch = int(state["epochs_done"])

    steps = math.ceil(len(train_idx) / recipe.batch_size)
    stat_idx = np.sort(np.random.default_rng(recipe.seed).permutation(train_idx)[:BN_STAT_PATCHES])
    epoch_bar = progress(total=recipe.epochs, desc=f"train {recipe.arch}", unit="epoch")
    epoch_bar.update(start_epoch)
    for epoch in range(start_epoch, recipe.epochs):
        started = time.perf_counter()
        torch.manual_seed(_epoch_seed(recipe.seed, epoch, 1))  # dropout
        order = np.random.default_rng(_epoch_seed(recipe.seed, epoch, 2)).permutation(train_idx)
        generator = torch.Generator().manual_seed(_epoch_seed(recipe.seed, epoch, 3))
        model.train()
        running, seen = 0.0, 0
        batch_bar = progress(total=steps, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch", leave=False)
        for step in range(steps):
            chunk = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            x = normalise(augment(data.batch(chunk), recipe, generator), recipe.normalisation, device)
            y = torch.from_numpy(data.labels[chunk]).to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise ModelError(f"training diverged at epoch {epoch + 1} (loss {float(loss)}); lower --lr")
            loss.backward()
            optimiser.step()
            running += float(loss.detach()) * len(chunk)
            seen += len(chunk)
            batch_bar.update(1)
            batch_bar.set_postfix(loss=f"{running / seen:.4f}")
        batch_bar.close()
        train_loss = running / seen
        _settle_batch_norm(model, data, stat_idx, recipe, device)
        val_loss = _val_loss(model, data, val_idx, recipe, device) if len(val_idx) else train_loss
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "epoch": epoch + 1,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                        "seconds": round(time.perf_counter() - started, 2)})
        _atomic_save({"recipe": recipe.to_dict(), "data_digest": data.digest, "epochs_done": epoch + 1,
                      "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      "optimiser": optimiser.state_dict(), "history": history,
                      "best_val_loss": best["val_loss"], "best_epoch": best["epoch"],
                      "best_state": best["state"]}, resume_path)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))
        epoch_bar.update(1)
        epoch_bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best["epoch"])
    epoch_bar.close()

    # the kept weights: lowest validation loss
    model.load_state_dict(best["state"])
    model.eval()
    if recipe.batch_norm:
        model = fold_batch_norm(model)  # the saved model is plain VGG16: same layers, same names
    meta = base_meta(recipe.arch, normalisation=dict(recipe.normalisation), input_size=data.size)
    meta.update({
        "name": name or out_dir.name,
        "recipe": {**recipe.to_dict(), "paper_epochs": PAPER_EPOCHS, "device": device.type,
                   "schedule_note": (f"vgg16_slim on a CPU defaults to {SLIM_CPU_EPOCHS} epochs instead of the "
                                     f"paper's {PAPER_EPOCHS}" if recipe.epochs == SLIM_CPU_EPOCHS and
                                     recipe.arch == "vgg16_slim" else "")},
        "trained": utc_now(),
        "training_domain": training_domain,
        "data_digest": data.digest,
        "data": {**data.info, "recorded_test": data.recorded_split("test")},
        "split": data.split_counts(),
        "training": {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                     "epochs_run": len(history), "seconds": round(sum(h["seconds"] for h in history), 1),
                     "history": history},
    })
    loaded = LoadedModel(model=model, meta=meta, digest="unsaved", path=out_dir / MODEL_FILE, device=device)
    metrics = {}
    if len(data.indices("test")) and len(val_idx):
        metrics, outputs = evaluate_model(loaded, data, rule=recipe.operating_point_rule,
                                          n_resamples=recipe.bootstrap, seed=recipe.seed)
        meta["operating_point"] = metrics["operating_point"]
        plot_roc(out_dir / "roc.png", outputs["labels"], outputs["scores"], metrics,
                 title=f"{recipe.arch} on {data.name} (best epoch {best['epoch']})")
    meta["metrics"] = metrics
    path = out_dir / MODEL_FILE
    digest = save_checkpoint(path, model, meta)
    return TrainResult(path=path, digest=digest, meta=meta, history=history, resumed_from_epoch=start_epoch)


__all__ = ["PAPER_EPOCHS", "SLIM_CPU_EPOCHS", "Recipe", "TrainResult", "augment", "train"]
