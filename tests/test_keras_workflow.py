"""A workflow run whose `imgnet` is a converted Keras file stores what `keras_xception` computes on the
slide's normalized tiles: the features job uses the file, the architecture and the resize it is given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_keras_convert import keras_layers, seeded_xception, write_weights_h5
from workflow_project import Row, make_project, snakemake

from pathwsi.cli import main
from pathwsi.demo.labelled_tiles import CLASSES, render_tile
from pathwsi.features.backbones import ModelSpec, build_backbone
from pathwsi.features.extract import SlideTiles
from pathwsi.features.store import open_store
from pathwsi.samples import Sample
from pathwsi.stain.macenko import StainFit
from pathwsi.stain.torch_apply import normalize_batch

INPUT_PX = 96  # the 64 px tiles enlarged; two of the four stride-2 pools then see even inputs


def keras_file(folder: Path) -> Path:
    """A Keras-layout notop .h5 of a seeded Xception whose BatchNorm statistics are those of H&E-like tiles
    (so that its features differ between tiles and between the two architectures, as trained weights do)."""
    net = seeded_xception(11)
    tiles = torch.from_numpy(np.stack([render_tile(label, 0, seed=5, tile_px=INPUT_PX) for label in CLASSES])).permute(
        0, 3, 1, 2
    )
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # running statistics := this batch's
    with torch.no_grad():
        net.train()(tiles.float() / 127.5 - 1)
    return write_weights_h5(folder / "xception_notop.h5", keras_layers(net.eval(), first_auto=1))


@pytest.mark.slow
def test_stored_imgnet_features_are_the_modules_output(tmp_path, slides):
    weights = tmp_path / "imgnet.safetensors"
    assert main(["convert-keras", str(keras_file(tmp_path)), str(weights)]) == 0
    backbones = {
        "imgnet": {"arch": "keras_xception", "weights": str(weights), "input_px": INPUT_PX},
        "ftx": {"arch": "test_resnet", "weights": "untrained", "input_px": 64, "seed": 1},
    }
    project = make_project(
        tmp_path / "project", [Row("c1", "s1", "p1", slides.svs_025)], {"models": {"backbones": backbones}}
    )
    done = snakemake(project, "--cores", "2", "results/features/s1.zarr")
    assert done.returncode == 0, done.stdout[-3000:]

    store = open_store(project / "results" / "features" / "s1.zarr")
    assert store.attrs["models"]["imgnet"]["arch"] == "keras_xception"
    meta = json.loads((project / "results" / "tiles" / "s1.json").read_text())
    table = pq.read_table(project / "results" / "tiles" / "s1.parquet")
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    tiles = SlideTiles(Sample("c1", "s1", "p1", str(slides.svs_025)), coords, meta["tile"]["px"], meta["tile"]["mpp"])
    batch = torch.stack([tiles[i][0] for i in range(len(tiles))]).permute(0, 3, 1, 2)
    stain = StainFit.from_json(meta["stain"])
    normalized = normalize_batch(
        batch, stain.params, stain.target, io=stain.settings.io, beta=stain.settings.beta, out_dtype=torch.uint8
    )
    model = build_backbone(ModelSpec("imgnet", weights=str(weights), input_px=INPUT_PX))
    with torch.inference_mode():
        expected = model.net(model.prepare(normalized)).numpy()
    stored = store.features("imgnet")[:]
    assert stored.shape == expected.shape and len(stored) > 20
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    timm_net = build_backbone(ModelSpec("imgnet", arch="legacy_xception", weights=str(weights), input_px=INPUT_PX)).net
    with torch.inference_mode():  # the check can tell the architectures apart
        timm_features = timm_net(model.prepare(normalized)).numpy()
    assert np.linalg.norm(timm_features - stored) > 100 * np.linalg.norm(stored - expected)
