"""Command line entry points that are not covered by the pipeline tests."""

from __future__ import annotations

import pandas as pd

from csfd.cli import main


def test_sample_command_accepts_options(tmp_path):
    out = tmp_path / "sample"
    code = main(["sample", "--out", str(out), "--n-train", "10", "--n-test", "1", "--image-size", "32", "--real-ct", ""])
    assert code == 0
    labels = pd.read_csv(out / "train.csv")
    assert len(labels) == 10
    assert (out / "test.csv").is_file()


def test_unknown_override_exits_with_message(capsys, caplog):
    code = main(["folds", "--config", "configs/sample.yaml", "folds.n_fold=3"])
    assert code == 2
    assert "folds.n_fold" in caplog.text


def test_score_reports_missing_file(tmp_path, capsys):
    code = main(["score", "--labels", str(tmp_path / "none.csv"), "--predictions", str(tmp_path / "p.csv")])
    assert code == 2
    assert "not found" in capsys.readouterr().err


def _sample_data(tmp_path):
    out = tmp_path / "sample"
    code = main(["sample", "--out", str(out), "--n-train", "4", "--n-test", "1", "--image-size", "32", "--real-ct", ""])
    assert code == 0
    return out


def _break_study(study_dir):
    for path in study_dir.glob("*.dcm"):
        path.write_text("not a DICOM file\n")


def _prepare(data, cache, *extra):
    overrides = [f"paths.cache_dir={cache}", "prepare.workers=1", "prepare.image_size=32"]
    # `extra` goes last, so that its options and overrides win.
    return main(["prepare", "--config", "configs/sample.yaml", "--data", str(data), "--splits", "train", *overrides, *extra])


def test_prepare_all_failed_exits_1(tmp_path, caplog):
    data = _sample_data(tmp_path)
    for study_dir in (data / "train_images").iterdir():
        _break_study(study_dir)
    assert _prepare(data, tmp_path / "cache") == 1
    assert "4 of 4 studies failed and none is cached" in caplog.text


def test_prepare_some_failed_exit_status(tmp_path, caplog):
    data = _sample_data(tmp_path)
    _break_study(sorted((data / "train_images").iterdir())[0])
    assert _prepare(data, tmp_path / "cache") == 0
    assert "1 of 4 studies failed" in caplog.text
    assert "--strict" in caplog.text
    caplog.clear()
    assert _prepare(data, tmp_path / "cache", "--strict") == 1
    assert "--strict is set" in caplog.text


def test_prepare_rejects_bad_image_size(tmp_path, caplog):
    data = _sample_data(tmp_path)
    assert _prepare(data, tmp_path / "cache", "prepare.image_size=-5") == 2
    assert "prepare.image_size" in caplog.text
    assert not (tmp_path / "cache").exists()
