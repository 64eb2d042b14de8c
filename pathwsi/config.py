"""Validate the workflow config against its schema (shipped as package data), reporting every problem at once,
each with the key it concerns and what to do about it; check what the config names exists."""

from __future__ import annotations

import glob
from copy import deepcopy
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from pathwsi.errors import ConfigError

if TYPE_CHECKING:
    from pathwsi.samples import Sample

FTX_WEIGHTS = "results/models/ftx.safetensors"  # what rule finetune writes


@cache
def _schema_text(name: str) -> str:
    return resources.files("pathwsi").joinpath("data", "schemas", f"{name}.schema.yaml").read_text(encoding="utf-8")


def load_schema(name: str) -> dict[str, Any]:
    """The JSON schema (YAML) `<name>` (config, samples) shipped in `pathwsi/data/schemas`; a fresh copy."""
    return yaml.safe_load(_schema_text(name))


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a copy of `config` with defaults filled in, or raise ConfigError listing every problem."""
    schema = schema or load_schema("config")
    filled = deepcopy(config)
    _fill_defaults(filled, schema)
    problems = [_describe_config_error(err) for err in jsonschema.Draft202012Validator(schema).iter_errors(filled)]
    problems = problems or _range_problems(filled)
    if problems:
        raise ConfigError("config", sorted(problems))
    return filled


def _range_problems(config: dict[str, Any]) -> list[str]:
    """Pairs of keys that the schema checks one by one but not together."""
    tissue = config["tissue"]
    problems = []
    if tissue["min_saturation"] > tissue["max_saturation"]:
        problems.append(
            f"key 'tissue.min_saturation': {tissue['min_saturation']} is above tissue.max_saturation {tissue['max_saturation']}; the Otsu threshold is clamped to [min, max], so give min <= max"
        )
    low, high = tissue["pen_hue"]
    if low >= high:
        problems.append(
            f"key 'tissue.pen_hue': [{low}, {high}] is not a range [low, high]; give the lower hue first (blue/green ink: [0.3, 0.64])"
        )
    return problems


def _fill_defaults(instance: dict[str, Any], schema: dict[str, Any]) -> None:
    """Insert schema defaults for missing keys, recursing into objects."""
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(instance[key], sub)


def _describe_config_error(err: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = ", ".join(f"'{where + '.' if where else ''}{k}'" for k in sorted(set(err.instance) - set(allowed)))
        return f"key {extra}: unknown; remove or rename it (allowed here: {', '.join(allowed)})"
    return f"key '{where or '(top level)'}': {err.message}; see config/README.md for what it takes"


def load_config(*paths: Path) -> dict[str, Any]:
    """Read YAML config files, each overlaid on the ones before it key by key (as `snakemake --configfile` overlays
    config/config.yaml), and validate the result."""
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(str(path), [f"cannot read it as YAML: {err}"]) from err
        if not isinstance(data, dict):
            raise ConfigError(str(path), ["the top level must be a mapping of keys to values"])
        overlay(merged, data)
    return validate_config(merged)


def overlay(base: dict[str, Any], changes: dict[str, Any]) -> None:
    """Merge `changes` into `base` in place: mappings key by key, recursively; anything else replaces."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            overlay(base[key], value)
        else:
            base[key] = deepcopy(value)


def _fine_tuned_arch_problems(config: dict[str, Any]) -> list[str]:
    """A backbone that reads the fine-tuned weights must name the architecture they are trained in (the base's)."""
    backbones, base = config["models"]["backbones"], config["finetune"]["base"]
    if base not in backbones:
        return []
    default = load_schema("config")["properties"]["models"]["properties"]["backbones"]["additionalProperties"][
        "properties"
    ]["arch"]["default"]
    archs = {name: entry.get("arch", default) for name, entry in backbones.items()}
    return [
        f"key 'models.backbones.{name}.arch': '{archs[name]}', but its weights {FTX_WEIGHTS} are fine-tuned from "
        f"finetune.base '{base}' of architecture '{archs[base]}'; give both the same arch (keras_xception for the paper's network)"
        for name, entry in backbones.items()
        if entry["weights"] == FTX_WEIGHTS and archs[name] != archs[base]
    ]


def _weights_file_problems(config: dict[str, Any]) -> list[str]:
    """A backbone's weights must be a file that exists, unless rule finetune writes it (or they are untrained / hub)."""
    return [
        f"key 'models.backbones.{name}.weights': file '{entry['weights']}' not found; give a .safetensors or .pth file "
        "(`pathwsi weights` writes ImageNet weights), or 'untrained' for the demo"
        for name, entry in config["models"]["backbones"].items()
        if entry["weights"] not in ("untrained", "hub", FTX_WEIGHTS) and not Path(entry["weights"]).is_file()
    ]


def _tile_folder_warnings(config: dict[str, Any]) -> list[str]:
    """Labelled tile folders that rules finetune and tissue_experiment will need and that are not there (a run that
    only tiles needs neither, so these are warnings at start, not errors)."""
    fine_tuned = [n for n, e in config["models"]["backbones"].items() if e["weights"] == FTX_WEIGHTS]
    needed = (
        [("finetune.train_dir", f"rule finetune (the weights of {', '.join(fine_tuned)}) needs it")]
        if fine_tuned
        else []
    )
    needed.append(("tissue_experiment.test_dir", "rule tissue_experiment needs it"))
    warnings = []
    for key, why in needed:
        section, name = key.split(".")
        folder = config[section][name]
        if folder and not Path(folder).is_dir():
            warnings.append(
                f"key '{key}': folder '{folder}' not found; {why}: put the labelled tiles there (class sub-folders) or set the key"
            )
    return warnings


def _device_warnings(config: dict[str, Any]) -> list[str]:
    """A machine without an NVIDIA device (found without importing torch: this runs at every start): CUDA asked for
    fails, 'auto' runs on the CPU (said here once for the run, not by every job)."""
    device = config["features"]["device"]
    if glob.glob("/dev/nvidia[0-9]*") or device == "cpu":
        return []
    if device == "auto":
        return ["key 'features.device': 'auto', and this machine has no NVIDIA GPU: features jobs that run here use the "
                "CPU (slow; fine for the demo; on a cluster they run on GPU nodes)"]  # fmt: skip
    return [
        f"key 'features.device': '{device}', but this machine has no NVIDIA GPU (no /dev/nvidia*); "
        "features jobs that run here will fail (on a cluster, they run on GPU nodes: then this is expected)"
    ]


def _untrained_warnings(config: dict[str, Any]) -> list[str]:
    """Backbones with untrained weights, and those fine-tuned from one: said once at the start of a run."""
    backbones, base = config["models"]["backbones"], config["finetune"]["base"]
    untrained = [name for name, entry in backbones.items() if entry["weights"] == "untrained"]
    from_untrained = [n for n, e in backbones.items() if e["weights"] == FTX_WEIGHTS and base in untrained]
    warnings = [
        f"model '{name}' has UNTRAINED, seeded weights: its features are for demos and tests only" for name in untrained
    ]
    return warnings + [f"model '{name}' is fine-tuned from the UNTRAINED '{base}': its features are for demos and tests only" for name in from_untrained]  # fmt: skip


def check_cross_references(config: dict[str, Any], samples: list[Sample]) -> list[str]:
    """Raise ConfigError listing every key that names something missing (a target table or weights file
    that is not a file, a compared or fine-tuned model that is not a backbone, a fine-tuned model of
    another architecture than its base); return warnings for `targets.cohorts` entries whose cohort is
    not in this sample sheet (they are skipped) and for CUDA asked for on a machine without a GPU."""
    cohorts = {s.cohort for s in samples}
    backbones = set(config["models"]["backbones"])
    problems, warnings = [], []
    for cohort, tables in config["targets"]["cohorts"].items():
        tables = tables or {}
        if cohort not in cohorts:
            warnings.append(
                f"key 'targets.cohorts.{cohort}': no such cohort in the sample sheet (it has {', '.join(sorted(cohorts))}); no predictors for it"
            )
            continue
        for kind in ("expression", "mutations"):
            if tables.get(kind) and not Path(tables[kind]).is_file():
                problems.append(
                    f"key 'targets.cohorts.{cohort}.{kind}': file '{tables[kind]}' not found; `pathwsi import-expression` / `pathwsi import-maf` make these tables (docs/targets.md)"
                )
        if not tables.get("expression") and not tables.get("mutations"):
            problems.append(f"key 'targets.cohorts.{cohort}': give an `expression` and/or a `mutations` table")
    for key, names in (
        ("predict.compare", config["predict"]["compare"]),
        ("finetune.base", [config["finetune"]["base"]]),
        ("tissue_experiment.models", config["tissue_experiment"]["models"]),
    ):
        missing = [n for n in names if n not in backbones]
        if missing:
            problems.append(f"key '{key}': {missing} not among models.backbones ({', '.join(sorted(backbones))})")
    problems += _fine_tuned_arch_problems(config) + _weights_file_problems(config)
    if problems:
        raise ConfigError("config", problems)
    return warnings + _tile_folder_warnings(config) + _untrained_warnings(config) + _device_warnings(config)
