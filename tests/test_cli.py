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
