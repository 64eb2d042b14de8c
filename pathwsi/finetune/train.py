"""Two-step fine-tuning of a backbone on labelled tissue tiles, giving the FTX weights.

Li et al. (2022) fine-tune an ImageNet Xception on NCT-CRC-HE-100K in two steps: a new
classification head on the frozen base, then the top of the base unfrozen at a lower
learning rate. The paper does not publish optimizers, learning rates, epochs, batch size,
augmentation or which blocks were unfrozen: every such value here is OUR default, not the
paper's, and is set in the config section `finetune` (docs/finetune.md explains each).

Resumable: after every epoch `<workdir>/checkpoint.pt` holds the model, the optimizer, the
epoch reached, the step's best validation loss and patience count, and the metrics rows.
It contains only tensors and plain Python values and is read back with
`torch.load(weights_only=True)`. Every random draw of an epoch (shuffling, augmentation,
dropout) is derived from (seed, step, epoch), so a resumed run repeats exactly what the
killed run would have done and no RNG state needs saving. The step's best epoch is kept in
`best.safetensors`. Both files are removed once the outputs are written.

Outputs: the backbone of the last step's best epoch without its head (`out_path`, loadable
by `build_backbone` as the `ftx` entry) with provenance in its safetensors metadata; in the
workdir `head.safetensors`, `metrics.tsv` (one row per epoch), `curves.png` (its loss and accuracy
per epoch, pathwsi.finetune.curves) and `summary.json`. Both are rewritten after every epoch. Each
epoch's line (loss, accuracy, validation loss and accuracy) goes to the log and to stderr, which
under Snakemake is the terminal of the run (pathwsi.runtime.logs.TERMINAL); on a terminal a
progress bar per epoch shows the batches as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import numpy as np
import torch

from pathwsi import __version__
from pathwsi.config import FTX_WEIGHTS
from pathwsi.features.backbones import (
    ARCH_KEY,
    BN_EPS_KEY,
    UNTRAINED_BASE_KEY,
    Backbone,
    ModelSpec,
    build_backbone,
    load_weights,
    resolve_device,
    save_weights,
    specs_from_config,
)
from pathwsi.finetune.curves import plot_curves, untrained_note
from pathwsi.finetune.tilesets import (
    AugmentSettings,
    FinetuneError,
    LabelledTiles,
    TileDataset,
    scan_tile_folder,
    stratified_split,
)
from pathwsi.runtime.gpu_claim import GpuSettings, claimed_device
from pathwsi.runtime.locks import hold_exclusive
from pathwsi.runtime.logs import TERMINAL
from pathwsi.runtime.outputs import atomic_path, write_json, write_text

if TYPE_CHECKING:
    from tqdm.auto import tqdm

log = logging.getLogger(__name__)
CHECKPOINT, BEST, HEAD, METRICS, CURVES, SUMMARY = (
    "checkpoint.pt",
    "best.safetensors",
    "head.safetensors",
    "metrics.tsv",
    "curves.png",
    "summary.json",
)
LOCK = "finetune.lock"  # held by the run that works in the folder (pathwsi.runtime.locks)
CHECKPOINT_FORMAT = "pathwsi.finetune-checkpoint/1"
WEIGHTS_FORMAT = "pathwsi.ftx/1"
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSettings:
    """One training step (config `finetune.step1` / `finetune.step2`). All defaults are ours, not the paper's."""

    epochs: int
    lr: float
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (decay to 0 over the step's epochs)
    unfreeze_from: str | None = None  # first timm block trained with the head; None: head only
    train_batchnorm: bool = (
        False  # BatchNorm of unfrozen blocks: batch statistics, re-estimated each epoch (True) or frozen (False)
    )


@dataclass(frozen=True)
class FinetuneSettings:
    """Every setting of the fine-tuning (config section `finetune`, plus the top-level `seed`)."""

    base: str = "imgnet"  # models.backbones entry to start from
    val_fraction: float = 0.2  # held out per class when no val_dir is given
    batch_size: int = 32
    num_workers: int = 2  # image-loading processes; does not change the result
    step1: StepSettings = StepSettings(epochs=2, lr=1e-3, optimizer="adam")
    step2: StepSettings = StepSettings(
        epochs=3,
        lr=1e-4,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=1e-4,
        schedule="cosine",
        unfreeze_from="block11",
        train_batchnorm=True,
    )
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    early_stopping_patience: int = 3  # epochs without a lower validation loss before a step stops; 0: never
    dropout: float = 0.0  # before the new head
    amp: bool = True  # bfloat16 autocast on CUDA; the CPU always computes in float32
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("step1", "step2"):
            step: StepSettings = getattr(self, name)
            if step.optimizer not in OPTIMIZERS:
                problems.append(f"finetune.{name}.optimizer: '{step.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
            if step.schedule not in SCHEDULES:
                problems.append(f"finetune.{name}.schedule: '{step.schedule}' is not one of {', '.join(SCHEDULES)}")
            if step.epochs < 0 or step.lr <= 0:
                problems.append(f"finetune.{name}: epochs must be >= 0 and lr > 0 (got {step.epochs}, {step.lr})")
        if not 0 < self.val_fraction < 1:
            problems.append(f"finetune.val_fraction: {self.val_fraction} must be between 0 and 1 (exclusive)")
        if self.batch_size < 1 or self.num_workers < 0 or self.early_stopping_patience < 0 or not 0 <= self.dropout < 1:
            problems.append(
                "finetune: batch_size >= 1, num_workers >= 0, early_stopping_patience >= 0 and 0 <= dropout < 1 are required"
            )
        if problems:
            raise FinetuneError("; ".join(problems))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FinetuneSettings:
        """From a validated config: its `finetune` section (train_dir and val_dir are read elsewhere) and `seed`."""
        section = {k: v for k, v in config["finetune"].items() if k not in ("train_dir", "val_dir")}
        _check_keys("finetune", section, {f.name for f in fields(cls)} - {"seed"})
        for name in ("step1", "step2"):
            if name in section:
                _check_keys(f"finetune.{name}", section[name], {f.name for f in fields(StepSettings)})
                section[name] = replace(_default(name), **section[name])
        if "augment" in section:
            _check_keys("finetune.augment", section["augment"], {f.name for f in fields(AugmentSettings)})
            section["augment"] = AugmentSettings(**section["augment"])
        return cls(**section, seed=config.get("seed", 0))

    def result_relevant(self) -> dict[str, Any]:
        """The settings that shape the weights (everything but num_workers)."""
        record = asdict(self)
        record.pop("num_workers")
        return record


def _check_keys(where: str, given: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise FinetuneError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _default(name: str) -> StepSettings:
    """The default of FinetuneSettings' `step1` or `step2` (dataclasses types a field's default loosely)."""
    return cast(StepSettings, next(f.default for f in fields(FinetuneSettings) if f.name == name))


# -- model --------------------------------------------------------------------------------------


class TileClassifier(torch.nn.Module):
    """The backbone's pooled features -> dropout -> a new linear head."""

    def __init__(self, net: torch.nn.Module, feature_dim: int, n_classes: int, dropout: float):
        super().__init__()
        self.net = net
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.net(x)))


def trainable_blocks(net: torch.nn.Module, unfreeze_from: str | None, key: str) -> list[str]:
    """The backbone's top-level children from `unfreeze_from` on (e.g. block11 → block11, block12, conv3, bn3, …)."""
    if unfreeze_from is None:
        return []
    names = [name for name, _ in net.named_children()]
    if unfreeze_from not in names:
        choices = [n for n, m in net.named_children() if any(True for _ in m.parameters())]
        raise FinetuneError(
            f"{key}.unfreeze_from: '{unfreeze_from}' is not a block of this backbone; choose one of {', '.join(choices)}"
        )
    return names[names.index(unfreeze_from) :]


def set_trainable(model: TileClassifier, blocks: list[str], train_batchnorm: bool) -> list[torch.nn.Parameter]:
    """Freeze everything but the head and `blocks`; put frozen parts (and BatchNorm unless trained) in eval mode."""
    model.requires_grad_(False)
    model.eval()
    model.head.requires_grad_(True)
    model.head.train()
    model.dropout.train()
    for name in blocks:
        block = getattr(model.net, name)
        block.requires_grad_(True)
        block.train()
        for norm in _batchnorms(block):
            if train_batchnorm:
                norm.momentum = None  # running statistics: the plain average over the epoch's batches
            else:
                norm.eval()
    return [p for p in model.parameters() if p.requires_grad]


def reset_batchnorm_statistics(model: TileClassifier, blocks: list[str]) -> None:
    """Start the running statistics of the trained blocks' BatchNorm afresh (at each epoch start)."""
    for name in blocks:
        for norm in _batchnorms(getattr(model.net, name)):
            norm.reset_running_stats()


def _batchnorms(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def make_optimizer(params: list[torch.nn.Parameter], step: StepSettings) -> torch.optim.Optimizer:
    if step.optimizer == "sgd":
        return torch.optim.SGD(params, lr=step.lr, momentum=step.momentum, weight_decay=step.weight_decay)
    optimizer = torch.optim.AdamW if step.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=step.lr, weight_decay=step.weight_decay)


def train_step(
    backbone: Backbone,
    model: TileClassifier,
    optimizer: torch.optim.Optimizer,
    tiles: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype | None,
) -> tuple[float, int]:
    """One optimizer step on a uint8 batch already on the model's device; returns (mean loss, correct)."""
    with autocast(tiles.device, dtype):
        logits = model(backbone.prepare(tiles))
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), int((logits.argmax(1) == labels).sum())


def learning_rate(step: StepSettings, iteration: int, total: int) -> float:
    """The step's learning rate at `iteration` of `total` (a pure function, so it needs no saved state)."""
    if step.schedule == "cosine" and total > 0:
        return step.lr * 0.5 * (1 + math.cos(math.pi * iteration / total))
    return step.lr


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on CUDA; nothing on the CPU (which computes in float32)."""
    if device.type == "cuda" and dtype is not None and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands; saved in the checkpoint after every epoch."""

    step: int = 1
    epoch: int = 0  # epochs completed in `step`
    stopped: bool = False  # `step` ended early
    stale: int = 0  # epochs of `step` since its validation loss last improved
    best: dict[str, Any] = field(default_factory=lambda: {"val_loss": math.inf})  # best epoch of `step`
    rows: list[dict[str, Any]] = field(default_factory=list)


def finetune(
    spec: ModelSpec,
    settings: FinetuneSettings,
    train_dir: Path,
    val_dir: Path | None,
    out_path: Path,
    workdir: Path,
    *,
    allow_network: bool = False,
    device: str | torch.device = "auto",
    restart: bool = False,
    progress: bool | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune `spec` in two steps on the tiles of `train_dir`; write the FTX weights to `out_path`.

    val_dir: a validation folder with the same classes, or None for a seeded stratified split.
    workdir: checkpoint, best weights, metrics, head and summary. A checkpoint there is resumed
    if it was made with the same settings, base weights and tiles; `restart` discards it.
    progress: show a progress bar (None: only on a terminal). on_batch(step, epoch, batch) is
    called after every optimizer step (tests use it to interrupt a run).
    Returns the summary also written to `<workdir>/summary.json`.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    workdir, out_path = Path(workdir), Path(out_path)
    workdir.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(
        hold_exclusive(workdir / LOCK, f"fine-tuning folder {workdir}")
    ):  # one run at a time resumes the checkpoint
        tiles = scan_tile_folder(train_dir)
        if val_dir is None:
            train, val = stratified_split(tiles, settings.val_fraction, settings.seed)
        else:
            train, val = tiles, scan_tile_folder(val_dir, tiles.classes)
        log.info(
            "fine-tuning '%s' on %d training and %d validation tiles, classes %s, on %s",
            spec.name,
            len(train.files),
            len(val.files),
            ", ".join(tiles.classes),
            device,
        )

        backbone = build_backbone(spec, allow_network=allow_network, device="cpu")
        model = TileClassifier(backbone.net, backbone.feature_dim, len(tiles.classes), settings.dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(settings.seed, 0, 0, 2))
            model.head.reset_parameters()
        model.to(device).to(memory_format=torch.channels_last)
        fingerprint = _fingerprint(settings, backbone, train, val)
        state = _resume(workdir, fingerprint, model, restart, device)
        notes = [untrained_note(spec.name)] if spec.untrained else []
        _write_progress(workdir, state.progress.rows, tiles.classes, notes)  # as of the checkpoint
        runner = _Runner(backbone, model, settings, train, val, device, progress, on_batch)

        for number, step in ((1, settings.step1), (2, settings.step2)):
            if state.progress.step > number or step.epochs == 0:
                continue
            if state.progress.step < number:
                state.progress = replace(
                    state.progress, step=number, epoch=0, stopped=False, stale=0, best={"val_loss": math.inf}
                )
                state.optimizer = None
            blocks = trainable_blocks(backbone.net, step.unfreeze_from, f"finetune.step{number}")
            optimizer = make_optimizer(set_trainable(model, blocks, step.train_batchnorm), step)
            if state.optimizer is not None:
                optimizer.load_state_dict(state.optimizer)
            while state.progress.epoch < step.epochs and not state.progress.stopped:
                epoch = state.progress.epoch + 1
                row = runner.epoch(number, step, epoch, optimizer, blocks)
                _record(state.progress, row, settings.early_stopping_patience, model, workdir)
                state.progress.epoch = epoch
                _save_checkpoint(workdir, fingerprint, model, optimizer, state.progress)
                _write_progress(workdir, state.progress.rows, tiles.classes, notes)
        return _export(
            spec,
            backbone,
            model,
            settings,
            tiles.classes,
            train,
            val,
            train_dir,
            val_dir,
            state.progress,
            out_path,
            workdir,
            started,
        )


class _Runner:
    """Trains and validates one epoch at a time."""

    def __init__(
        self,
        backbone: Backbone,
        model: TileClassifier,
        settings: FinetuneSettings,
        train: LabelledTiles,
        val: LabelledTiles,
        device: torch.device,
        progress: bool | None,
        on_batch: Callable[[int, int, int], None] | None,
    ):
        self.backbone, self.model, self.settings, self.device = backbone, model, settings, device
        self.train_set = TileDataset(train, backbone.spec.input_px, settings.augment)
        self.val_set = TileDataset(val, backbone.spec.input_px)
        self.classes = train.classes
        self.progress, self.on_batch = progress, on_batch
        self.dtype = torch.bfloat16 if settings.amp else None

    def _loader(self, dataset: TileDataset, items: list) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            sampler=items,
            num_workers=self.settings.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def epoch(
        self, number: int, step: StepSettings, epoch: int, optimizer: torch.optim.Optimizer, blocks: list[str]
    ) -> dict[str, Any]:
        """One training epoch then validation; returns the metrics row."""
        started = time.perf_counter()
        rng = np.random.default_rng([self.settings.seed, number, epoch])
        order = rng.permutation(len(self.train_set))
        seeds = rng.integers(0, 2**62, len(order))
        loader = self._loader(self.train_set, list(zip(order.tolist(), seeds.tolist())))
        total = step.epochs * len(loader)
        set_trainable(self.model, blocks, step.train_batchnorm)
        if step.train_batchnorm:
            reset_batchnorm_statistics(self.model, blocks)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _bar(len(loader), f"step {number} epoch {epoch}/{step.epochs}", self.progress)
        cuda = (
            [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            if self.device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(_seed(self.settings.seed, number, epoch, 1))
            for batch, (tiles, labels) in enumerate(loader):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, (epoch - 1) * len(loader) + batch, total)
                tiles, labels = tiles.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                loss, right = train_step(self.backbone, self.model, optimizer, tiles, labels, self.dtype)
                loss_sum += loss * len(labels)
                correct += right
                seen += len(labels)
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                if self.on_batch is not None:
                    self.on_batch(number, epoch, batch)
        bar.close()
        trained = time.perf_counter() - started
        val_loss, val_acc, per_class = self.validate()
        row = {
            "step": number,
            "epoch": epoch,
            "lr": learning_rate(step, epoch * len(loader) - 1, total),
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val_loss,
            "val_acc": val_acc,
        }
        row.update({f"val_acc_{name}": acc for name, acc in zip(self.classes, per_class)})
        row.update(train_images_per_s=seen / trained, seconds=time.perf_counter() - started)
        log.info(
            "fine-tuning step %d epoch %d/%d: train loss %.4f acc %.3f, val loss %.4f acc %.3f (%.1f images/s)",
            number,
            epoch,
            step.epochs,
            row["train_loss"],
            row["train_acc"],
            val_loss,
            val_acc,
            row["train_images_per_s"],
            extra=TERMINAL,
        )
        return row

    def validate(self) -> tuple[float, float, list[float]]:
        """Validation loss, accuracy and per-class accuracy (recall), without augmentation."""
        self.model.eval()
        loader = self._loader(self.val_set, list(range(len(self.val_set))))
        loss_sum, hits, counts = 0.0, np.zeros(len(self.classes)), np.zeros(len(self.classes))
        with torch.inference_mode():
            for tiles, labels in loader:
                tiles, labels = tiles.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                with autocast(self.device, self.dtype):
                    logits = self.model(self.backbone.prepare(tiles))
                loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
                right = (logits.argmax(1) == labels).cpu().numpy()
                np.add.at(hits, labels.cpu().numpy(), right)
                np.add.at(counts, labels.cpu().numpy(), 1)
        return float(loss_sum / counts.sum()), float(hits.sum() / counts.sum()), (hits / np.maximum(counts, 1)).tolist()


def _bar(total: int, desc: str, progress: bool | None) -> tqdm[NoReturn]:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="batch",
        leave=False,
        disable=None if progress is None else not progress,
        file=sys.stderr,
    )


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _record(progress: Progress, row: dict[str, Any], patience: int, model: TileClassifier, workdir: Path) -> None:
    """Append the row; keep the weights when the validation loss is the step's lowest so far; count patience.

    Each step is judged on its own: unfreezing often raises the validation loss for an epoch
    or two, and the backbone only changes in the last step, whose best epoch is exported.
    """
    progress.rows.append(row)
    if row["val_loss"] < progress.best["val_loss"]:
        progress.best = {
            "val_loss": row["val_loss"],
            "val_acc": row["val_acc"],
            "step": row["step"],
            "epoch": row["epoch"],
        }
        save_weights(model.state_dict(), workdir / BEST, {"step": row["step"], "epoch": row["epoch"]})
        progress.stale = 0
    else:
        progress.stale += 1
    progress.stopped = patience > 0 and progress.stale >= patience
    if progress.stopped:
        log.info(
            "fine-tuning step %d stops early after epoch %d: no lower validation loss for %d epochs",
            row["step"],
            row["epoch"],
            patience,
            extra=TERMINAL,
        )


# -- checkpoint ---------------------------------------------------------------------------------


@dataclass
class _State:
    progress: Progress
    optimizer: dict[str, Any] | None


def _fingerprint(settings: FinetuneSettings, backbone: Backbone, train: LabelledTiles, val: LabelledTiles) -> str:
    """What a checkpoint must have been made with to be resumed: settings, base weights, tiles."""
    record = {
        "settings": settings.result_relevant(),
        "base": {
            "arch": backbone.spec.arch,
            "input_px": backbone.spec.input_px,
            "mean": backbone.spec.mean,
            "std": backbone.spec.std,
            "weights_sha256": backbone.weights_sha256,
        },
        "tiles": [[p.parent.name, p.name, p.stat().st_size] for subset in (train, val) for p in subset.files],
        "split": [len(train.files), len(val.files)],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _save_checkpoint(
    workdir: Path, fingerprint: str, model: TileClassifier, optimizer: torch.optim.Optimizer, progress: Progress
) -> None:
    """Write the checkpoint atomically (tensors and plain Python values only)."""
    with atomic_path(workdir / CHECKPOINT) as temporary:
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": fingerprint,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "progress": asdict(progress),
            },
            temporary,
        )


def _resume(workdir: Path, fingerprint: str, model: TileClassifier, restart: bool, device: torch.device) -> _State:
    """Load the checkpoint into `model` if there is one made the same way; otherwise start fresh."""
    path = workdir / CHECKPOINT
    if restart:
        for name in (CHECKPOINT, BEST, METRICS, CURVES):
            (workdir / name).unlink(missing_ok=True)
    if not path.is_file():
        return _State(Progress(), None)
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a damaged checkpoint: say which and what to do
        raise FinetuneError(
            f"cannot read checkpoint '{path}' ({type(err).__name__}: {err}); delete it (or use --restart) to start over"
        ) from err
    if saved.get("format") != CHECKPOINT_FORMAT or saved.get("fingerprint") != fingerprint:
        raise FinetuneError(
            f"checkpoint '{path}' was made with other settings, base weights or tiles; "
            "restore them to resume, or delete the checkpoint (or use --restart) to start over"
        )
    model.load_state_dict(saved["model"])
    progress = Progress(**saved["progress"])
    log.info("resuming from %s: step %d, %d epoch(s) done", path, progress.step, progress.epoch, extra=TERMINAL)
    return _State(progress, saved["optimizer"])


def _write_progress(workdir: Path, rows: list[dict[str, Any]], classes: tuple[str, ...], notes: list[str]) -> None:
    """metrics.tsv and curves.png of the rows so far (`notes`: warnings above the figure)."""
    _write_metrics(workdir / METRICS, rows, classes)
    plot_curves(workdir / CURVES, rows, notes)


def _write_metrics(path: Path, rows: list[dict[str, Any]], classes: tuple[str, ...]) -> None:
    """metrics.tsv, rewritten whole (atomically) from the rows so far."""
    columns = [
        "step",
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        *(f"val_acc_{c}" for c in classes),
        "train_images_per_s",
        "seconds",
    ]
    lines = ["\t".join(columns)] + ["\t".join(_cell(row[c]) for c in columns) for row in rows]
    write_text("\n".join(lines) + "\n", path)


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# -- outputs ------------------------------------------------------------------------------------


def _export(
    spec: ModelSpec,
    backbone: Backbone,
    model: TileClassifier,
    settings: FinetuneSettings,
    classes: tuple[str, ...],
    train: LabelledTiles,
    val: LabelledTiles,
    train_dir: Path,
    val_dir: Path | None,
    progress: Progress,
    out_path: Path,
    workdir: Path,
    started: float,
) -> dict[str, Any]:
    """Write the best epoch's backbone (the FTX weights), its head and the summary; drop the checkpoint."""
    if (workdir / BEST).is_file():
        best, _ = load_weights(workdir / BEST, "ftx")
    else:  # no epoch ran (both steps have 0 epochs): the base weights, unchanged
        best = {k: v.cpu() for k, v in model.state_dict().items()}
    net = {k.removeprefix("net."): v for k, v in best.items() if k.startswith("net.")}
    head = {k.removeprefix("head."): v for k, v in best.items() if k.startswith("head.")}
    base = backbone.provenance()
    eps = next((m.eps for m in model.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)), None)
    metadata: dict[str, Any] = {
        "format": WEIGHTS_FORMAT,
        ARCH_KEY: spec.arch,
        "input_px": spec.input_px,
        "base": base,
        UNTRAINED_BASE_KEY: spec.untrained,
        "settings": asdict(settings),
        "classes": list(classes),
        "train_dir": str(train_dir),
        "val_dir": str(val_dir)
        if val_dir is not None
        else f"stratified split of train_dir ({settings.val_fraction:g}, seed {settings.seed})",
        "tiles": {"train": train.counts(), "val": val.counts()},
        "best": {k: v for k, v in progress.best.items() if k != "val_loss" or math.isfinite(v)},
        "pathwsi_version": __version__,
    }
    if eps is not None:
        metadata[BN_EPS_KEY] = repr(float(eps))
    sha = save_weights(net, out_path, metadata)
    save_weights(
        head,
        workdir / HEAD,
        {"classes": list(classes), "backbone_sha256": sha, "feature_dim": str(backbone.feature_dim)},
    )
    summary = {
        "weights": str(out_path),
        "weights_sha256": sha,
        "head": str(workdir / HEAD),
        "metrics": str(workdir / METRICS),
        "curves": str(workdir / CURVES),
        "classes": list(classes),
        "best": metadata["best"],
        "epochs": [[row["step"], row["epoch"]] for row in progress.rows],
        "base": base,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(summary, workdir / SUMMARY)
    for name in (CHECKPOINT, BEST):
        (workdir / name).unlink(missing_ok=True)
    log.info(
        "wrote %s (best: step %s epoch %s, val acc %s)",
        out_path,
        metadata["best"].get("step"),
        metadata["best"].get("epoch"),
        metadata["best"].get("val_acc"),
    )
    return summary


# -- config entry point -------------------------------------------------------------------------


def run_finetune(
    config: dict[str, Any],
    *,
    out_path: Path = Path(FTX_WEIGHTS),
    workdir: Path = Path("results/finetune"),
    train_dir: Path | None = None,
    val_dir: Path | None = None,
    device: str = "auto",
    restart: bool = False,
    progress: bool | None = None,
    gpus: GpuSettings | None = None,
) -> dict[str, Any]:
    """`pathwsi finetune` and rule `finetune`: fine-tune the config's `finetune.base` model.

    config: a validated config (sections models, finetune, seed); train_dir / val_dir
    override finetune.train_dir / finetune.val_dir. On CUDA the run claims a GPU of its own for
    its lifetime (gpus: how; default the config's `gpus` section, pathwsi.runtime.gpu_claim).
    """
    settings = FinetuneSettings.from_config(config)
    specs = specs_from_config(config["models"])
    if settings.base not in specs:
        raise FinetuneError(f"finetune.base: '{settings.base}' is not a models.backbones entry ({', '.join(specs)})")
    section = config["finetune"]
    train = Path(train_dir or section["train_dir"])
    val = val_dir or section.get("val_dir")
    with claimed_device(resolve_device(device), gpus or GpuSettings.from_config(config), "finetune") as (claimed, _):
        return finetune(
            specs[settings.base],
            settings,
            train,
            Path(val) if val else None,
            out_path,
            workdir,
            allow_network=bool(config["models"].get("allow_network", False)),
            device=claimed,
            restart=restart,
            progress=progress,
        )
