"""Leaderboard over run folders: the tiny run, a better copy, a partial copy and foreign folders."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from csfd.cli import main
from csfd.constants import TARGETS, VERTEBRAE
from csfd.leaderboard import collect_runs, differing_config_keys, flatten_config, leaderboard_table, run_leaderboard


def _edit_config(path: Path, edits: dict) -> None:
    config = yaml.safe_load(path.read_text())
    for dotted, value in edits.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _sharpen_oof(oof_path: Path, labels: pd.DataFrame) -> None:
    """Replace the fracture probabilities with near-correct ones, so the run scores better."""
    oof = pd.read_csv(oof_path, dtype={"StudyInstanceUID": str})
    truth = labels.set_index("StudyInstanceUID").loc[oof["StudyInstanceUID"], list(VERTEBRAE)].to_numpy()
    oof[[f"frac_{v}" for v in VERTEBRAE]] = np.where(truth > 0, 0.9, 0.02)
    oof.to_csv(oof_path, index=False, float_format="%.5f")


@pytest.fixture(scope="module")
def board_runs(tiny_run, tmp_path_factory) -> Path:
    """A runs folder: the tiny run, a better copy with two changed settings, a partial copy and foreign folders."""
    runs = tmp_path_factory.mktemp("board") / "runs"
    source = tiny_run.run_dir()
    shutil.copytree(source, runs / "tiny", ignore=shutil.ignore_patterns("report"))
    labels = pd.read_csv(Path(tiny_run.paths.data_dir) / "train.csv", dtype={"StudyInstanceUID": str})

    better = runs / "tiny_better"
    shutil.copytree(source, better, ignore=shutil.ignore_patterns("stack", "report"))
    for fold_dir in better.glob("fold*"):
        _edit_config(
            fold_dir / "config.yaml",
            {"name": "tiny_better", "fracture.epochs": 3, "fracture.lr": 0.01, "paths.submission_csv": "elsewhere.csv"},
        )
        _sharpen_oof(fold_dir / "oof_slices.csv", labels)

    partial = runs / "tiny_partial"
    shutil.copytree(source / "fold0", partial / "fold0")

    # A study folder of another layout: a metrics.json on top and run folders nested deeper.
    ssl = runs / "ssl-study-tiny"
    (ssl / "cells" / "a").mkdir(parents=True)
    (ssl / "metrics.json").write_text(json.dumps({"rows": 3}))
    broken = runs / "broken"
    (broken / "fold0").mkdir(parents=True)
    (broken / "fold0" / "metrics.json").write_text("{not json")
    shutil.copy(source / "fold0" / "config.yaml", broken / "fold0" / "config.yaml")
    (runs / "notes.txt").write_text("not a run folder")
    return runs


@pytest.fixture(scope="module")
def board(board_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("board_out")
    table = run_leaderboard(board_runs, out)
    return table, out


def test_flatten_config_dotted_keys():
    flat = flatten_config({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": None})
    assert flat == {"a.b": 1, "a.c.d": "x", "e": "[1, 2]", "f": None}


def test_differing_keys_skip_paths_and_name():
    configs = [
        {"name": "a", "paths.runs_dir": "x", "fracture.lr": 0.1, "seed": 1, "only.here": 5},
        {"name": "b", "paths.runs_dir": "y", "fracture.lr": 0.2, "seed": 1},
    ]
    assert differing_config_keys(configs) == ["fracture.lr", "only.here"]
    assert differing_config_keys(configs[:1]) == []


def test_board_rows_one_per_run_stage(board):
    table, _ = board
    rows = list(zip(table["experiment"], table["stage"]))
    assert sorted(rows) == sorted(
        [("tiny", "stage1"), ("tiny", "stage2"), ("tiny_better", "stage1"), ("tiny_partial", "stage1")]
    )


def test_board_sorted_complete_first(board):
    table, _ = board
    assert list(table["complete"]) == [True, True, True, False]
    assert table.iloc[-1]["experiment"] == "tiny_partial"
    complete = table[table["complete"]]["cv_per_study"].to_numpy()
    assert np.all(np.diff(complete) >= 0)
    assert table.iloc[0]["experiment"] == "tiny_better"


def test_board_partial_run_marked(board):
    table, _ = board
    partial = table[table["experiment"] == "tiny_partial"].iloc[0]
    assert partial["folds"] == "0"
    assert partial["n_folds"] == 2
    assert not partial["complete"]
    assert np.isnan(partial["fold1_per_study"])
    assert np.isfinite(partial["fold0_per_study"])


def test_board_scores_match_run_files(board, tiny_run):
    table, _ = board
    run_dir = tiny_run.run_dir()
    stage1 = table[(table["experiment"] == "tiny") & (table["stage"] == "stage1")].iloc[0]
    fold_scores = [json.loads((run_dir / f"fold{k}" / "metrics.json").read_text())["cv"]["aggregate"] for k in (0, 1)]
    # oof_slices.csv keeps 5 decimals, metrics.json was computed before rounding.
    assert stage1["cv_per_study"] == pytest.approx(np.mean([s["per_study"] for s in fold_scores]), abs=1e-3)
    assert stage1["cv_flat"] == pytest.approx(np.mean([s["flat"] for s in fold_scores]), abs=1e-3)
    assert stage1["fold0_per_study"] == pytest.approx(fold_scores[0]["per_study"], abs=1e-3)

    summary = json.loads((run_dir / "stack" / "summary.json").read_text())
    stage2 = table[(table["experiment"] == "tiny") & (table["stage"] == "stage2")].iloc[0]
    assert stage2["method"] == "stacker"
    assert stage2["cv_per_study"] == pytest.approx(summary["per_study_mean"]["stacker"], abs=1e-9)
    assert stage2["cv_flat"] == pytest.approx(summary["flat_mean"]["stacker"], abs=1e-9)
    cv = pd.read_csv(run_dir / "stack" / "cv.csv")
    mean_row = cv[(cv["method"] == "stacker") & (cv["fold"] == "mean")].iloc[0]
    for target in TARGETS:
        assert stage2[target] == pytest.approx(mean_row[target], abs=1e-9)


def test_board_per_target_columns_finite(board):
    table, _ = board
    for target in TARGETS:
        assert table[target].notna().all(), target
        assert (table[target] > 0).all(), target


def test_board_config_columns_only_differences(board):
    table, _ = board
    config_columns = [c for c in table.columns if "." in c]
    assert config_columns == ["fracture.epochs", "fracture.lr"]
    better = table[table["experiment"] == "tiny_better"].iloc[0]
    tiny = table[table["experiment"] == "tiny"].iloc[0]
    assert better["fracture.epochs"] == "3"
    assert tiny["fracture.epochs"] == "1"
    assert better["fracture.lr"] == "0.01"


def test_board_skips_foreign_folders(board_runs, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="csfd.leaderboard"):
        entries = collect_runs(board_runs)
    assert {e.experiment for e in entries} == {"tiny", "tiny_better", "tiny_partial"}
    skipped = "\n".join(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
    assert "ssl-study-tiny" in skipped
    assert "broken" in skipped


def test_board_files_written(board):
    table, out = board
    csv_text = (out / "leaderboard.csv").read_text()
    lines = csv_text.strip().splitlines()
    assert len(lines) == len(table) + 1
    header = lines[0].split(",")
    assert header[:9] == [
        "experiment", "stage", "method", "complete", "folds", "n_folds", "cv_per_study", "cv_flat", "cv_per_study_std"
    ]
    first = dict(zip(header, lines[1].split(",")))
    assert re.fullmatch(r"\d+\.\d{5}", first["cv_per_study"])
    assert first["experiment"] == "tiny_better"

    markdown = (out / "leaderboard.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_lines) == len(table) + 1  # header and one line per row
    assert "| tiny_partial | stage1 | aggregate | no | 0 | 2 |" in markdown

    for name in ("leaderboard_targets.png", "leaderboard_folds.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.width > 100
            assert image.height > 100


def test_board_rewrite_is_identical(board_runs, board, tmp_path):
    _, out = board
    run_leaderboard(board_runs, tmp_path)
    assert (tmp_path / "leaderboard.csv").read_bytes() == (out / "leaderboard.csv").read_bytes()
    assert (tmp_path / "leaderboard.md").read_bytes() == (out / "leaderboard.md").read_bytes()


def test_board_cli_prints_table(board_runs, tmp_path, capsys):
    assert main(["leaderboard", "--runs", str(board_runs), "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("| experiment | stage |")
    assert printed.count("| tiny") == 4
    assert (tmp_path / "leaderboard.csv").is_file()


def test_board_missing_oof_uses_metrics(tiny_run, tmp_path, caplog):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.run_dir(), runs / "tiny", ignore=shutil.ignore_patterns("stack", "report"))
    (runs / "tiny" / "fold1" / "oof_slices.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="csfd.leaderboard"):
        table = run_leaderboard(runs)
    row = table.iloc[0]
    recorded = json.loads((runs / "tiny" / "fold1" / "metrics.json").read_text())["cv"]["aggregate"]
    assert row["fold1_per_study"] == pytest.approx(recorded["per_study"], abs=1e-12)
    assert np.isfinite(row["fold0_per_study"])
    assert np.isnan(row["C1"])  # a per-target mean needs every fold
    assert row["complete"]
    assert any("oof_slices.csv not found" in r.getMessage() for r in caplog.records)


def test_board_empty_runs_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    table = run_leaderboard(tmp_path / "runs")
    assert table.empty
    assert (tmp_path / "leaderboard.csv").read_text().startswith("experiment,stage,method,complete")
    assert "No run found." in (tmp_path / "leaderboard.md").read_text()
    assert leaderboard_table([]).empty


def test_board_missing_runs_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs folder not found"):
        run_leaderboard(tmp_path / "absent")
