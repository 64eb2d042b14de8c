"""Feature extraction: store contents, resume after SIGKILL, empty slides, CPU vs CUDA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pathwsi.errors import ConfigError
from pathwsi.features.backbones import ModelSpec, build_backbone
from pathwsi.features.extract import ExtractSettings, extract_slide
from pathwsi.features.store import PROGRESS, open_store, partial_path
from pathwsi.samples import Sample
from pathwsi.slides.tile_job import TilingJobSettings, TilingOutputs, tile_slide
from pathwsi.slides.tile_record import TilesRecord
from pathwsi.stain.macenko import normalize_array

pytestmark = pytest.mark.filterwarnings("ignore:model '.*' uses UNTRAINED weights")
SPECS = [
    ModelSpec("small_a", arch="test_resnet", input_px=64, seed=1),
    ModelSpec("small_b", arch="test_resnet", input_px=64, seed=2),
]
SETTINGS = ExtractSettings(batch_size=4, chunk_tiles=8, num_workers=0)
KILL_SETTINGS = ExtractSettings(batch_size=2, chunk_tiles=2, num_workers=0)  # many small chunks to kill between


@pytest.fixture(scope="module")
def tiled(slides, tmp_path_factory):
    """The 0.25 µm/px test slide tiled: sample, coords, fractions, metadata."""
    folder = tmp_path_factory.mktemp("tiled")
    sample = Sample("c", "section", "p", str(slides.svs_025))
    out = TilingOutputs.under(folder, "section")
    tile_slide(sample, TilingJobSettings(), out)
    meta = TilesRecord.load(out.meta)  # as the feature job reads it (stain parameters rounded as stored)
    table = pq.read_table(out.tiles)
    coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    return sample, coords, table.column("tissue_fraction").to_numpy(), meta


def models(device="cpu"):
    return [build_backbone(spec, device=device) for spec in SPECS]


@pytest.mark.parametrize("reader", ["fast", "exact"])
def test_store_matches_features_computed_directly(tiled, tmp_path, reader):
    """Features of tiles read as `features.reader` says (exact: OpenSlide's read_region itself)."""
    from dataclasses import replace

    from pathwsi.slides.readers import open_tile_reader
    from pathwsi.slides.slide import Slide

    sample, coords, fractions, meta = tiled
    nets = models()
    extract_slide(sample, coords, fractions, meta, nets, replace(SETTINGS, reader=reader), tmp_path / "s.zarr")
    store = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.coords(), coords)
    np.testing.assert_allclose(store.group["tissue"][:], fractions)
    fit = meta.stain
    picked = [0, len(coords) // 2, len(coords) - 1]
    with Slide(sample.path) as slide:
        if reader == "exact":
            tiles = np.stack([slide.read_region(*coords[i], 224, 224, 0.5) for i in picked])
        else:
            with open_tile_reader(slide, 0.5, 224) as fast:
                tiles = np.stack([fast.read(*coords[i]) for i in picked])
    normalized = torch.from_numpy(normalize_array(tiles, fit.params, fit.target)).permute(0, 3, 1, 2)
    for model in nets:
        with torch.inference_mode():
            expected = model.net(model.prepare(normalized)).numpy()
        stored = store.features(model.spec.name)[picked].astype(np.float32)
        np.testing.assert_allclose(stored, expected, rtol=2e-2, atol=2e-3)
    attrs = store.attrs
    assert attrs["reader"] == reader
    assert attrs["models"]["small_a"]["untrained"] is True and len(attrs["warnings"]) == 2
    assert attrs["stain"]["status"] == "fitted" and attrs["tile"]["mpp"] == 0.5


def test_the_dataset_reads_with_the_reader_asked_for(tiled):
    from pathwsi.features.extract import SlideTiles
    from pathwsi.slides.slide import Slide

    sample, coords, _, _ = tiled
    with Slide(sample.path) as slide:
        openslide_tile = slide.read_region(*coords[0], 224, 224, 0.5)
    exact, fast = (
        SlideTiles(sample, coords, 224, 0.5, exact=True)[0][0].numpy(),
        SlideTiles(sample, coords, 224, 0.5)[0][0].numpy(),
    )
    np.testing.assert_array_equal(exact, openslide_tile)
    assert 0 < np.abs(fast.astype(int) - openslide_tile).mean() < 1.5  # the DCT half-scale decode: close, not equal


@pytest.mark.parametrize("reader", ["fast", "exact"])
def test_tiles_that_cannot_be_decoded_are_recorded_and_the_rest_extracted(slides, tiled, tmp_path, reader):
    """A damaged JPEG tile met while extracting (tiling read only a sample of level 0) stops neither the slide nor the batch."""
    from dataclasses import replace

    sample, coords, fractions, meta = tiled
    settings, nets = replace(SETTINGS, reader=reader), models()
    extract_slide(sample, coords, fractions, meta, nets, settings, tmp_path / "clean.zarr")
    damaged = replace(sample, slide_id="damaged", path=str(slides.damaged_tiles))
    extract_slide(damaged, coords, fractions, meta, nets, settings, tmp_path / "damaged.zarr")
    clean, store = open_store(tmp_path / "clean.zarr"), open_store(tmp_path / "damaged.zarr")
    readable, unreadable = store.readable(), store.attrs["unreadable_tiles"]
    assert 0 < unreadable["count"] == (~readable).sum() < len(coords) // 4
    first = unreadable["tiles"][0]
    assert (
        [first["x"], first["y"]] == coords[first["index"]].tolist()
        and "JPEG tile" in first["reason"]
        and "cannot be decoded" in first["reason"]
    )
    for model in ("small_a", "small_b"):
        assert np.isnan(store.features(model)[:][~readable]).all()
        np.testing.assert_array_equal(store.features(model)[:][readable], clean.features(model)[:][readable])


def test_a_complete_store_with_the_same_settings_is_kept_without_reading_a_tile(tiled, tmp_path):
    """What a second writer finds when the first one it waited for has finished."""
    sample, coords, fractions, meta = tiled
    nets = models()
    extract_slide(sample, coords, fractions, meta, nets, SETTINGS, tmp_path / "s.zarr")
    written = (tmp_path / "s.zarr" / "manifest.json").stat().st_mtime_ns
    again = extract_slide(sample, coords, fractions, meta, nets, SETTINGS, tmp_path / "s.zarr")
    assert again["tiles"] == 0 and again["read"] == 0.0
    assert (tmp_path / "s.zarr" / "manifest.json").stat().st_mtime_ns == written


def test_the_reader_setting_is_part_of_the_config_hash(tiled):
    from pathwsi.features.extract import settings_hash

    _, _, _, meta = tiled
    nets = models()
    assert settings_hash(meta, nets, "float16", "fast") != settings_hash(meta, nets, "float16", "exact")
    with pytest.raises(ConfigError, match="key 'features.reader': 'dct' is not one of"):
        ExtractSettings(reader="dct")


def test_the_architecture_is_part_of_the_provenance_and_config_hash(tiled, tmp_path):
    """One weights file run as Keras's Xception or as timm's gives different features: never the same hash."""
    from pathwsi.features.backbones import save_weights
    from pathwsi.features.extract import settings_hash, store_attrs

    _, _, _, meta = tiled
    weights = tmp_path / "w.safetensors"
    save_weights(build_backbone(ModelSpec("imgnet", arch="legacy_xception")).net.state_dict(), weights, {})
    keras, timm_port = (
        build_backbone(ModelSpec("imgnet", arch=arch, weights=str(weights)))
        for arch in ("keras_xception", "legacy_xception")
    )
    assert keras.weights_sha256 == timm_port.weights_sha256
    assert settings_hash(meta, [keras], "float16", "fast") != settings_hash(meta, [timm_port], "float16", "fast")
    sample = tiled[0]
    assert store_attrs(sample, meta, [keras], SETTINGS)["models"]["imgnet"]["arch"] == "keras_xception"


def test_every_model_sees_the_same_normalized_batch(tiled, tmp_path):
    sample, coords, fractions, meta = tiled
    twin = [build_backbone(SPECS[0]), build_backbone(ModelSpec("twin", arch="test_resnet", input_px=64, seed=1))]
    extract_slide(sample, coords, fractions, meta, twin, SETTINGS, tmp_path / "t.zarr")
    store = open_store(tmp_path / "t.zarr")
    np.testing.assert_array_equal(store.features("small_a")[:], store.features("twin")[:])


def test_empty_slide_gives_a_valid_empty_store(tiled, tmp_path):
    sample, _, _, _ = tiled
    meta = TilesRecord(sample, "no_tissue", "no tissue detected", {}, "test")
    extract_slide(
        sample, np.zeros((0, 2), np.int64), np.zeros(0, np.float32), meta, models(), SETTINGS, tmp_path / "e.zarr"
    )
    store = open_store(tmp_path / "e.zarr")
    assert store.features("small_a").shape == (0, 96) and store.attrs["tiling_status"] == "no_tissue"


CHILD = """
import json, sys, time, numpy as np, torch, warnings
warnings.simplefilter("ignore")
torch.set_num_threads(1)  # as the parent (one_torch_thread): at another count a conv's sums can differ in the last bit
from pathlib import Path
from pathwsi.samples import Sample
from pathwsi.features.extract import ExtractSettings, extract_slide
from pathwsi.features.backbones import ModelSpec, build_backbone
from pathwsi.slides.tile_record import TilesRecord
args = json.loads(sys.argv[1])
nets = [build_backbone(ModelSpec(**spec)) for spec in args["specs"]]
nets[0].net.register_forward_hook(lambda *a: time.sleep(args["delay"]))
extract_slide(Sample(**args["sample"]), np.array(args["coords"]), np.array(args["fractions"], np.float32), TilesRecord.from_json(args["meta"]), nets,
              ExtractSettings(**args["settings"]), Path(args["store"]))
"""


def run_child(tiled, store: Path, delay: float) -> subprocess.Popen:
    sample, coords, fractions, meta = tiled
    from dataclasses import asdict

    args = {
        "sample": asdict(sample),
        "coords": coords.tolist(),
        "fractions": fractions.tolist(),
        "meta": meta.to_json(),
        "store": str(store),
        "delay": delay,
        "specs": [asdict(s) for s in SPECS],
        "settings": asdict(KILL_SETTINGS),
    }
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stderr=subprocess.PIPE, text=True)


def chunks_done(store: Path) -> int:
    try:
        return json.loads((partial_path(store) / PROGRESS).read_text())["chunks_done"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_chunks", [0, 1, 3])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tiled, tmp_path, kill_after_chunks, one_torch_thread):
    sample, coords, fractions, meta = tiled
    assert len(coords) > 4 * KILL_SETTINGS.aligned_chunk, "the test slide needs several chunks"
    reference = tmp_path / "reference.zarr"
    extract_slide(sample, coords, fractions, meta, models(), KILL_SETTINGS, reference)

    store = tmp_path / "killed.zarr"
    child = run_child(tiled, store, delay=0.2)
    deadline = time.time() + 120
    while chunks_done(store) < kill_after_chunks and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not store.exists(), "killed before finishing: nothing may appear at the final path"
    assert chunks_done(store) >= kill_after_chunks

    extract_slide(sample, coords, fractions, meta, models(), KILL_SETTINGS, store)
    a, b = open_store(reference), open_store(store)
    assert a.attrs == b.attrs
    for name in ["coords", "tissue", "features/small_a", "features/small_b"]:
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_match_cpu_within_bf16_tolerance(tiled, tmp_path):
    sample, coords, fractions, meta = tiled
    extract_slide(sample, coords, fractions, meta, models("cpu"), SETTINGS, tmp_path / "cpu.zarr")
    extract_slide(sample, coords, fractions, meta, models("cuda"), SETTINGS, tmp_path / "gpu.zarr")
    cpu, gpu = open_store(tmp_path / "cpu.zarr"), open_store(tmp_path / "gpu.zarr")
    for name in ("small_a", "small_b"):
        a, b = cpu.features(name)[:].astype(np.float32), gpu.features(name)[:].astype(np.float32)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        assert cosine.min() > 0.99
