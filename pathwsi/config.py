"""Validate the workflow config and the sample sheet against their schemas, reporting every
problem at once, each with the key or row it concerns and what to do about it."""

from __future__ import annotations

import csv
import glob
import math
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "workflow" / "schemas"
REQUIRED_COLUMNS = ("cohort", "slide_id", "patient_id", "path")
OPTIONAL_COLUMNS = ("mpp", "site")
FTX_WEIGHTS = "results/models/ftx.safetensors"  # what rule finetune writes


class ConfigError(Exception):
    """One or more problems with the config or the sample sheet; `problems` lists them all."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{listing}")


@dataclass(frozen=True)
class Sample:
    """One row of the sample sheet."""

    cohort: str
    slide_id: str
    patient_id: str
    path: str
    mpp: float | None = None
    site: str | None = None


def load_schema(name: str, schema_dir: Path = SCHEMA_DIR) -> dict[str, Any]:
    """Read `workflow/schemas/<name>.schema.yaml`."""
    return yaml.safe_load((schema_dir / f"{name}.schema.yaml").read_text())


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
        problems.append(f"key 'tissue.min_saturation': {tissue['min_saturation']} is above tissue.max_saturation {tissue['max_saturation']}; the Otsu threshold is clamped to [min, max], so give min <= max")
    low, high = tissue["pen_hue"]
    if low >= high:
        problems.append(f"key 'tissue.pen_hue': [{low}, {high}] is not a range [low, high]; give the lower hue first (blue/green ink: [0.3, 0.64])")
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


def load_config(path: Path) -> dict[str, Any]:
    """Read and validate a YAML config file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(str(path), [f"cannot read it as YAML: {err}"]) from err
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["the top level must be a mapping of keys to values"])
    return validate_config(data)


def load_samples(path: str | Path, check_files: bool = True, schema: dict[str, Any] | None = None) -> list[Sample]:
    """Read and validate the tab-separated sample sheet; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["sample sheet not found; set `samples:` in the config to your sheet, or run `pathwsi demo` for the demo cohort"])
    schema = schema or load_schema("samples")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's UTF-8 byte-order mark is fine
        rows = [row for row in csv.reader(handle, delimiter="\t") if row and not row[0].startswith("#")]
    if not rows:
        raise ConfigError(str(path), ["the sheet is empty; it needs a header row: " + "\t".join(REQUIRED_COLUMNS)])
    header, body = [h.strip() for h in rows[0]], rows[1:]
    problems = _header_problems(header)
    if any(column not in header for column in REQUIRED_COLUMNS):
        raise ConfigError(str(path), problems)
    samples: list[Sample] = []
    for line, row in enumerate(body, start=2):
        record, row_problems = _parse_row(header, row, line)
        if row_problems:
            problems += row_problems
            continue
        where = f"row {line} (slide_id '{record.get('slide_id', '?')}')"
        row_problems += sample_problems(record, where, schema)
        if check_files and isinstance(record.get("path"), str) and record["path"]:
            row_problems += _slide_file_problems(Path(record["path"]), where)
        problems += row_problems
        if not row_problems:
            samples.append(Sample(**record))
    problems += _duplicate_problems(body, header)
    if not body:
        problems.append("the sheet has a header but no rows; add one row per slide")
    if problems:
        raise ConfigError(str(path), problems)
    return samples


def _slide_file_problems(path: Path, where: str) -> list[str]:
    if path.is_dir():
        return [f"{where}: slide path '{path}' is a directory, not a slide file; give the file itself (for MIRAX, the .mrxs beside its folder)"]
    if not path.is_file():
        return [f"{where}: slide file '{path}' not found; fix the path (relative paths start from the directory you run snakemake in), or run `pathwsi demo` for the demo slides"]
    return []


def sample_problems(record: dict[str, Any], where: str, schema: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with one sample-sheet row (as a dict of its columns), each naming `where` and the column."""
    validator = jsonschema.Draft202012Validator(schema or load_schema("samples"))
    return [f"{where}: column '{_column_of(err)}' {err.message}; {_fix_for(_column_of(err))}" for err in validator.iter_errors(record)]


def _header_problems(header: list[str]) -> list[str]:
    known = set(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    problems = [f"missing column '{c}'; the header must name {', '.join(REQUIRED_COLUMNS)} (tab-separated)" for c in REQUIRED_COLUMNS if c not in header]
    problems += [f"unknown column '{c}'; allowed columns are {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}" for c in header if c not in known]
    problems += [f"column '{c}' appears more than once" for c in sorted({c for c in header if header.count(c) > 1})]
    return problems


def _parse_row(header: list[str], row: list[str], line: int) -> tuple[dict[str, Any], list[str]]:
    """Map a row onto the header; empty optional cells become None, mpp becomes a float."""
    if len(row) != len(header):
        return {}, [f"row {line}: has {len(row)} cells but the header has {len(header)}; check for missing or extra tabs"]
    record: dict[str, Any] = {}
    problems: list[str] = []
    for column, cell in zip(header, (c.strip() for c in row)):
        if column not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            continue
        if column in OPTIONAL_COLUMNS and cell == "":
            record[column] = None
        elif column == "mpp":
            try:
                value = float(cell)
                record[column] = value if math.isfinite(value) else cell
            except ValueError:
                record[column] = cell
        else:
            record[column] = cell
    return record, problems


def _column_of(err: jsonschema.ValidationError) -> str:
    if err.absolute_path:
        return str(err.absolute_path[0])
    return str(err.instance) if err.validator == "additionalProperties" else "?"


_FIXES = {
    "slide_id": "use only letters, digits, '.', '_' and '-' (it becomes a file name), not starting with '.' or '-'",
    "cohort": "use only letters, digits, '.', '_' and '-', not starting with '.' or '-'",
    "patient_id": "give the patient every slide belongs to (for TCGA, the first 12 characters of the barcode)",
    "path": "give the slide file's path",
    "mpp": "write the level-0 µm/px as a number (e.g. 0.25 for 40x, 0.5 for 20x), or leave it empty to use the file's value",
    "site": "give the tissue source site, or leave it empty",
}


def _fix_for(column: str) -> str:
    return _FIXES.get(column, "see config/README.md")


def _duplicate_problems(body: list[list[str]], header: list[str]) -> list[str]:
    if "slide_id" not in header:
        return []
    index = header.index("slide_id")
    seen: dict[str, int] = {}
    problems = []
    for line, row in enumerate(body, start=2):
        if len(row) <= index:
            continue
        slide_id = row[index].strip()
        if slide_id in seen:
            problems.append(f"row {line}: slide_id '{slide_id}' already used on row {seen[slide_id]}; slide ids must be unique across all cohorts")
        else:
            seen[slide_id] = line
    return problems


def _fine_tuned_arch_problems(config: dict[str, Any]) -> list[str]:
    """A backbone that reads the fine-tuned weights must name the architecture they are trained in (the base's)."""
    backbones, base = config["models"]["backbones"], config["finetune"]["base"]
    if base not in backbones:
        return []
    default = load_schema("config")["properties"]["models"]["properties"]["backbones"]["additionalProperties"]["properties"]["arch"]["default"]
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


def _device_warnings(config: dict[str, Any]) -> list[str]:
    """CUDA asked for on a machine without an NVIDIA device (without importing torch: this runs at every start)."""
    if not config["features"]["device"].startswith("cuda") or glob.glob("/dev/nvidia[0-9]*"):
        return []
    return [f"key 'features.device': '{config['features']['device']}', but this machine has no NVIDIA GPU (no /dev/nvidia*); "
            "features jobs that run here will fail (on a cluster, they run on GPU nodes: then this is expected)"]


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
            warnings.append(f"key 'targets.cohorts.{cohort}': no such cohort in the sample sheet (it has {', '.join(sorted(cohorts))}); no predictors for it")
            continue
        for kind in ("expression", "mutations"):
            if tables.get(kind) and not Path(tables[kind]).is_file():
                problems.append(f"key 'targets.cohorts.{cohort}.{kind}': file '{tables[kind]}' not found; `pathwsi import-expression` / `pathwsi import-maf` make these tables (docs/targets.md)")
        if not tables.get("expression") and not tables.get("mutations"):
            problems.append(f"key 'targets.cohorts.{cohort}': give an `expression` and/or a `mutations` table")
    for key, names in (("predict.compare", config["predict"]["compare"]), ("finetune.base", [config["finetune"]["base"]]), ("tissue_experiment.models", config["tissue_experiment"]["models"])):
        missing = [n for n in names if n not in backbones]
        if missing:
            problems.append(f"key '{key}': {missing} not among models.backbones ({', '.join(sorted(backbones))})")
    problems += _fine_tuned_arch_problems(config) + _weights_file_problems(config)
    if problems:
        raise ConfigError("config", problems)
    return warnings + _device_warnings(config)
