"""A decoder that crashes the process fails one study, not the prepare run.

dicomsdl 0.109 crashes with a segmentation fault when it opens an uncompressed slice cut short
inside its pixel data. These tests build such a file and never decode it in the pytest process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_prepare import make_config, statuses, write_study

from csfd.prepare import prepare_split
from csfd.prepare_worker import StudyTask, prepare_study

GOOD = ("1.2.826.0.1.3680043.3001", "1.2.826.0.1.3680043.3002", "1.2.826.0.1.3680043.3003")
DAMAGED = "1.2.826.0.1.3680043.3009"


@pytest.fixture()
def crash_data(tmp_path) -> Path:
    root = tmp_path / "data"
    for uid in GOOD:
        write_study(root / "train_images", uid, 4)
    write_study(root / "train_images", DAMAGED, 4)
    path = root / "train_images" / DAMAGED / "2.dcm"
    path.write_bytes(path.read_bytes()[:-4])  # cut 4 bytes short inside the pixel data
    return root


def damaged_file(data: Path) -> Path:
    return data / "train_images" / DAMAGED / "2.dcm"


def test_worker_crash_fails_only_its_study(tmp_path, crash_data, caplog):
    config = make_config(tmp_path, crash_data, workers=2)
    with caplog.at_level(logging.WARNING, logger="csfd"):
        report = prepare_split(crash_data, config.paths.cache_dir, "train", config)
    assert statuses(report) == {**dict.fromkeys(GOOD, "done"), DAMAGED: "failed"}
    error = report.set_index("StudyInstanceUID").loc[DAMAGED, "error"]
    assert str(damaged_file(crash_data)) in error
    assert "pydicom" in error
    assert f"study {DAMAGED}: a worker process died" in caplog.text
    studies = Path(config.paths.cache_dir) / "train" / "studies"
    assert not list(studies.glob(".*.working"))
    assert sorted(path.stem for path in studies.glob("*.npy")) == sorted(GOOD)


def test_marker_of_crashed_run_retried_alone(tmp_path, crash_data, caplog):
    # A 1-worker run decodes in this process, where the crash would end the run and leave the
    # marker. The next run must retry that study in a process of its own.
    config = make_config(tmp_path, crash_data, workers=1)
    studies = Path(config.paths.cache_dir) / "train" / "studies"
    studies.mkdir(parents=True)
    (studies / f".{DAMAGED}.working").touch()
    with caplog.at_level(logging.WARNING, logger="csfd"):
        report = prepare_split(crash_data, config.paths.cache_dir, "train", config)
    assert statuses(report) == {**dict.fromkeys(GOOD, "done"), DAMAGED: "failed"}
    assert str(damaged_file(crash_data)) in report.set_index("StudyInstanceUID").loc[DAMAGED, "error"]
    assert f"study {DAMAGED} was being decoded when an earlier run stopped" in caplog.text
    assert not (studies / f".{DAMAGED}.working").exists()


def test_repaired_study_prepared_on_rerun(tmp_path, crash_data):
    config = make_config(tmp_path, crash_data, workers=2)
    prepare_split(crash_data, config.paths.cache_dir, "train", config)
    write_study(tmp_path / "fresh", DAMAGED, 4)
    damaged_file(crash_data).write_bytes((tmp_path / "fresh" / DAMAGED / "2.dcm").read_bytes())
    report = prepare_split(crash_data, config.paths.cache_dir, "train", config)
    assert statuses(report) == {**dict.fromkeys(GOOD, "skipped"), DAMAGED: "done"}


def test_single_damaged_study_runs_in_a_worker(tmp_path, crash_data):
    config = make_config(tmp_path, crash_data, workers=2)
    report = prepare_split(crash_data, config.paths.cache_dir, "train", config, study_uids=[DAMAGED])
    assert statuses(report) == {DAMAGED: "failed"}
    assert str(damaged_file(crash_data)) in report["error"].iloc[0]


def test_stale_marker_of_done_study_removed(tmp_path, crash_data):
    config = make_config(tmp_path, crash_data, workers=1)
    prepare_split(crash_data, config.paths.cache_dir, "train", config, study_uids=[GOOD[0]])
    marker = Path(config.paths.cache_dir) / "train" / "studies" / f".{GOOD[0]}.working"
    marker.touch()  # as a run killed after the study's JSON and before the marker's removal leaves it
    report = prepare_split(crash_data, config.paths.cache_dir, "train", config, study_uids=[GOOD[0]])
    assert statuses(report) == {GOOD[0]: "skipped"}
    assert not marker.exists()


def test_prepare_study_creates_studies_folder(tmp_path, crash_data):
    config = make_config(tmp_path, crash_data)
    studies = tmp_path / "new" / "studies"
    task = StudyTask(GOOD[0], str(crash_data / "train_images" / GOOD[0]), "train", str(studies), None, config.prepare)
    assert prepare_study(task)["status"] == "done"
    assert (studies / f"{GOOD[0]}.npy").is_file()
    assert not list(studies.glob(".*.working"))
