"""Two-step fine-tuning: settings, tile folders, freezing, outputs, exact resume, CUDA bf16."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from pathwsi.demo.labelled_tiles import write_tile_set
from pathwsi.features.backbones import ModelSpec, WeightsError, build_backbone
from pathwsi.finetune.curves import plot_run_curves
from pathwsi.finetune.tilesets import AugmentSettings, FinetuneError, augment, scan_tile_folder, stratified_split
from pathwsi.finetune.train import (
    CHECKPOINT,
    FinetuneSettings,
    StepSettings,
    TileClassifier,
    finetune,
    set_trainable,
    trainable_blocks,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:model '.*' uses UNTRAINED weights"),
    pytest.mark.usefixtures("one_torch_thread"),
]
SPEC = ModelSpec("imgnet", input_px=64, seed=1)
TINY = FinetuneSettings(
    batch_size=16,
    num_workers=0,
    step1=StepSettings(epochs=1, lr=1e-3),
    step2=StepSettings(
        epochs=2, lr=1e-3, optimizer="adam", schedule="cosine", unfreeze_from="block12", train_batchnorm=True
    ),
    seed=3,
)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return write_tile_set(tmp_path_factory.mktemp("tiles") / "train", n_per_class=5, seed=1, tile_px=64)


@pytest.fixture(scope="module")
def base():
    return build_backbone(SPEC)


@pytest.fixture(scope="module")
def tuned(tiles, tmp_path_factory):
    """One uninterrupted tiny run (shared by the output tests and the resume test)."""
    folder = tmp_path_factory.mktemp("tuned")
    summary = finetune(
        SPEC, TINY, tiles, None, folder / "ftx.safetensors", folder / "work", device="cpu", progress=False
    )
    return folder, summary


def test_settings_from_config_overlay_the_defaults():
    settings = FinetuneSettings.from_config(
        {"finetune": {"train_dir": "x", "val_dir": None, "batch_size": 8, "step2": {"lr": 0.01}}, "seed": 4}
    )
    assert settings.batch_size == 8 and settings.seed == 4
    assert settings.step2.lr == 0.01 and settings.step2.unfreeze_from == FinetuneSettings().step2.unfreeze_from
    with pytest.raises(FinetuneError, match="unknown key.*epochz"):
        FinetuneSettings.from_config({"finetune": {"epochz": 1}, "seed": 0})
    with pytest.raises(FinetuneError, match="finetune.step1.optimizer: 'rmsprop'"):
        FinetuneSettings.from_config({"finetune": {"step1": {"optimizer": "rmsprop"}}, "seed": 0})


def test_tile_folder_errors_name_the_folder_or_file(tmp_path, tiles):
    (tmp_path / "one" / "A").mkdir(parents=True)
    (tmp_path / "one" / "A" / "a.png").write_bytes((tiles / "ADI" / "ADI-0.png").read_bytes())
    with pytest.raises(FinetuneError, match="1 class sub-folder.*at least 2"):
        scan_tile_folder(tmp_path / "one")
    (tmp_path / "one" / "B").mkdir()
    with pytest.raises(FinetuneError, match=r"class folder '.*B' has no images"):
        scan_tile_folder(tmp_path / "one")
    (tmp_path / "one" / "B" / "broken.tif").write_text("not an image")
    folder = scan_tile_folder(tmp_path / "one")
    from pathwsi.finetune.tilesets import read_tile

    with pytest.raises(FinetuneError, match=r"cannot read tile '.*broken.tif'"):
        read_tile(folder.files[-1], 64)
    with pytest.raises(FinetuneError, match="has classes \\['A', 'B'\\] but the model was trained on"):
        scan_tile_folder(tmp_path / "one", classes=("ADI", "BACK"))
    with pytest.raises(FinetuneError, match="not found"):
        scan_tile_folder(tmp_path / "missing")


def test_split_is_stratified_and_seeded(tiles):
    found = scan_tile_folder(tiles)
    train, val = stratified_split(found, 0.2, seed=0)
    assert set(val.counts().values()) == {1} and set(train.counts().values()) == {4}
    assert stratified_split(found, 0.2, seed=0)[1].files == val.files != stratified_split(found, 0.2, seed=1)[1].files
    assert not set(train.files) & set(val.files)


def test_augmentation_is_seeded_and_keeps_the_tile():
    tile = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    settings = AugmentSettings()
    assert np.array_equal(augment(tile, settings, 5), augment(tile, settings, 5))
    assert augment(tile, settings, 5).shape == tile.shape and augment(tile, settings, 5).dtype == np.uint8
    assert np.array_equal(augment(tile, AugmentSettings(flips=False, rot90=False, colour_jitter=0.0), 5), tile)


def test_only_the_head_and_the_unfrozen_blocks_train(base):
    assert trainable_blocks(base.net, "block11", "k")[:6] == ["block11", "block12", "conv3", "bn3", "act3", "conv4"]
    with pytest.raises(FinetuneError, match="k.unfreeze_from: 'block99'.*choose one of conv1, bn1"):
        trainable_blocks(base.net, "block99", "k")
    model = TileClassifier(base.net, base.feature_dim, 3, 0.0)
    params = set_trainable(model, ["conv4", "bn4"], train_batchnorm=False)
    expected = [*model.net.conv4.parameters(), *model.net.bn4.parameters(), *model.head.parameters()]
    assert {id(p) for p in params} == {id(p) for p in expected}
    assert not model.net.training and not model.net.bn4.training and model.head.training
    set_trainable(model, ["conv4", "bn4"], train_batchnorm=True)
    assert model.net.bn4.training and not model.net.bn3.training


def test_outputs_load_as_the_ftx_model_with_provenance(tuned, base, tmp_path):
    folder, summary = tuned
    work = folder / "work"
    assert not (work / CHECKPOINT).exists() and (work / "head.safetensors").is_file()
    ftx = build_backbone(ModelSpec("ftx", weights=str(folder / "ftx.safetensors"), input_px=64))
    tuned_state, base_state = ftx.net.state_dict(), base.net.state_dict()
    assert torch.equal(tuned_state["block1.skip.weight"], base_state["block1.skip.weight"])  # frozen
    assert torch.equal(tuned_state["bn2.running_var"], base_state["bn2.running_var"])  # frozen BatchNorm
    assert not torch.equal(
        tuned_state["conv4.pointwise.weight"], base_state["conv4.pointwise.weight"]
    )  # trained in step 2
    with safe_open(str(folder / "ftx.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["base"])["weights_sha256"] == base.weights_sha256 and meta["untrained_base"] == "true"
    assert (
        json.loads(meta["classes"])[0] == "ADI" and json.loads(meta["settings"])["step2"]["unfreeze_from"] == "block12"
    )
    assert summary["best"]["step"] in (1, 2) and summary["weights_sha256"] == ftx.weights_sha256
    assert (
        meta["arch"] == "keras_xception" == json.loads(meta["base"])["arch"]
    )  # FTX is the fine-tuned Keras-exact network
    assert {m.eps for m in ftx.net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    with pytest.raises(WeightsError, match="trained as architecture 'keras_xception'.*arch is 'legacy_xception'"):
        build_backbone(ModelSpec("ftx", arch="legacy_xception", weights=str(folder / "ftx.safetensors"), input_px=64))
    lines = (work / "metrics.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert len(lines) == 1 + 3 and {"train_loss", "val_loss", "val_acc", "val_acc_ADI", "val_acc_TUM"} <= set(header)
    assert [line.split("\t")[:2] for line in lines[1:]] == [["1", "1"], ["2", "1"], ["2", "2"]]
    curves = Image.open(work / "curves.png")
    assert curves.format == "PNG" and curves.width > 600 and summary["curves"] == str(work / "curves.png")
    plot_run_curves(
        work / "metrics.tsv", work / "summary.json", tmp_path / "redrawn.png"
    )  # rule finetune_curves: the figure from the files alone
    redrawn = np.asarray(Image.open(tmp_path / "redrawn.png"))
    assert redrawn.shape == np.asarray(curves).shape
    moved = (redrawn != np.asarray(curves)).any(axis=-1).mean()  # metrics.tsv holds 6 significant digits
    assert moved < 0.002, moved


def test_each_epoch_is_one_line_on_stderr_and_in_the_log(tiles, tmp_path, capfd):
    """Under Snakemake stderr is the terminal of the run: it shows every epoch, not only the job's log."""
    import logging

    from pathwsi.runtime.logs import job_log

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    short = replace(TINY, step2=replace(TINY.step2, epochs=1))
    try:
        with job_log(tmp_path / "finetune.log"):
            finetune(SPEC, short, tiles, None, tmp_path / "ftx.safetensors", tmp_path / "work", device="cpu")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err, log = capfd.readouterr().err, (tmp_path / "finetune.log").read_text()
    for step in (1, 2):
        line = re.search(
            rf"fine-tuning step {step} epoch 1/1: train loss [0-9.]+ acc [0-9.]+, val loss [0-9.]+ acc", err
        )
        assert line and line.group(0) in log
    assert "fine-tuning 'imgnet' on" not in err  # other INFO lines stay in the log


def test_a_killed_run_resumes_to_the_same_weights(tiles, tuned, tmp_path):
    class Killed(Exception):
        pass

    def kill(step: int, epoch: int, batch: int) -> None:
        if (step, epoch, batch) == (2, 2, 1):
            raise Killed

    out, work = tmp_path / "ftx.safetensors", tmp_path / "work"
    with pytest.raises(Killed):
        finetune(SPEC, TINY, tiles, None, out, work, device="cpu", progress=False, on_batch=kill)
    assert (work / CHECKPOINT).is_file() and not out.exists()
    assert len((work / "metrics.tsv").read_text().splitlines()) == 1 + 2
    finetune(SPEC, TINY, tiles, None, out, work, device="cpu", progress=False)
    expected = dict(safe_open(str(tuned[0] / "ftx.safetensors"), framework="pt").metadata())
    with (
        safe_open(str(out), framework="pt") as resumed,
        safe_open(str(tuned[0] / "ftx.safetensors"), framework="pt") as uninterrupted,
    ):
        for key in uninterrupted.keys():
            assert torch.equal(resumed.get_tensor(key), uninterrupted.get_tensor(key)), key
        assert resumed.metadata()["best"] == expected["best"]

    def results(path: Path) -> list[list[str]]:  # metrics without the timing columns
        return [line.split("\t")[:-2] for line in path.read_text().splitlines()]

    assert results(work / "metrics.tsv") == results(tuned[0] / "work" / "metrics.tsv")


def test_a_checkpoint_from_other_settings_is_refused_unless_restarting(tiles, tmp_path):
    out, work = tmp_path / "ftx.safetensors", tmp_path / "work"

    def stop(step: int, epoch: int, batch: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    short = replace(TINY, step2=replace(TINY.step2, epochs=1))
    with pytest.raises(KeyboardInterrupt):
        finetune(SPEC, short, tiles, None, out, work, device="cpu", progress=False, on_batch=stop)
    other = replace(short, seed=9)
    with pytest.raises(FinetuneError, match="made with other settings.*--restart"):
        finetune(SPEC, other, tiles, None, out, work, device="cpu", progress=False)
    finetune(
        SPEC,
        replace(other, step2=replace(other.step2, epochs=0)),
        tiles,
        None,
        out,
        work,
        device="cpu",
        progress=False,
        restart=True,
    )
    assert out.is_file()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_bf16_step_on_cuda(tiles, tmp_path):
    settings = replace(TINY, step1=replace(TINY.step1, epochs=1), step2=replace(TINY.step2, epochs=1))
    summary = finetune(
        SPEC, settings, tiles, None, tmp_path / "ftx.safetensors", tmp_path / "work", device="cuda", progress=False
    )
    lines = (tmp_path / "work" / "metrics.tsv").read_text().splitlines()
    assert len(lines) == 3 and np.isfinite(float(lines[-1].split("\t")[3]))
    assert summary["weights_sha256"]


HOLD_LOCK = "import sys, time; from pathlib import Path; from pathwsi.runtime.locks import hold_exclusive; h = hold_exclusive(Path(sys.argv[1]), 'test'); print('held', flush=True); time.sleep(600)"


def test_a_second_run_in_the_folder_waits_for_the_first(tiles, tmp_path):
    """A leftover fine-tuning job of a killed run and its rerun never write the same checkpoint at once."""
    import subprocess
    import sys
    import threading

    from pathwsi.finetune.train import LOCK

    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(work / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        run = threading.Thread(
            target=finetune,
            args=(
                SPEC,
                replace(TINY, step2=replace(TINY.step2, epochs=0)),
                tiles,
                None,
                tmp_path / "ftx.safetensors",
                work,
            ),
            kwargs={"device": "cpu", "progress": False},
        )
        run.start()
        run.join(3)
        assert run.is_alive() and not (work / CHECKPOINT).exists() and not (tmp_path / "ftx.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    run.join(120)
    assert not run.is_alive() and (tmp_path / "ftx.safetensors").is_file()
