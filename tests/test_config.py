"""Config and sample-sheet validation: every problem reported at once, naming the key or row."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from workflow_project import demo_config

from pathwsi.config import check_cross_references, load_config, load_schema, validate_config
from pathwsi.demo.cohort import DEMO_SLIDES, demo_config_text, sheet_text
from pathwsi.errors import ConfigError
from pathwsi.features.backbones import ModelSpec
from pathwsi.features.extract import ExtractSettings
from pathwsi.finetune.tissue_experiment import ExperimentSettings
from pathwsi.finetune.train import FinetuneSettings
from pathwsi.predict.aggregate import check_statistics
from pathwsi.predict.evaluate import EvaluationSettings
from pathwsi.predict.predict_job import TargetSettings
from pathwsi.predict.tile_models import HeatmapSettings
from pathwsi.runtime.dask_scheduler import DaskScheduler
from pathwsi.runtime.gpu_claim import GpuSettings
from pathwsi.samples import COLUMNS, REQUIRED_COLUMNS, Sample, load_samples
from pathwsi.slides.grid import TileSettings
from pathwsi.slides.tissue_mask import TissueSettings
from pathwsi.stain.macenko import StainSettings

ROOT = Path(__file__).resolve().parent.parent
HEADER = "cohort\tslide_id\tpatient_id\tpath\tmpp\tsite\n"


def write_sheet(folder: Path, rows: list[str], header: str = HEADER) -> Path:
    path = folder / "samples.tsv"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


@pytest.fixture()
def slide_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.svs"
    path.write_bytes(b"")
    return path


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


TILE_FOLDERS = {  # labelled tile folders that exist, and the CPU: no warnings about either
    "finetune": {"train_dir": str(ROOT)},
    "tissue_experiment": {"test_dir": str(ROOT)},
    "features": {"device": "cpu"},
}
DATA_PATHS = {"models.backbones.imgnet.weights"}  # the data folders are the schema defaults


def test_shipped_config_is_a_real_run_with_the_documented_defaults():
    text = (ROOT / "config" / "config.yaml").read_text()
    config = validate_config(yaml.safe_load(text))
    shipped, defaults = _flatten(config), _flatten(validate_config({}))
    differing = {key for key in shipped if shipped[key] != defaults.get(key, "<absent>")}
    steps = {key for key in differing if key.startswith("finetune.step")}  # their defaults live in FinetuneSettings
    assert differing - steps == DATA_PATHS
    assert FinetuneSettings.from_config(config) == FinetuneSettings(seed=config["seed"])
    assert not [value for value in shipped.values() if "demo" in str(value)] and "# DEMO" not in text


def test_the_demo_sheet_passes_the_sheet_checks(tmp_path):
    (tmp_path / "samples.tsv").write_text(sheet_text())
    samples = load_samples(tmp_path / "samples.tsv", check_files=False)
    assert [s.slide_id for s in samples] == [s.slide_id for s in DEMO_SLIDES]


def test_the_demo_overlay_points_into_the_demo_folder_and_keeps_the_rest():
    demo = demo_config("demo/samples.tsv")
    config = validate_config(demo)
    shipped = _flatten(validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())))
    changed = {key: value for key, value in _flatten(config).items() if shipped.get(key, "<absent>") != value}
    paths = {key: value for key, value in changed.items() if isinstance(value, str) and "/" in value}
    assert paths and all(value.startswith("demo/") for value in paths.values())
    assert config["models"]["backbones"]["imgnet"]["weights"] == "untrained"
    assert set(changed) - set(paths) <= {
        "features.dtype", "features.threads", "finetune.batch_size", "finetune.step1.epochs", "finetune.step2.lr",
        "finetune.step2.optimizer", "finetune.step2.unfreeze_from", "models.backbones.ftx.input_px",
        "models.backbones.imgnet.input_px", "models.backbones.imgnet.weights", "tissue_experiment.repeats",
        "targets.cohorts.demo-luad.planted", "predict.heatmaps.mutations", "predict.heatmaps.top_genes",
    }  # fmt: skip


# Each config section and the settings class its stage builds with `from_config`: the keys that only the schema
# has (read elsewhere, named here with where) and the fields only the class has. Anything else must match.
SECTIONS = [
    ("tiling", TileSettings, set(), set()),
    ("tissue", TissueSettings, set(), set()),
    ("stain", StainSettings, set(), set()),
    ("features", ExtractSettings, {"threads"}, set()),  # the job's CPU threads (rule threads)
    ("gpus", GpuSettings, set(), set()),
    ("predict", EvaluationSettings, {"heatmaps"}, {"seed"}),  # the top-level seed; heatmaps: HeatmapSettings
    ("targets", TargetSettings, {"cohorts"}, set()),  # each cohort's tables: CohortTargets
    ("finetune", FinetuneSettings, {"train_dir", "val_dir"}, {"seed"}),  # folders: rule inputs
    ("tissue_experiment", ExperimentSettings, {"test_dir", "models"}, {"seed"}),  # folder and compared backbones
    ("aggregate", DaskScheduler, {"scheduler", "scheduler_address", "statistics"}, {"name", "address", "workers", "connect_timeout_s"}),
]  # fmt: skip


@pytest.mark.parametrize("section, cls, schema_only, class_only", SECTIONS, ids=[s[0] for s in SECTIONS])
def test_schema_and_settings_class_have_the_same_keys_and_defaults(section, cls, schema_only, class_only):
    schema = load_schema("config")["properties"][section]["properties"]
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(schema) - schema_only == fields - class_only
    assert set(schema) >= schema_only and fields >= class_only  # the exceptions name real keys
    assert cls.from_config(validate_config({})) == cls()


def test_every_section_of_the_schema_is_covered():
    covered = {s[0] for s in SECTIONS} | {"qc", "models"}  # qc: TilingJobSettings; models: ModelSpec per backbone
    sections = {k for k, v in load_schema("config")["properties"].items() if v.get("type") == "object"}
    assert sections == covered


def test_a_backbone_entry_has_the_model_spec_fields():
    entry = load_schema("config")["properties"]["models"]["properties"]["backbones"]["additionalProperties"]
    assert set(entry["properties"]) == {f.name for f in dataclasses.fields(ModelSpec)} - {"name"}  # name: the key


def test_aggregate_statistics_defaults_are_valid():
    assert check_statistics(validate_config({})["aggregate"]["statistics"]) == ["mean"]


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        validate_config({"tiling": {"tile_px": "big", "tile_size": 3}, "foo": 1, "tissue": {"mask_mpp": -1}})
    problems = caught.value.problems
    assert len(problems) == 4
    text = str(caught.value)
    for fragment in ["'foo': unknown", "'tiling.tile_size': unknown", "'tiling.tile_px'", "'tissue.mask_mpp'"]:
        assert fragment in text


def test_unreadable_yaml_is_reported(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("tiling: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read it as YAML"):
        load_config(bad)


def test_valid_sheet_loads_with_optional_columns(tmp_path, slide_file):
    sheet = write_sheet(tmp_path, [f"c1\tS1\tP1\t{slide_file}\t0.25\tD1", f"c2\tS2\tP2\t{slide_file}\t\t"])
    samples = load_samples(sheet)
    assert [(s.slide_id, s.mpp, s.site) for s in samples] == [("S1", 0.25, "D1"), ("S2", None, None)]


def test_minimal_sheet_without_optional_columns(tmp_path, slide_file):
    sheet = write_sheet(tmp_path, [f"c1\tS1\tP1\t{slide_file}"], header="cohort\tslide_id\tpatient_id\tpath\n")
    assert load_samples(sheet)[0].mpp is None


@pytest.mark.parametrize("slide_id", ["a/b", "../up", ".hidden", "-flag", "with space", "ümlaut", ""])
def test_unsafe_slide_ids_are_rejected(tmp_path, slide_file, slide_id):
    sheet = write_sheet(tmp_path, [f"c1\t{slide_id}\tP1\t{slide_file}\t\t"])
    with pytest.raises(ConfigError, match="row 2 .*column 'slide_id'.*letters, digits"):
        load_samples(sheet)


def test_all_sheet_problems_are_reported_together(tmp_path, slide_file):
    sheet = write_sheet(
        tmp_path,
        [
            f"c1\tS1\tP1\t{slide_file}\tabc\t",  # unreadable mpp
            f"c1\tS2\tP1\t{tmp_path}/missing.svs\t\t",  # missing file
            f"c1\tS1\tP2\t{slide_file}\t\t",  # duplicate id
            f"c1\tS3\t\t{slide_file}\t-0.5\t",  # empty patient, negative mpp
            "c1\tS4\tP4",  # short row
        ],
    )
    with pytest.raises(ConfigError) as caught:
        load_samples(sheet)
    text = str(caught.value)
    assert len(caught.value.problems) == 6
    assert "row 2 (slide_id 'S1'): column 'mpp'" in text and "level-0 µm/px" in text
    assert "row 3 (slide_id 'S2'): slide file" in text and "not found" in text
    assert "row 4: slide_id 'S1' already used on row 2" in text
    assert "row 5 (slide_id 'S3'): column 'patient_id'" in text and "row 5 (slide_id 'S3'): column 'mpp'" in text
    assert "row 6: has 3 cells but the header has 6" in text


def test_header_problems_name_the_columns(tmp_path, slide_file):
    sheet = write_sheet(tmp_path, [f"c1\tS1\t{slide_file}\tx"], header="cohort\tslide_id\tpath\tnotes\n")
    with pytest.raises(ConfigError) as caught:
        load_samples(sheet)
    assert "missing column 'patient_id'" in str(caught.value) and "unknown column 'notes'" in str(caught.value)


def test_missing_sheet_says_how_to_get_one(tmp_path):
    with pytest.raises(ConfigError, match="pathwsi demo"):
        load_samples(tmp_path / "none.tsv")


def test_shipped_sample_sheet_is_a_template_that_asks_for_rows():
    with pytest.raises(ConfigError, match="header but no rows; add one row per slide"):
        load_samples(ROOT / "config" / "samples.tsv")


def test_sheet_schema_is_the_shipped_file():
    assert set(load_schema("samples")["required"]) == {"cohort", "slide_id", "patient_id", "path"}


def test_cross_references_name_missing_tables_and_models(tmp_path, slide_file):
    config = validate_config(
        {
            "targets": {
                "cohorts": {
                    "c1": {"expression": str(tmp_path / "gone.tsv")},
                    "c2": {},
                    "elsewhere": {"mutations": "x.tsv"},
                }
            },
            "predict": {"compare": ["ftx", "uni"]},
        }
    )
    samples = [Sample(cohort=c, slide_id=f"s{c}", patient_id="p", path=str(slide_file)) for c in ("c1", "c2")]
    with pytest.raises(ConfigError) as caught:
        check_cross_references(config, samples)
    text = str(caught.value)
    for fragment in [
        "'targets.cohorts.c1.expression': file",
        "'targets.cohorts.c2': give an `expression`",
        "'predict.compare': ['uni'] not among models.backbones",
    ]:
        assert fragment in text
    assert "elsewhere" not in text
    config["targets"]["cohorts"] = {"elsewhere": {"mutations": "x.tsv"}}
    config["predict"]["compare"] = ["ftx", "imgnet"]
    assert "no such cohort" in check_cross_references(config, samples)[0]


def test_the_fine_tuned_model_must_name_its_base_architecture(slide_file):
    samples = [Sample(cohort="c", slide_id="s", patient_id="p", path=str(slide_file))]
    config = validate_config(
        {
            **TILE_FOLDERS,
            "targets": {"cohorts": {}},
            "models": {
                "backbones": {
                    "imgnet": {"arch": "keras_xception", "weights": "untrained"},
                    "ftx": {"arch": "legacy_xception", "weights": "results/models/ftx.safetensors"},
                }
            },
        }
    )
    with pytest.raises(
        ConfigError,
        match="'models.backbones.ftx.arch': 'legacy_xception'.*finetune.base 'imgnet' of architecture 'keras_xception'",
    ):
        check_cross_references(config, samples)
    config["models"]["backbones"]["ftx"]["arch"] = "keras_xception"
    assert check_cross_references(config, samples) == [
        "model 'imgnet' has UNTRAINED, seeded weights: its features are for demos and tests only",
        "model 'ftx' is fine-tuned from the UNTRAINED 'imgnet': its features are for demos and tests only",
    ]  # said once at the start of a run, not by every job


# -- what used to pass the checks and then crash a job without naming the key ----------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"tiling": {"tile_mpp": 1e-6}}, "key 'tiling.tile_mpp': 1e-06 is less than the minimum of 0.05"),
        ({"seed": -1}, "key 'seed': -1 is less than the minimum of 0"),
        (
            {"aggregate": {"statistics": ["mean", "mean"]}},
            "key 'aggregate.statistics': ['mean', 'mean'] has non-unique elements",
        ),
        (
            {"tissue": {"min_saturation": 0.2, "max_saturation": 0.1}},
            "key 'tissue.min_saturation': 0.2 is above tissue.max_saturation 0.1",
        ),
        ({"tissue": {"pen_hue": [0.64, 0.3]}}, "key 'tissue.pen_hue': [0.64, 0.3] is not a range [low, high]"),
    ],
)
def test_values_that_would_crash_a_job_are_refused_naming_the_key(changes, fragment):
    with pytest.raises(ConfigError) as caught:
        validate_config(changes)
    assert fragment in str(caught.value)


def test_a_weights_file_that_does_not_exist_is_named(slide_file, tmp_path):
    samples = [Sample(cohort="c", slide_id="s", patient_id="p", path=str(slide_file))]
    config = validate_config(
        {
            **TILE_FOLDERS,
            "targets": {"cohorts": {}},
            "models": {
                "backbones": {
                    "imgnet": {"weights": str(tmp_path / "imagenet.safetensors")},
                    "ftx": {"weights": "results/models/ftx.safetensors"},
                }
            },
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"'models.backbones.imgnet.weights': file '.*imagenet.safetensors' not found; .*pathwsi weights",
    ):
        check_cross_references(config, samples)
    (tmp_path / "imagenet.safetensors").write_bytes(b"")
    assert check_cross_references(config, samples) == []  # ftx's file comes from rule finetune


def test_cuda_on_a_machine_without_a_gpu_is_a_warning_at_start(slide_file, monkeypatch):
    import pathwsi.config

    monkeypatch.setattr(pathwsi.config.glob, "glob", lambda pattern: [])
    samples = [Sample(cohort="c", slide_id="s", patient_id="p", path=str(slide_file))]

    def device_warnings(device: str) -> list[str]:
        config = validate_config({**TILE_FOLDERS, "targets": {"cohorts": {}}, "features": {"device": device}})
        return [w for w in check_cross_references(config, samples) if "features.device" in w]

    (cuda,) = device_warnings("cuda")
    assert "key 'features.device': 'cuda', but this machine has no NVIDIA GPU" in cuda and "will fail" in cuda
    (auto,) = device_warnings("auto")  # jobs no longer say it each: the run's start says it once
    assert "'auto', and this machine has no NVIDIA GPU: features jobs that run here use the CPU" in auto
    assert device_warnings("cpu") == []


def test_a_sheet_saved_with_a_byte_order_mark_loads(tmp_path, slide_file):
    sheet = tmp_path / "samples.tsv"
    sheet.write_bytes(("\ufeff" + HEADER + f"c1\ts1\tp1\t{slide_file}\t\t\n").encode("utf-8"))
    assert [s.slide_id for s in load_samples(sheet)] == ["s1"]


def test_a_directory_given_as_a_slide_says_so(tmp_path):
    (tmp_path / "slides").mkdir()
    with pytest.raises(
        ConfigError, match=r"row 2 \(slide_id 's1'\): slide path '.*slides' is a directory, not a slide file"
    ):
        load_samples(write_sheet(tmp_path, [f"c1\ts1\tp1\t{tmp_path / 'slides'}\t\t"]))


def test_a_sheet_can_choose_a_slides_backend_and_a_folder_of_dicom_files_is_a_slide(tmp_path, slide_file):
    series = tmp_path / "series"
    series.mkdir()
    (series / "level-0.dcm").write_bytes(b"")
    sheet = tmp_path / "samples.tsv"
    rows = [f"c1\ts1\tp1\t{slide_file}\t\t\t", f"c1\ts2\tp2\t{series}\t\t\ttiatoolbox"]
    sheet.write_text(HEADER.rstrip("\n") + "\tbackend\n" + "\n".join(rows) + "\n")
    assert [s.backend for s in load_samples(sheet)] == [None, "tiatoolbox"]
    sheet.write_text(sheet.read_text().replace("tiatoolbox", "bioformats"))
    with pytest.raises(ConfigError, match=r"row 3 \(slide_id 's2'\): column 'backend' 'bioformats' is not one of"):
        load_samples(sheet)


def test_pathwsi_tile_checks_the_slide_id_like_the_sheet(slide_file, capsys):
    from pathwsi.cli import main

    assert (
        main(["tile", str(slide_file), "--slide-id", "bad/id", "--config", str(ROOT / "config" / "config.yaml")]) == 2
    )
    err = capsys.readouterr().err
    assert "slide 'bad/id': --slide-id 'bad/id' does not match" in err and "column" not in err  # its own flags
    config = str(ROOT / "config" / "config.yaml")
    assert main(["tile", str(slide_file), "--mpp", "-1", "--config", config]) == 2
    assert ": --mpp " in capsys.readouterr().err


def test_pathwsi_check_runs_the_cross_checks(tmp_path, slide_file, capsys):
    from pathwsi.cli import main

    sheet = write_sheet(tmp_path, [f"c1\ts1\tp1\t{slide_file}\t\t"])
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "samples": str(sheet),
                "targets": {"cohorts": {}},
                "models": {"backbones": {"imgnet": {"weights": "gone.safetensors"}, "ftx": {"weights": "untrained"}}},
            }
        )
    )
    assert main(["check", "--config", str(config)]) == 2
    assert "'models.backbones.imgnet.weights': file 'gone.safetensors' not found" in capsys.readouterr().err


def test_the_sheet_columns_are_defined_once_and_the_schema_agrees():
    schema = load_schema("samples")
    assert [f.name for f in dataclasses.fields(Sample)] == list(COLUMNS)
    assert set(schema["properties"]) == set(COLUMNS) and set(schema["required"]) == set(REQUIRED_COLUMNS)


def test_pathwsi_overlays_config_files_as_snakemake_does(tmp_path):
    overlay_file = tmp_path / "demo.yaml"
    overlay_file.write_text(demo_config_text(Path("demo")))
    ours = load_config(ROOT / "config" / "config.yaml", overlay_file)
    assert ours == validate_config(demo_config("demo/samples.tsv"))  # demo_config merges with snakemake.utils
    for key, value in _flatten(yaml.safe_load(overlay_file.read_text())).items():  # every overlay value applies
        assert _flatten(ours)[key] == value, key


def test_check_takes_the_demo_overlay_after_the_config(tmp_path, capsys, monkeypatch):
    from pathwsi.cli import main

    overlay_file = tmp_path / "demo.yaml"
    overlay_file.write_text(demo_config_text(Path("demo")))
    assert main(["check", "--config", str(ROOT / "config" / "config.yaml"), str(overlay_file)]) in (0, 2)
    assert "'models.backbones.ftx': 'weights' is a required property" not in capsys.readouterr().err


def test_missing_labelled_tile_folders_are_named_at_start(slide_file):
    samples = [Sample(cohort="c", slide_id="s", patient_id="p", path=str(slide_file))]
    warnings = check_cross_references(validate_config({"targets": {"cohorts": {}}}), samples)
    assert any(
        "key 'finetune.train_dir': folder 'data/NCT-CRC-HE-100K' not found; rule finetune" in w for w in warnings
    )
    assert any("key 'tissue_experiment.test_dir': folder 'data/CRC-VAL-HE-7K' not found" in w for w in warnings)


def test_the_heatmaps_section_and_its_settings_class_agree():
    schema = load_schema("config")["properties"]["predict"]["properties"]["heatmaps"]["properties"]
    assert set(schema) == {f.name for f in dataclasses.fields(HeatmapSettings)}
    settings = HeatmapSettings.from_config(validate_config({}))
    assert settings == HeatmapSettings(model="ftx")  # the model defaults to the first compared one
    assert HeatmapSettings.from_config(validate_config({"predict": {"compare": ["b", "a"]}})).model == "b"
