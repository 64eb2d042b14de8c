"""The `pathwsi` command line: check and normalize (tile and convert-keras are tested with their modules)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pathwsi.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_check_lists_problems_and_exits_2(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"samples: {tmp_path / 'none.tsv'}\ntiling: {{tile_px: 0}}\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tiling.tile_px" in err


def test_check_accepts_a_valid_cohort(tmp_path, slides, capsys):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(f"cohort\tslide_id\tpatient_id\tpath\nc1\ts1\tp1\t{slides.svs_025}\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"samples: {sheet}\n")
    assert main(["check", "--config", str(config)]) == 0
    assert "1 slides in 1 cohort(s): c1" in capsys.readouterr().out


def test_normalize_mirrors_class_folders(tmp_path, slides):
    source = tmp_path / "in"
    for klass in ("STR", "TUM"):
        (source / klass).mkdir(parents=True)
        for i in range(2):
            tile = slides.tissue.render(300 + 60 * i, 250, 224, 224, 0.5)
            Image.fromarray(tile).save(source / klass / f"{klass}-{i}.png")
    (source / "BACK").mkdir()
    Image.new("RGB", (224, 224), (242, 242, 242)).save(source / "BACK" / "glass.png")
    out = tmp_path / "out"
    assert main(["normalize", str(source), "--out", str(out), "--config", str(ROOT / "config" / "config.yaml")]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["BACK/glass.png", "STR/STR-0.png", "STR/STR-1.png", "TUM/TUM-0.png", "TUM/TUM-1.png"]
    before = np.asarray(Image.open(source / "STR" / "STR-0.png"), dtype=float)
    after = np.asarray(Image.open(out / "STR" / "STR-0.png"), dtype=float)
    assert after.shape == before.shape and np.abs(after - before).mean() > 1  # the stains changed
    glass = np.asarray(Image.open(out / "BACK" / "glass.png"), dtype=int)
    assert np.abs(glass - 242).max() <= 2  # background stays background
    records = [json.loads(line) for line in (out / "stain_fits.jsonl").read_text().splitlines()]
    assert len(records) == 5 and any(r["status"] == "fallback" for r in records)
    shutil.rmtree(out / "TUM")
    assert main(["normalize", str(source), "--out", str(out), "--config", str(ROOT / "config" / "config.yaml")]) == 0
    assert (out / "TUM" / "TUM-1.png").is_file()


def test_finetune_and_experiment_report_folder_problems_without_a_traceback(tmp_path, capsys):
    config = str(ROOT / "config" / "config.yaml")
    assert (
        main(["finetune", "--config", config, "--train-dir", str(tmp_path / "none"), "--workdir", str(tmp_path / "w")])
        == 2
    )
    assert "none" in capsys.readouterr().err
    assert (
        main(
            [
                "tissue-experiment",
                "--config",
                config,
                "--test-dir",
                str(tmp_path / "none"),
                "--models",
                "imgnet",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "none" in capsys.readouterr().err


def test_a_user_mistake_in_any_subcommand_is_a_message_not_a_traceback(tmp_path, capsys):
    bad_target = tmp_path / "config.yaml"
    bad_target.write_text(f"stain: {{target: {tmp_path / 'not_an_image.png'}}}\n")
    (tmp_path / "not_an_image.png").write_text("not an image")
    (tmp_path / "in").mkdir()
    cases = [
        ["normalize", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--config", str(bad_target)],
        ["normalize", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--config", str(ROOT / "config" / "config.yaml")],
        ["tile", str(tmp_path / "missing.svs"), "--config", str(ROOT / "config" / "config.yaml"), "--results", str(tmp_path)],
        ["inspect", str(tmp_path / "in")],
        ["check", "--config", str(tmp_path / "missing.yaml")],
    ]  # fmt: skip
    for argv in cases:
        assert main(argv) in (1, 2), argv
        err = capsys.readouterr().err
        assert "Traceback" not in err, (argv, err)
    assert main(cases[0]) == 2 and "key 'stain.target': cannot read" in capsys.readouterr().err


def test_normalize_names_an_image_it_cannot_read(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_text("not an image")
    config = str(ROOT / "config" / "config.yaml")
    assert main(["normalize", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--config", config]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err and "Traceback" not in err
