"""The rules' params leave out settings and sheet columns added since a run while they hold their earlier value, and
keep them as soon as they differ (a changed setting still reruns what it shapes)."""

from __future__ import annotations

from workflow_project import ROOT

from pathwsi.config import load_config
from pathwsi.rerun_params import ADDED_SETTINGS, sample_params, settings_params
from pathwsi.samples import Sample

SECTIONS = ("seed", "tiling", "tissue", "stain")


def test_added_settings_at_their_earlier_value_are_left_out_and_nothing_else():
    config = load_config(ROOT / "config" / "config.yaml")
    params = settings_params(config, SECTIONS)
    assert "backend" not in params["tiling"] and "method" not in params["stain"]
    for section in SECTIONS[1:]:
        left_out = set(config[section]) - set(params[section])
        assert left_out == {key for s, key in ADDED_SETTINGS if s == section}
    assert params["seed"] == config["seed"] and params["tissue"] == config["tissue"]


def test_an_added_setting_changed_from_its_earlier_value_is_in_the_params():
    config = load_config(ROOT / "config" / "config.yaml")
    config["stain"]["method"] = "vahadane"
    config["tiling"]["backend"] = "tiatoolbox"
    params = settings_params(config, SECTIONS)
    assert params["stain"]["method"] == "vahadane" and params["tiling"]["backend"] == "tiatoolbox"


def test_a_sample_row_gives_its_params_and_back():
    row = Sample("c1", "s1", "p1", "/slides/s1.svs", mpp=0.25, site="A1")
    assert sample_params(row) == {"cohort": "c1", "slide_id": "s1", "patient_id": "p1", "path": "/slides/s1.svs", "mpp": 0.25}  # fmt: skip
    chosen = Sample("c1", "s1", "p1", "/slides/s1.dcm", backend="tiatoolbox")
    assert sample_params(chosen)["backend"] == "tiatoolbox"
    assert Sample(**sample_params(chosen)) == chosen
