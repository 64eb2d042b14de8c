"""What the workflow's rules record as params: Snakemake reruns a job whose params changed, deleting its finished
outputs first. A setting or sheet column added after results could already exist is therefore left out of the
params while it holds the value that gave those results, so that upgrading pathwsi keeps finished tiles and feature
stores (tests/test_upgrade.py runs the previous release's workflow, then this one's)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pathwsi.samples import Sample

# (section, key) -> the value that reproduces results made before the setting existed
ADDED_SETTINGS: dict[tuple[str, str], Any] = {("tiling", "backend"): "auto", ("stain", "method"): "macenko"}
# sheet column -> its value in rows written before it existed
ADDED_COLUMNS: dict[str, Any] = {"backend": None}
NOT_PARAMS = ("site",)  # only the predictors read it: editing it reruns no slide job


def settings_params(config: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    """These config sections, without the added settings that hold their earlier value."""
    params = {}
    for section in sections:
        values = config[section]
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if ADDED_SETTINGS.get((section, k), object()) != v}
        params[section] = values
    return params


def sample_params(sample: Sample) -> dict[str, Any]:
    """A sheet row as a slide job's params (`Sample(**params)` gives the row back, less `site`)."""
    return {
        k: v
        for k, v in asdict(sample).items()
        if k not in NOT_PARAMS and not (k in ADDED_COLUMNS and v == ADDED_COLUMNS[k])
    }
