"""The batched torch apply: same result as the numpy path, on CPU and CUDA; folder normalization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stain_fixtures import REFERENCE_STAINS, rotate_stains, synth_he

from pathwsi.stain.image_folders import FITS_LOG, find_images, normalize_files, read_rgb
from pathwsi.stain.macenko import StainSettings, default_reference, fit_macenko, normalize_array
from pathwsi.stain.torch_apply import normalize_batch

LAB_B_STAINS = rotate_stains(REFERENCE_STAINS, 8.0, seed=3)


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """Four 96-px tiles of lab B's stain, one of them blank glass."""
    image = synth_he(192, stains=LAB_B_STAINS, max_conc=(1.4, 1.3), seed=2)
    out = np.stack([image[:96, :96], image[96:, :96], image[:96, 96:], image[96:, 96:]])
    out[3] = 242
    return out


def _nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(0, 2, 3, 1).cpu().numpy()


def test_torch_equals_numpy(tiles: np.ndarray) -> None:
    source, target = fit_macenko(tiles), default_reference()
    expected = normalize_array(tiles, source, target)
    got = normalize_batch(_nchw(tiles), source, target)
    assert got.dtype == torch.uint8 and got.shape == (4, 3, 96, 96)
    diff = np.abs(_nhwc(got).astype(np.int16) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float32 rounding ties only
    assert np.array_equal(_nhwc(got)[3], tiles[3])  # glass stays glass


def test_float_in_and_out(tiles: np.ndarray) -> None:
    source, target = fit_macenko(tiles), default_reference()
    as_uint8 = normalize_batch(_nchw(tiles), source, target, out_dtype=torch.float32)
    as_float = normalize_batch(_nchw(tiles).float() / 255, source, target, out_dtype=torch.float32)
    assert as_uint8.dtype == torch.float32 and as_uint8.min() >= 0 and as_uint8.max() <= 1
    assert torch.allclose(as_uint8, as_float, atol=1e-5)
    rounded = normalize_batch(_nchw(tiles), source, target)
    assert (as_uint8 * 255 - rounded.float()).abs().max() <= 0.5 + 1e-3


def test_one_source_per_tile(tiles: np.ndarray) -> None:
    target = default_reference()
    sources = [fit_macenko(tiles[i]) for i in range(3)] + [target]
    batched = normalize_batch(_nchw(tiles), sources, target)
    for i, source in enumerate(sources):
        assert torch.equal(batched[i : i + 1], normalize_batch(_nchw(tiles[i : i + 1]), source, target))
    with pytest.raises(ValueError, match="source stain models"):
        normalize_batch(_nchw(tiles), sources[:2], target)


def test_cpu_chunking_does_not_change_results(tiles: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    import pathwsi.stain.torch_apply as stain_torch

    source, target = fit_macenko(tiles), default_reference()
    whole = normalize_batch(_nchw(tiles), source, target)
    monkeypatch.setattr(stain_torch, "CPU_CHUNK_PIXELS", 1)
    assert torch.equal(whole, normalize_batch(_nchw(tiles), source, target))


def test_rejects_bad_shapes_and_accepts_empty_batches(tiles: np.ndarray) -> None:
    reference = default_reference()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normalize_batch(torch.from_numpy(tiles), reference, reference)
    assert normalize_batch(torch.zeros((0, 3, 8, 8), dtype=torch.uint8), reference, reference).shape == (0, 3, 8, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu(tiles: np.ndarray) -> None:
    source, target = fit_macenko(tiles), default_reference()
    cpu = normalize_batch(_nchw(tiles), source, target, out_dtype=torch.float32)
    cuda = normalize_batch(_nchw(tiles).cuda(), source, target, out_dtype=torch.float32)
    assert cuda.is_cuda
    assert torch.allclose(cpu, cuda.cpu(), atol=2e-5)
    assert (
        normalize_batch(_nchw(tiles).cuda(), source, target).cpu().int()
        - normalize_batch(_nchw(tiles), source, target).int()
    ).abs().max() <= 1


def test_torchstain_torch_backend_parity() -> None:
    normalizers = pytest.importorskip("torchstain.torch.normalizers")
    target_image, source_image = synth_he(192, seed=1), synth_he(192, stains=LAB_B_STAINS, max_conc=(1.4, 1.3), seed=2)
    theirs = normalizers.TorchMacenkoNormalizer()
    theirs.fit(torch.from_numpy(target_image).permute(2, 0, 1))
    expected, _, _ = theirs.normalize(torch.from_numpy(source_image).permute(2, 0, 1), stains=False)
    ours = normalize_batch(_nchw(source_image[None]), fit_macenko(source_image), fit_macenko(target_image))
    assert np.abs(_nhwc(ours)[0].astype(np.int16) - expected.numpy()).mean() <= 2.0


# -- files and folders --------------------------------------------------------------------------


@pytest.fixture()
def tile_folder(tmp_path: Path, tiles: np.ndarray) -> Path:
    """A class-folder layout like NCT-CRC-HE-100K, mixed formats, plus a non-image file."""
    root = tmp_path / "NCT"
    for name, tile, cls, suffix in [
        ("a", tiles[0], "TUM", ".tif"),
        ("b", tiles[1], "TUM", ".png"),
        ("c", tiles[2], "STR", ".jpg"),
        ("d", tiles[3], "BACK", ".tif"),
    ]:
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(root / cls / f"{name}{suffix}")
    (root / "README.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("fit", ["per-image", "shared"])
def test_normalize_files_mirrors_folders(tile_folder: Path, tmp_path: Path, fit: str) -> None:
    out = tmp_path / f"out-{fit}"
    target = default_reference()
    written = normalize_files([tile_folder], out, target, StainSettings(), fit=fit, batch_size=3)  # type: ignore[arg-type]
    assert written == 4
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != FITS_LOG)
    assert names == ["BACK/d.tif", "STR/c.jpg", "TUM/a.tif", "TUM/b.png"]
    records = [json.loads(line) for line in (out / FITS_LOG).read_text().splitlines()]
    assert len(records) == (4 if fit == "per-image" else 1)
    a_in, a_out = read_rgb(tile_folder / "TUM" / "a.tif"), read_rgb(out / "TUM" / "a.tif")
    assert a_out.shape == a_in.shape and np.abs(a_out.astype(int) - a_in).mean() > 2  # restained
    assert np.array_equal(read_rgb(out / "BACK" / "d.tif"), read_rgb(tile_folder / "BACK" / "d.tif"))  # glass kept
    if fit == "per-image":
        by_file = {r["file"]: r for r in records}
        assert by_file["BACK/d.tif"]["status"] == "fallback" and by_file["TUM/a.tif"]["status"] == "fitted"
        expected = normalize_array(a_in, fit_macenko(a_in), target)
        assert np.abs(a_out.astype(int) - expected).max() <= 1
    assert normalize_files([tile_folder], out, target) == 0  # resumes: nothing left to do


def test_find_images_rules(tile_folder: Path, tmp_path: Path) -> None:
    single = tile_folder / "TUM" / "a.tif"
    assert find_images([single], tmp_path / "o") == [(single, tmp_path / "o" / "a.tif")]
    with pytest.raises(ValueError, match="written to"):
        find_images([single, tile_folder / "TUM"], tmp_path / "o")
    with pytest.raises(ValueError, match="inside input folder"):
        find_images([tile_folder], tile_folder / "normalized")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        find_images([empty], tmp_path / "x")
