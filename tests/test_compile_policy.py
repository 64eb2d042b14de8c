"""features.compile: when the models are compiled, where Inductor's cache goes, the padded last batch,
and (on CUDA) compiled features against eager ones."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gpu_decode import tiled_slide

from pathwsi.errors import ConfigError
from pathwsi.features import compile_policy
from pathwsi.features.backbones import ModelSpec, build_backbone
from pathwsi.features.compile_policy import CompileSettings, cache_dir, decide, is_warm, job_nets, mark_warm, setup_key
from pathwsi.features.extract import ExtractSettings, _launch, extract_slide
from pathwsi.features.store import open_store

pytestmark = pytest.mark.filterwarnings("ignore:model '.*' uses UNTRAINED weights")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SPEC = ModelSpec("small", arch="test_resnet", input_px=64, seed=1)


@pytest.fixture(scope="module")
def tiled(slides, tmp_path_factory):
    return tiled_slide(slides.svs_025, tmp_path_factory.mktemp("tiled"))


@pytest.mark.parametrize("tiles, warm", [(10, False), (10**7, True)])
def test_auto_never_compiles_on_the_cpu(tiles, warm):
    assert decide(CompileSettings("auto"), CPU, tiles, warm).compile is False


@pytest.mark.parametrize(
    "tiles, warm, expected",
    [(100_000, False, True), (99_999, False, False), (10_000, True, True), (9_999, True, False)],
)
def test_auto_compiles_on_cuda_for_enough_tiles_fewer_when_the_cache_is_warm(tiles, warm, expected):
    decision = decide(CompileSettings("auto"), CUDA, tiles, warm)
    assert decision.compile is expected and ("warm" if warm else "cold") in decision.why


@pytest.mark.parametrize("setting", [True, False])
def test_true_and_false_are_obeyed_on_any_device(setting):
    assert decide(CompileSettings(setting), CPU, 1, False).compile is setting
    assert decide(CompileSettings(setting), CUDA, 10**7, True).compile is setting


def test_the_setting_accepts_auto_and_yaml_booleans_only():
    from pathwsi.config import validate_config

    assert validate_config({})["features"]["compile"] == "auto" == ExtractSettings().compile
    assert validate_config({"features": {"compile": True}})["features"]["compile"] is True
    with pytest.raises(ConfigError, match="features.compile"):
        ExtractSettings(compile="yes")


def test_the_cache_folder_is_the_configs_then_the_environments_then_the_users(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(None) == tmp_path / "xdg" / "pathwsi" / "inductor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir(None) == Path.home() / ".cache" / "pathwsi" / "inductor"


def test_using_the_cache_folder_points_inductor_at_it(monkeypatch, tmp_path):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductors

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unused")
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    compile_policy.use_cache_dir(tmp_path / "inductor")
    assert inductors() == str(tmp_path / "inductor") and (tmp_path / "inductor").is_dir()
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache


def test_a_compile_marks_the_cache_warm_for_the_same_setup_only(tmp_path):
    models = [build_backbone(SPEC)]
    key = setup_key(models, 32, 224, CPU)
    assert not is_warm(tmp_path, key)
    mark_warm(tmp_path, key, 61.0, was_warm=False)
    mark_warm(tmp_path, key, 4.0, was_warm=True)
    assert is_warm(tmp_path, key) and not is_warm(tmp_path, setup_key(models, 64, 224, CPU))
    record = (tmp_path / compile_policy.MARKERS / f"{key}.json").read_text()
    assert '"cold_s": 61.0' in record and '"latest_s": 4.0' in record


def test_auto_on_the_cpu_runs_eagerly_and_touches_no_cache(tmp_path):
    models = [build_backbone(SPEC)]
    nets, record = job_nets(models, CPU, 10**6, 8, 224, CompileSettings("auto", str(tmp_path / "c")), _fail)
    assert nets["small"] is models[0].net and record["compiled"] is False and "cpu" in record["why"]
    assert not (tmp_path / "c").exists()


def _fail(nets) -> None:
    raise RuntimeError("no C++ compiler")


def test_a_failing_compile_falls_back_to_eager_under_auto_and_is_an_error_when_true(monkeypatch, tmp_path):
    models = [build_backbone(SPEC)]
    monkeypatch.setattr(compile_policy, "decide", lambda *a: compile_policy.CompileDecision(True, "test"))
    nets, record = job_nets(models, CPU, 1, 8, 224, CompileSettings("auto", str(tmp_path)), _fail)
    assert nets["small"] is models[0].net and record["compiled"] is False and "failed" in record["why"]
    with pytest.raises(RuntimeError, match="set features.compile to auto or false"):
        job_nets(models, CPU, 1, 8, 224, CompileSettings(True, str(tmp_path)), _fail)


def test_the_padded_last_batch_gives_the_features_of_the_unpadded_one(tiled):
    """A compiled model sees one batch shape: 3 tiles padded to 8 with white ones, their features dropped."""
    from pathwsi.features.extract import SlideTiles

    sample, coords, _, meta = tiled
    tiles = torch.stack([SlideTiles(sample, coords, 224, 0.5)[i][0] for i in range(3)])
    models = [build_backbone(SPEC)]
    nets = {"small": models[0].net}
    plain = _launch(tiles, [""] * 3, meta.stain, models, nets, CPU).wait({"normalize": 0, "model": 0})
    padded = _launch(tiles, [""] * 3, meta.stain, models, nets, CPU, pad_to=8).wait({"normalize": 0, "model": 0})
    assert padded["small"].shape == plain["small"].shape == (3, models[0].feature_dim)
    np.testing.assert_allclose(padded["small"], plain["small"], rtol=1e-5, atol=1e-6)


def extract_small(tiled, settings: ExtractSettings, store: Path) -> dict[str, float]:
    """Extract the tiled slide's tiles with the small test model; its timings."""
    sample, coords, fractions, meta = tiled
    return extract_slide(sample, coords, fractions, meta, [build_backbone(SPEC)], settings, store)


def test_extraction_on_the_cpu_records_that_nothing_was_compiled(tiled, tmp_path):
    timings = extract_small(tiled, ExtractSettings(batch_size=8, num_workers=0), tmp_path / "s.zarr")
    assert timings["compiled"] == 0.0 and timings["compile"] == 0.0


def test_compile_true_on_the_cpu_gives_the_eager_features(tiled, tmp_path, monkeypatch):
    """Inductor's CPU backend on a tiny model (needs a C++ compiler; about 20 s on 2 cores); the last batch is padded."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")  # the job points it at its cache
    sample, coords, fractions, meta = tiled
    first_21 = (sample, coords[:21], fractions[:21], meta)  # 8 + 8 + 5: the last batch is padded
    settings = ExtractSettings(batch_size=8, num_workers=0, compile_cache=str(tmp_path / "inductor"))
    extract_small(first_21, replace(settings, compile=False), tmp_path / "eager.zarr")
    started = time.perf_counter()
    timings = extract_small(first_21, replace(settings, compile=True), tmp_path / "compiled.zarr")
    assert timings["compiled"] == 1.0 and 0 < timings["compile"] <= time.perf_counter() - started
    assert list((tmp_path / "inductor" / compile_policy.MARKERS).glob("*.json"))
    eager, compiled = (open_store(tmp_path / f"{name}.zarr").features("small")[:] for name in ("eager", "compiled"))
    np.testing.assert_allclose(compiled.astype(np.float32), eager.astype(np.float32), rtol=1e-2, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_features_match_eager_within_bf16_tolerance_on_cuda(tiled, tmp_path):
    sample, coords, fractions, meta = tiled
    coords, fractions = coords[:70], fractions[:70]  # 32 + 32 + 6: the last batch is padded
    settings = ExtractSettings(batch_size=32, num_workers=0, compile_cache=str(tmp_path / "inductor"))
    stores = {}
    for setting in (False, True):
        models = [
            build_backbone(SPEC, device="cuda"),
            build_backbone(ModelSpec("xception", input_px=224), device="cuda"),
        ]
        timings = extract_slide(
            sample, coords, fractions, meta, models, replace(settings, compile=setting), tmp_path / f"{setting}.zarr"
        )
        assert timings["compiled"] == float(setting)
        stores[setting] = open_store(tmp_path / f"{setting}.zarr")
    for name in ("small", "xception"):
        eager, compiled = (stores[s].features(name)[:].astype(np.float32) for s in (False, True))
        cosine = (eager * compiled).sum(1) / (np.linalg.norm(eager, axis=1) * np.linalg.norm(compiled, axis=1) + 1e-12)
        assert cosine.min() > 0.999, name
        np.testing.assert_allclose(compiled, eager, rtol=5e-2, atol=5e-2 * np.abs(eager).max())


def test_the_jobs_timings_record_says_which_reader_and_whether_compiled(slides, tmp_path, one_torch_thread):
    """(one_torch_thread: the job sets torch's threads for the process; the fixture puts them back.)"""
    import json

    from pathwsi.features.feature_job import run_feature_job
    from pathwsi.samples import Sample
    from pathwsi.slides.tile_job import TilingJobSettings, TilingOutputs, tile_slide

    sample = Sample("c", "section", "p", str(slides.svs_025))
    out = TilingOutputs.under(tmp_path, "section")
    tile_slide(sample, TilingJobSettings(), out)
    models = {"allow_network": False, "backbones": {"small": {"arch": "test_resnet", "input_px": 64}}}
    settings = ExtractSettings(batch_size=16, num_workers=0, device="cpu", reader="auto")
    run_feature_job(sample, out.tiles, out.meta, tmp_path / "s.zarr", tmp_path / "t.json", models, settings)
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["reader"] == "fast" and record["compiled"] is False  # auto on the CPU: both
    assert record["seconds"]["compile"] == 0.0 and "decode" in record["seconds"] and "compiled" not in record["seconds"]
