"""The whole pipeline on a tiny sample: every stage real and connected."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from csfd.cli import main as cli_main
from csfd.predict import run_predict


def test_run_folder_is_self_contained(tiny_run):
    for fold in range(tiny_run.folds.n_folds):
        fold_dir = tiny_run.run_dir(fold)
        for name in ("config.yaml", "vertebra.pt", "fracture.pt", "oof_slices.csv", "pseudo_labels.csv", "metrics.json", "train.log"):
            assert (fold_dir / name).is_file(), f"{fold_dir / name} is missing"
        metrics = json.loads((fold_dir / "metrics.json").read_text())
        assert metrics["config_hash"] == tiny_run.hash()


def test_oof_covers_each_fold_once(tiny_run):
    folds = pd.read_csv(tiny_run.paths.folds_csv)
    seen = []
    for fold in range(tiny_run.folds.n_folds):
        oof = pd.read_csv(tiny_run.run_dir(fold) / "oof_slices.csv")
        studies = set(oof["StudyInstanceUID"])
        assert studies == set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
        values = oof.filter(regex="^(vis|frac)_C").to_numpy()
        assert ((values >= 0) & (values <= 1)).all()
        seen.extend(studies)
    assert len(seen) == len(set(seen))


def test_submission_rows_and_range(tiny_run, tmp_path):
    output = tmp_path / "submission.csv"
    submission = run_predict(tiny_run, output)
    test = pd.read_csv(f"{tiny_run.paths.data_dir}/test.csv")
    written = pd.read_csv(output)
    assert written["row_id"].tolist() == test["row_id"].tolist()
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    assert written["fractured"].between(tiny_run.stack.clip_min, tiny_run.stack.clip_max).all()
    assert written["fractured"].notna().all()


def test_stack_cv_table_written(tiny_run):
    cv = pd.read_csv(tiny_run.run_dir() / "stack" / "cv.csv")
    assert {"prior", "aggregate", "stacker"} <= set(cv["method"])
    summary = json.loads((tiny_run.run_dir() / "stack" / "summary.json").read_text())
    assert summary["better_method"] in ("stacker", "aggregate")


def test_score_command_on_oof(tiny_run, capsys):
    oof = tiny_run.run_dir() / "stack" / "oof_predictions.csv"
    labels = f"{tiny_run.paths.data_dir}/train.csv"
    assert cli_main(["score", "--labels", labels, "--predictions", str(oof)]) == 0
    out = capsys.readouterr().out
    assert "per_study" in out and "flat" in out


def test_score_command_rejects_missing_studies(tiny_run, tmp_path, capsys):
    oof = pd.read_csv(tiny_run.run_dir() / "stack" / "oof_predictions.csv")
    partial = tmp_path / "partial.csv"
    oof.iloc[1:].to_csv(partial, index=False)
    labels = f"{tiny_run.paths.data_dir}/train.csv"
    assert cli_main(["score", "--labels", labels, "--predictions", str(partial)]) == 2
    assert "missing" in capsys.readouterr().err


def test_score_command_rejects_out_of_range(tiny_run, tmp_path, capsys):
    oof = pd.read_csv(tiny_run.run_dir() / "stack" / "oof_predictions.csv")
    oof.loc[0, "C3"] = 1.2
    bad = tmp_path / "bad.csv"
    oof.to_csv(bad, index=False)
    labels = f"{tiny_run.paths.data_dir}/train.csv"
    assert cli_main(["score", "--labels", labels, "--predictions", str(bad)]) == 2
    assert "outside [0, 1]" in capsys.readouterr().err


def test_missing_and_unreadable_studies_get_prior(tiny_run, tmp_path, caplog):
    import shutil

    from csfd.constants import PREVALENCE

    data = tmp_path / "data"
    shutil.copytree(tiny_run.paths.data_dir + "/test_images", data / "test_images")
    test = pd.read_csv(f"{tiny_run.paths.data_dir}/test.csv")
    test.to_csv(data / "test.csv", index=False)
    broken_uid = sorted(p.name for p in (data / "test_images").iterdir())[0]
    for path in (data / "test_images" / broken_uid).iterdir():
        path.write_bytes(b"not a dicom file")
    config = dataclasses.replace(tiny_run, paths=dataclasses.replace(tiny_run.paths, data_dir=str(data)))
    with caplog.at_level("WARNING"):
        submission = run_predict(config, tmp_path / "submission.csv")
    assert broken_uid in caplog.text
    rows = submission.set_index("row_id")["fractured"]
    assert rows[f"{broken_uid}_patient_overall"] == pytest.approx(PREVALENCE["patient_overall"])
    missing = set(test["StudyInstanceUID"]) - {p.name for p in (data / "test_images").iterdir()}
    assert missing, "the sample's test.csv must name a study without images"
    for uid in missing:
        assert rows[f"{uid}_C1"] == pytest.approx(PREVALENCE["C1"])
        assert uid in caplog.text
