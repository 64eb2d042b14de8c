"""Macenko fit, plausibility and fallback, targets, the numpy apply and the QC panel (no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stain_fixtures import LAB_B_STAINS, REFERENCE_STAINS, cosines, synth_he

from pathwsi.stain.macenko import (
    StainFit,
    StainFitError,
    StainParams,
    StainSettings,
    default_reference,
    fit_macenko,
    fit_slide,
    load_target,
    normalize_array,
    od_transform,
    optical_density,
    qc_panel,
)

SETTINGS = StainSettings()


# -- fitting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stains", "max_conc"), [(REFERENCE_STAINS, (1.97, 1.03)), (LAB_B_STAINS, (1.4, 1.3))])
def test_fit_recovers_known_stain_vectors(stains: np.ndarray, max_conc: tuple[float, float]) -> None:
    params = fit_macenko(synth_he(256, stains=stains, max_conc=max_conc, seed=7))
    assert np.all(cosines(params.stain_matrix, stains) >= 0.995)
    assert np.linalg.norm(params.stain_matrix, axis=0) == pytest.approx([1.0, 1.0])
    # the 99th percentile of a concentration map whose maximum is max_conc: a little below it
    assert np.all(params.max_conc <= np.array(max_conc) * 1.05)
    assert np.all(params.max_conc >= np.array(max_conc) * 0.8)


def test_pixel_cap_changes_the_fit_little(source_image: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    import pathwsi.stain.macenko as stain

    full = fit_macenko(source_image)
    monkeypatch.setattr(stain, "MAX_FIT_PIXELS", 5000)
    capped = fit_macenko(source_image)
    assert np.all(cosines(capped.stain_matrix, full.stain_matrix) >= 0.999)
    assert np.allclose(capped.max_conc, full.max_conc, rtol=0.03)


def test_fit_orders_hematoxylin_first(source_image: np.ndarray) -> None:
    params = fit_macenko(source_image)
    assert params.stain_matrix[0, 0] > params.stain_matrix[0, 1]  # H absorbs red more than E


def test_fit_matches_torchstain(target_image: np.ndarray, source_image: np.ndarray) -> None:
    normalizers = pytest.importorskip("torchstain.numpy.normalizers")
    for image in (target_image, source_image):
        theirs = normalizers.NumpyMacenkoNormalizer()
        theirs.fit(image)
        assert np.all(cosines(fit_macenko(image).stain_matrix, theirs.HERef) >= 0.99)


def test_normalize_matches_torchstain(target_image: np.ndarray, source_image: np.ndarray) -> None:
    normalizers = pytest.importorskip("torchstain.numpy.normalizers")
    theirs = normalizers.NumpyMacenkoNormalizer()
    theirs.fit(target_image)
    expected, _, _ = theirs.normalize(source_image, stains=False)
    ours = normalize_array(source_image, fit_macenko(source_image), fit_macenko(target_image))
    assert np.abs(ours.astype(np.int16) - expected.astype(np.int16)).mean() <= 2.0


def test_normalize_matches_tiatoolbox(target_image: np.ndarray, source_image: np.ndarray) -> None:
    stainnorm = pytest.importorskip("tiatoolbox.tools.stainnorm")
    theirs = stainnorm.MacenkoNormalizer()
    theirs.fit(target_image.copy())  # tiatoolbox edits its input in place
    assert np.all(cosines(fit_macenko(target_image, io=255).stain_matrix, theirs.stain_matrix_target.T) >= 0.99)
    expected = theirs.transform(source_image.copy())
    ours = normalize_array(source_image, fit_macenko(source_image, io=255), fit_macenko(target_image, io=255), io=255)
    assert np.abs(ours.astype(np.int16) - expected.astype(np.int16)).mean() <= 3.0


def test_fit_needs_tissue_pixels() -> None:
    with pytest.raises(StainFitError, match="too few tissue pixels"):
        fit_macenko(np.full((32, 32, 3), 250, np.uint8))


def test_fit_rejects_non_uint8() -> None:
    with pytest.raises(TypeError, match="uint8"):
        fit_macenko(np.zeros((8, 8, 3), np.float32))


def _noisy(colour: tuple[int, int, int], sigma: float = 3.0, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(np.full((size, size, 3), colour) + rng.normal(0, sigma, (size, size, 3)), 0, 255).astype(np.uint8)


BAD_INPUTS = {
    "white": (np.full((64, 64, 3), 255, np.uint8), "too few tissue pixels"),
    "black": (np.zeros((64, 64, 3), np.uint8), "degenerate"),
    "tiny": (np.array([[[120, 60, 160], [200, 100, 180]]], np.uint8), "too few tissue pixels"),
    "single colour": (np.full((64, 64, 3), (200, 100, 180), np.uint8), "degenerate"),
    "pure background": (_noisy((242, 242, 242), 2.0), "too few tissue pixels"),
    "noisy single colour": (_noisy((120, 60, 160)), "apart"),
    "noisy grey": (_noisy((100, 100, 100)), "implausible hematoxylin"),
    "hematoxylin only": (synth_he(96, stains=np.repeat(REFERENCE_STAINS[:, :1], 2, axis=1), seed=5), "apart"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_fit_slide_falls_back_without_raising(name: str) -> None:
    image, reason = BAD_INPUTS[name]
    target = default_reference()
    fit = fit_slide([image], SETTINGS, target)
    assert fit.status == "fallback"
    assert reason in fit.reason
    assert fit.params is target
    record = json.loads(json.dumps(fit.to_json()))
    assert record["status"] == "fallback" and record["reason"] == fit.reason and record["fallback"] == "target"


def test_fit_slide_with_no_tiles() -> None:
    fit = fit_slide([], SETTINGS, default_reference())
    assert (fit.status, fit.n_tiles, fit.n_pixels) == ("fallback", 0, 0)


def test_fallback_reference_policy_uses_shipped_reference(target_image: np.ndarray) -> None:
    user_target = fit_macenko(target_image)
    fit = fit_slide([np.full((8, 8, 3), 255, np.uint8)], replace(SETTINGS, fallback="reference"), user_target)
    assert np.array_equal(fit.params.stain_matrix, default_reference().stain_matrix)
    assert fit.target is user_target


def test_fit_slide_fits_tiles(source_image: np.ndarray) -> None:
    tiles = np.stack([source_image[:128, :128], source_image[128:, 128:]])
    fit = fit_slide(tiles, SETTINGS, default_reference())
    assert fit.status == "fitted" and fit.reason is None
    assert (fit.n_tiles, fit.n_pixels) == (2, 2 * 128 * 128)
    assert 0 < fit.n_od_pixels <= fit.n_pixels
    assert np.all(cosines(fit.params.stain_matrix, LAB_B_STAINS) >= 0.99)
    assert fit.angles_deg["separation"] > SETTINGS.min_separation_deg


def test_implausible_angles_fall_back(source_image: np.ndarray) -> None:
    strict = replace(SETTINGS, max_angle_deg=2.0)  # lab B's vectors are 8° off the canonical ones
    fit = fit_slide([source_image], strict, default_reference())
    assert fit.status == "fallback" and "implausible" in fit.reason
    assert fit.fitted is not None and fit.angles_deg is not None


def test_stain_fit_json_round_trip(source_image: np.ndarray) -> None:
    fit = fit_slide([source_image], SETTINGS, default_reference())
    record = fit.to_json()
    again = StainFit.from_json(json.loads(json.dumps(record)))
    assert again.to_json() == record
    assert again.settings == SETTINGS


# -- params, settings, targets ------------------------------------------------------------------


def test_params_json_uses_plain_types_and_unit_vectors() -> None:
    params = StainParams(np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 4.0]]), [1.5, 0.5])
    record = params.to_json()
    assert json.loads(json.dumps(record)) == record
    assert record["stain_matrix"] == [[1.0, 0.0], [0.0, 0.6], [0.0, 0.8]]
    assert np.allclose(StainParams.from_json(record).stain_matrix, params.stain_matrix)


@pytest.mark.parametrize("max_conc", [[0.0, 1.0], [1.0, float("nan")]])
def test_params_reject_nonsense(max_conc: list[float]) -> None:
    with pytest.raises(ValueError):
        StainParams(REFERENCE_STAINS, max_conc)


def test_default_reference_is_macenko_reference() -> None:
    reference = default_reference()
    assert np.allclose(reference.stain_matrix, REFERENCE_STAINS, atol=1e-3)
    assert reference.max_conc.tolist() == [1.9705, 1.0308]


def test_settings_from_config_rejects_unknown_keys() -> None:
    assert StainSettings.from_config({"stain": {"io": 250}}).io == 250
    with pytest.raises(ValueError, match="unknown key"):
        StainSettings.from_config({"stain": {"Io": 250}})
    with pytest.raises(ValueError, match="fallback"):
        StainSettings(fallback="skip")  # type: ignore[arg-type]


def test_load_target_from_image_and_json(tmp_path: Path, target_image: np.ndarray) -> None:
    assert load_target(SETTINGS) is default_reference()
    image_path = tmp_path / "target.png"
    Image.fromarray(target_image).save(image_path)
    fitted = load_target(replace(SETTINGS, target=str(image_path)))
    assert np.allclose(fitted.stain_matrix, fit_macenko(target_image).stain_matrix)
    json_path = tmp_path / "target.json"
    json_path.write_text(json.dumps(fitted.to_json()))
    assert np.allclose(load_target(replace(SETTINGS, target=str(json_path))).max_conc, fitted.max_conc, atol=1e-5)


def test_load_target_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_target(replace(SETTINGS, target=str(tmp_path / "missing.png")))
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((32, 32, 3), 250, np.uint8)).save(blank)
    with pytest.raises(ValueError, match="cannot be fitted"):
        load_target(replace(SETTINGS, target=str(blank)))


# -- applying -----------------------------------------------------------------------------------


def test_normalize_recovers_target_stains(source_image: np.ndarray) -> None:
    """Lab B's image normalized to the reference looks like the same tissue stained by the reference."""
    source, target = fit_macenko(source_image), default_reference()
    restained = synth_he(
        256, stains=REFERENCE_STAINS, max_conc=np.array([1.4, 1.3]) * target.max_conc / source.max_conc, seed=2
    )
    ours = normalize_array(source_image, source, target)
    assert np.abs(ours.astype(np.int16) - restained).mean() < 1.5
    assert np.abs(source_image.astype(np.int16) - restained).mean() > 5.0


def test_background_stays_background(source_image: np.ndarray) -> None:
    """Glass (at or above io - 1 in every channel) is untouched; near-white moves only a little."""
    source, target = fit_macenko(source_image), default_reference()
    glass = np.arange(SETTINGS.io - 1, 256, dtype=np.uint8)
    pixels = np.stack(np.meshgrid(glass, glass, glass), axis=-1).reshape(-1, 1, 3)
    assert np.array_equal(normalize_array(pixels, source, target), pixels)
    near_white = np.stack(np.meshgrid(*[np.arange(231, 240, dtype=np.uint8)] * 3), axis=-1).reshape(-1, 1, 3)
    assert np.all(optical_density(near_white, SETTINGS.io).max(axis=-1) < SETTINGS.beta / 4)
    assert np.abs(normalize_array(near_white, source, target).astype(np.int16) - near_white).max() <= 3


def test_faint_pixels_move_by_their_weight(source_image: np.ndarray) -> None:
    """Below beta a pixel moves by w = max OD / beta of its full Macenko change (in OD)."""
    source, target = fit_macenko(source_image), default_reference()
    faint = np.stack(np.meshgrid(*[np.arange(206, 240, 3, dtype=np.uint8)] * 3), axis=-1).reshape(-1, 3)
    od = optical_density(faint, SETTINGS.io).astype(np.float64)
    weight = np.clip(od.max(axis=-1, keepdims=True) / SETTINGS.beta, 0, 1)
    assert np.all(weight < 1)
    full = od @ od_transform(source, target).T
    expected = np.clip(SETTINGS.io * np.exp(-(od + weight * (full - od))) - 1, 0, 255)
    out = normalize_array(faint, source, target)
    assert np.abs(out - expected).max() <= 0.51


def test_normalize_is_continuous_at_beta(source_image: np.ndarray) -> None:
    """No seam where pixels cross the background threshold: neighbouring greys map to neighbours."""
    source, target = fit_macenko(source_image), default_reference()
    ramp = np.repeat(np.arange(150, 256, dtype=np.uint8), 3).reshape(-1, 1, 3)
    out = normalize_array(ramp, source, target).astype(np.int16)
    assert np.abs(np.diff(out[:, 0], axis=0)).max() <= 3


def test_normalize_to_itself_changes_little(target_image: np.ndarray) -> None:
    params = fit_macenko(target_image)
    assert np.abs(normalize_array(target_image, params, params).astype(np.int16) - target_image).mean() < 1.0


def test_normalize_batch_of_images_equals_each(source_image: np.ndarray) -> None:
    source, target = fit_macenko(source_image), default_reference()
    tiles = np.stack([source_image[:64, :64], source_image[64:128, 64:128]])
    out = normalize_array(tiles, source, target)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    assert np.array_equal(out[1], normalize_array(tiles[1], source, target))


# -- QC and imports -----------------------------------------------------------------------------


def test_qc_panel_two_rows(source_image: np.ndarray) -> None:
    before = [source_image[:64, :64], source_image[64:128, :64], source_image[:50, :40]]
    after = [255 - t for t in before]
    panel = qc_panel(before, after, gap=4)
    assert panel.shape == (2 * 64 + 12, 3 * 68 + 4, 3) and panel.dtype == np.uint8
    assert np.array_equal(panel[4:68, 4:68], before[0])
    assert np.array_equal(panel[72:136, 72:136], after[1])
    with pytest.raises(ValueError):
        qc_panel(before, after[:2])


def test_fit_and_numpy_apply_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from pathwsi.stain.macenko import StainSettings, default_reference, fit_slide, normalize_array, qc_panel\n"
        "tile = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)\n"
        "fit = fit_slide([tile], StainSettings(), default_reference())\n"
        "qc_panel([tile], [normalize_array(tile, fit.params, fit.target)])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
