"""Folds group by StudyInstanceUID, are seeded, stratified and made once."""

from __future__ import annotations

import pandas as pd
import pytest

from csfd.folds import make_folds, write_folds


def test_real_labels_folds_are_balanced(competition_dir):
    labels = pd.read_csv(competition_dir / "train.csv")
    folds = make_folds(labels, n_folds=5, seed=42)
    assert len(folds) == len(labels)
    assert folds["StudyInstanceUID"].is_unique
    assert set(folds["fold"]) == {0, 1, 2, 3, 4}
    rates = folds.merge(labels).groupby("fold")["patient_overall"].mean()
    assert rates.max() - rates.min() < 0.03
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 2


def test_folds_are_deterministic(competition_dir):
    labels = pd.read_csv(competition_dir / "train.csv")
    first = make_folds(labels, 5, 42)
    assert first.equals(make_folds(labels, 5, 42))
    assert not first.equals(make_folds(labels, 5, 43))


def test_duplicate_study_rejected():
    labels = pd.DataFrame({"StudyInstanceUID": ["a", "a"], "patient_overall": [0, 0], **{f"C{i}": [0, 0] for i in range(1, 8)}})
    with pytest.raises(ValueError, match="more than once"):
        make_folds(labels, 2, 0)


def test_existing_folds_are_kept(tmp_path, competition_dir):
    folds_csv = tmp_path / "folds.csv"
    first = write_folds(competition_dir / "train.csv", folds_csv, 5, 1)
    second = write_folds(competition_dir / "train.csv", folds_csv, 5, 2)
    assert first.equals(second)
    remade = write_folds(competition_dir / "train.csv", folds_csv, 5, 2, overwrite=True)
    assert not first.equals(remade)


def test_rare_vertebra_spreads_over_folds():
    # 40 studies, C4 fractured in only 3: each fold's training part must keep at least 2.
    rows = []
    for i in range(40):
        row = {"StudyInstanceUID": f"1.2.{i}", "patient_overall": int(i % 2 == 0)}
        row.update({f"C{k}": 0 for k in range(1, 8)})
        if i % 2 == 0:
            row["C7"] = 1
        if i in (0, 2, 4):
            row["C4"] = 1
        rows.append(row)
    labels = pd.DataFrame(rows)
    folds = make_folds(labels, n_folds=3, seed=0).merge(labels)
    for fold in range(3):
        assert folds.loc[folds["fold"] != fold, "C4"].sum() >= 2
