"""The Kaggle kernel: its build, an offline run in a fresh environment, and the deadline guard."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, tiny_overrides
from kernel_env import kaggle_like_venv, python_version, repack_installed_wheel, site_packages_of

from csfd.cli import main as cli_main
from csfd.config import KernelConfig, load_config
from csfd.constants import PREVALENCE
from csfd.deadline import (
    PATH_ALL_FOLDS,
    PATH_FEWER_FOLDS,
    PATH_PRIOR_DEADLINE,
    PATH_PRIOR_FAILED,
    PATH_PRIOR_NO_IMAGES,
    DeadlineGuard,
    Throughput,
    count_paths,
    format_duration,
    path_of,
)
from csfd.inference import interpolate_positions, load_fold_models, predict_volume, strided_positions
from csfd.kernel import render_kernel_script, resolve_username
from csfd.kernel.build import USERNAME_PLACEHOLDER
from csfd.kernel.wheels import (
    WheelError,
    compatible_platforms,
    download_wheels,
    pinned_requirements,
    pip_download_command,
    select_wheels,
    wheel_is_compatible,
)
from csfd.predict import StudyPrefetcher, run_predict

COMPETITION = KernelConfig().competition
WHEEL_PACKAGES = list(KernelConfig().wheel_packages)
KERNEL_TEMPLATE = REPO / "kernels" / "csfd_inference.py"


class FakeClock:
    """A clock that only moves when a test sets `now`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel_folder(tmp_path_factory) -> Path:
    """Wheels of the kernel's packages, repacked from this environment (no network)."""
    folder = tmp_path_factory.mktemp("wheels")
    for name in WHEEL_PACKAGES:
        repack_installed_wheel(name, folder)
    return folder


@pytest.fixture(scope="session")
def kernel_build(tiny_run, wheel_folder, tmp_path_factory) -> Path:
    """The four Kaggle folders of the tiny run, built through the command line."""
    output = tmp_path_factory.mktemp("kaggle")
    root = Path(tiny_run.paths.data_dir).parent
    code = cli_main([
        "kernel", "--config", str(REPO / "configs" / "sample.yaml"),
        "--username", "tester", "--wheels-dir", str(wheel_folder), "--output-dir", str(output),
        *tiny_overrides(root), "name=tiny",
    ])
    assert code == 0
    return output


def _test_set_copy(tiny_run, destination: Path) -> Path:
    """Copy the tiny sample's test.csv and test_images to `destination` (the competition folder)."""
    source = Path(tiny_run.paths.data_dir)
    destination.mkdir(parents=True)
    shutil.copy2(source / "test.csv", destination / "test.csv")
    shutil.copytree(source / "test_images", destination / "test_images")
    return destination


def _small_study_set(tiny_run, destination: Path, copies: int) -> tuple[Path, list[str], str]:
    """Write a test set of `copies` copies of the tiny sample's smallest multi-slice study plus
    one study without images. Return (folder, study ids with images, the missing id)."""
    source_images = Path(tiny_run.paths.data_dir) / "test_images"
    sizes = {folder: len(list(folder.iterdir())) for folder in source_images.iterdir()}
    smallest = min((folder for folder, n in sizes.items() if n > 1), key=sizes.get)
    uids = [f"1.2.826.0.1.3680043.9{index:04d}" for index in range(copies)]
    for uid in uids:
        shutil.copytree(smallest, destination / "test_images" / uid)
    missing = "1.2.826.0.1.3680043.99999"
    rows = [
        {"row_id": f"{uid}_{target}", "StudyInstanceUID": uid, "prediction_type": target}
        for uid in [*uids[:1], missing, *uids[1:]]
        for target in ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall")
    ]
    pd.DataFrame(rows).to_csv(destination / "test.csv", index=False)
    return destination, uids, missing


def _with_predict(config, data_dir: Path, **predict_values):
    return dataclasses.replace(
        config,
        paths=dataclasses.replace(config.paths, data_dir=str(data_dir)),
        predict=dataclasses.replace(config.predict, **predict_values),
    )


def _kernel_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH" and not key.startswith("CSFD_")}
    env.update(settings)
    return env


# --- build ---------------------------------------------------------------------------------------


def test_kernel_metadata_is_offline_gpu_script(kernel_build):
    meta = json.loads((kernel_build / "csfd-inference" / "kernel-metadata.json").read_text())
    assert meta["id"] == "tester/csfd-inference"
    assert meta["enable_internet"] is False
    assert meta["enable_gpu"] is True
    assert meta["kernel_type"] == "script"
    assert meta["language"] == "python"
    assert meta["competition_sources"] == [COMPETITION]
    assert meta["dataset_sources"] == ["tester/csfd-code", "tester/csfd-weights", "tester/csfd-wheels"]
    assert (kernel_build / "csfd-inference" / meta["code_file"]).is_file()


def test_dataset_metadata_ids_and_licenses(kernel_build):
    for slug in ("csfd-code", "csfd-weights", "csfd-wheels"):
        meta = json.loads((kernel_build / slug / "dataset-metadata.json").read_text())
        assert meta["id"] == f"tester/{slug}"
        assert meta["licenses"] == [{"name": KernelConfig().license}]
        assert meta["title"] == slug.replace("-", " ")


def test_code_dataset_holds_every_module(kernel_build):
    package = REPO / "src" / "csfd"
    expected = {p.relative_to(package) for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    copied = {p.relative_to(kernel_build / "csfd-code" / "csfd") for p in (kernel_build / "csfd-code" / "csfd").rglob("*.py")}
    assert copied == expected


def test_weights_dataset_contents(kernel_build, tiny_run):
    weights = kernel_build / "csfd-weights"
    run = weights / "runs" / "tiny"
    for fold in range(tiny_run.folds.n_folds):
        for name in ("config.yaml", "vertebra.pt", "fracture.pt"):
            assert (run / f"fold{fold}" / name).read_bytes() == (tiny_run.run_dir(fold) / name).read_bytes()
    boosters = sorted(p.relative_to(run / "stack") for p in (run / "stack").glob("fold*/*.txt"))
    assert len(boosters) == tiny_run.folds.n_folds * 8
    assert (run / "stack" / "stacker.json").is_file()
    assert load_config(weights / "config.yaml").name == "tiny"
    manifest = json.loads((weights / "manifest.json").read_text())
    assert manifest["folds"] == list(range(tiny_run.folds.n_folds))
    vertebra = manifest["files"]["runs/tiny/fold0/vertebra.pt"]
    assert vertebra["sha256"] == hashlib.sha256((run / "fold0" / "vertebra.pt").read_bytes()).hexdigest()


def test_model_card_states_input_and_cv(kernel_build, tiny_run):
    card = (kernel_build / "csfd-weights" / "MODEL_CARD.md").read_text()
    summary = json.loads((tiny_run.run_dir() / "stack" / "summary.json").read_text())
    assert f"aggregate {summary['per_study_mean']['aggregate']:.4f}" in card
    assert "centre 400, width 1800" in card
    assert f"{tiny_run.prepare.image_size} x {tiny_run.prepare.image_size}" in card
    assert "not validated" in card
    assert "clinical use" in card
    assert "- torch: " in card
    assert "- dicomsdl: " in card


def test_wheels_dataset_pins_every_package(kernel_build):
    lines = (kernel_build / "csfd-wheels" / "requirements.txt").read_text().split()
    assert [line.split("==")[0] for line in lines] == WHEEL_PACKAGES
    assert len(list((kernel_build / "csfd-wheels").glob("*.whl"))) == len(WHEEL_PACKAGES)


def test_rendered_script_points_at_kaggle_input(kernel_build):
    namespace: dict = {}
    text = (kernel_build / "csfd-inference" / "csfd_inference.py").read_text()
    settings_block = text[text.index("SETTINGS = ") : text.index("# END SETTINGS")]
    exec(settings_block, namespace)
    assert namespace["SETTINGS"]["CSFD_DATA_DIR"] == f"/kaggle/input/{COMPETITION}"
    assert namespace["SETTINGS"]["CSFD_WEIGHTS_DIR"] == "/kaggle/input/csfd-weights"
    assert namespace["SETTINGS"]["CSFD_WORKING_DIR"] == "/kaggle/working"
    assert float(namespace["SETTINGS"]["CSFD_TIME_BUDGET_S"]) == KernelConfig().time_budget_s
    assert namespace["PRIOR"] == PREVALENCE


def test_template_prior_matches_constants():
    namespace: dict = {}
    text = KERNEL_TEMPLATE.read_text()
    exec(text[text.index("PRIOR = ") : text.index("# END SETTINGS")], namespace)
    assert namespace["PRIOR"] == PREVALENCE


def _load_kernel_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("csfd_inference_under_test", KERNEL_TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_settings_precedence(monkeypatch):
    kernel = _load_kernel_module()
    monkeypatch.setenv("CSFD_DATA_DIR", "/from/env")
    monkeypatch.setenv("CSFD_WORKING_DIR", "/env/working")
    monkeypatch.delenv("CSFD_STRICT", raising=False)
    settings, overrides, strict = kernel.parse_settings(
        ["--working-dir", "/from/option", "-f", "runner.json", "predict.slice_stride=2"]
    )
    assert settings["CSFD_DATA_DIR"] == "/from/env"
    assert settings["CSFD_WORKING_DIR"] == "/from/option"
    assert settings["CSFD_WEIGHTS_DIR"] == kernel.SETTINGS["CSFD_WEIGHTS_DIR"]
    assert overrides == ["predict.slice_stride=2"]
    assert strict is False


def test_render_rejects_script_without_settings():
    with pytest.raises(ValueError, match="BEGIN SETTINGS"):
        render_kernel_script("print('no settings')\n", {})


def test_build_rejects_invalid_slug(tiny_run, wheel_folder, tmp_path):
    from csfd.kernel import build_kernel

    config = dataclasses.replace(tiny_run, kernel=dataclasses.replace(tiny_run.kernel, code_dataset="Bad Name"))
    with pytest.raises(ValueError, match="kernel.code_dataset"):
        build_kernel(config, username="tester", wheels_dir=wheel_folder, output_dir=tmp_path)


def test_username_precedence(monkeypatch):
    config = load_config(None)
    monkeypatch.setenv("KAGGLE_USERNAME", "from-env")
    assert resolve_username(config, "from-arg") == "from-arg"
    with_config = dataclasses.replace(config, kernel=dataclasses.replace(config.kernel, username="from-config"))
    assert resolve_username(with_config) == "from-config"
    assert resolve_username(config) == "from-env"
    monkeypatch.delenv("KAGGLE_USERNAME")
    assert resolve_username(config) == USERNAME_PLACEHOLDER
    with pytest.raises(ValueError, match="a/b"):
        resolve_username(config, "a/b")


# --- the kernel as Kaggle runs it ---------------------------------------------------------------


def test_kernel_runs_offline_in_fresh_venv(kernel_build, tiny_run, tmp_path):
    input_dir = tmp_path / "kaggle" / "input"
    competition = _test_set_copy(tiny_run, input_dir / COMPETITION)
    for slug in ("csfd-code", "csfd-weights", "csfd-wheels"):
        shutil.copytree(kernel_build / slug, input_dir / slug)
    working = tmp_path / "kaggle" / "working"
    python = kaggle_like_venv(tmp_path / "env", WHEEL_PACKAGES)
    assert subprocess.run([str(python), "-c", "import dicomsdl"], capture_output=True).returncode != 0

    env = _kernel_env(
        CSFD_DATA_DIR=str(competition),
        CSFD_CODE_DIR=str(input_dir / "csfd-code"),
        CSFD_WEIGHTS_DIR=str(input_dir / "csfd-weights"),
        CSFD_WHEELS_DIR=str(input_dir / "csfd-wheels"),
        CSFD_WORKING_DIR=str(working),
        CSFD_STRICT="1",
    )
    script = kernel_build / "csfd-inference" / "csfd_inference.py"
    result = subprocess.run([str(python), str(script)], env=env, capture_output=True, text=True, timeout=600)
    log = (working / "kernel.log").read_text() if (working / "kernel.log").is_file() else result.stdout
    assert result.returncode == 0, log[-3000:] + result.stderr[-3000:]

    # The wheels were installed offline into the fresh environment, and csfd came from the code dataset.
    assert "Successfully installed" in log
    installed = site_packages_of(python)
    for name in ("dicomsdl", "imagecodecs", "pydicom", "pylibjpeg", "libjpeg", "openjpeg", "rle"):
        assert (installed / name).is_dir(), f"{name} was not installed into {installed}"
    assert f"csfd from {(input_dir / 'csfd-code' / 'csfd').resolve()}" in log

    test = pd.read_csv(competition / "test.csv")
    submission = pd.read_csv(working / "submission.csv")
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    assert submission["fractured"].between(tiny_run.stack.clip_min, tiny_run.stack.clip_max).all()
    missing = set(test["StudyInstanceUID"]) - {p.name for p in (competition / "test_images").iterdir()}
    assert len(missing) == 1
    values = submission.set_index("row_id")["fractured"]
    missing_uid = next(iter(missing))
    for target, prior in PREVALENCE.items():
        assert values[f"{missing_uid}_{target}"] == pytest.approx(prior)
    with_images = len(list((competition / "test_images").iterdir()))
    assert f"model (all folds) {with_images}, model (fewer folds) 0, prior (no images) 1" in log

    # Same code path as `make predict`: run_predict here gives the same numbers.
    expected = run_predict(_with_predict(tiny_run, competition), tmp_path / "local" / "submission.csv")
    np.testing.assert_allclose(submission["fractured"].to_numpy(), expected["fractured"].to_numpy(), atol=1e-5)


def test_kernel_writes_prior_when_prediction_fails(tiny_run, tmp_path):
    competition = _test_set_copy(tiny_run, tmp_path / "input" / COMPETITION)
    empty = tmp_path / "empty"
    empty.mkdir()
    working = tmp_path / "working"
    command = [
        sys.executable, str(KERNEL_TEMPLATE), "--data-dir", str(competition), "--code-dir", str(REPO / "src"),
        "--weights-dir", str(empty), "--wheels-dir", str(empty), "--working-dir", str(working),
    ]
    result = subprocess.run(command, env=_kernel_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Prediction failed" in result.stdout
    assert "config.yaml not found" in result.stdout
    test = pd.read_csv(competition / "test.csv")
    submission = pd.read_csv(working / "submission.csv")
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    assert submission["fractured"].tolist() == [PREVALENCE[t] for t in test["prediction_type"]]

    strict = subprocess.run([*command, "--strict"], env=_kernel_env(), capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1
    assert (working / "submission.csv").is_file()


# --- deadline guard in run_predict ----------------------------------------------------------------


def test_tiny_budget_sends_later_studies_to_prior(tiny_run, tmp_path, caplog):
    data, uids, missing = _small_study_set(tiny_run, tmp_path / "data", copies=4)
    config = _with_predict(tiny_run, data, time_budget_s=1e-6)
    with caplog.at_level(logging.INFO, logger="csfd"):
        submission = run_predict(config, tmp_path / "out" / "submission.csv")

    paths = pd.read_csv(tmp_path / "out" / "study_paths.csv").set_index("StudyInstanceUID")["path"]
    assert paths[uids[0]] == PATH_ALL_FOLDS
    assert [paths[uid] for uid in uids[1:]] == [PATH_PRIOR_DEADLINE] * 3
    assert paths[missing] == PATH_PRIOR_NO_IMAGES
    test = pd.read_csv(data / "test.csv")
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    values = submission.set_index("row_id")["fractured"]
    for uid in [*uids[1:], missing]:
        for target, prior in PREVALENCE.items():
            assert values[f"{uid}_{target}"] == pytest.approx(prior)
    assert "model (all folds) 1, model (fewer folds) 0, prior (no images) 1, prior (failed) 0, prior (deadline) 3" in caplog.text


def test_fake_clock_switches_to_fewer_folds_then_prior(tiny_run, tmp_path, monkeypatch, caplog):
    import csfd.predict

    data, uids, missing = _small_study_set(tiny_run, tmp_path / "data", copies=5)
    clock = FakeClock()
    folds_used = []

    def costly_predict_volume(volume, fold_models, *args, **kwargs):
        # Each fold costs 10 fake seconds per study, whatever the study's size.
        folds_used.append(len(fold_models))
        clock.now += 10.0 * len(fold_models)
        return predict_volume(volume, fold_models, *args, **kwargs)

    monkeypatch.setattr(csfd.predict, "predict_volume", costly_predict_volume)
    # After study 1 (all 2 folds, t=20): all folds for the other 4 would end at 100 > 45, so
    # they use 1 fold (10 s each): t=30, t=40, and the next would end at 50 > 45: prior.
    config = _with_predict(tiny_run, data, time_budget_s=45.0)
    with caplog.at_level(logging.INFO, logger="csfd"):
        submission = run_predict(config, tmp_path / "out" / "submission.csv", start=0.0, clock=clock)

    assert folds_used == [2, 1, 1]
    paths = pd.read_csv(tmp_path / "out" / "study_paths.csv").set_index("StudyInstanceUID")["path"]
    assert [paths[uid] for uid in uids] == [PATH_ALL_FOLDS, PATH_FEWER_FOLDS, PATH_FEWER_FOLDS,
                                            PATH_PRIOR_DEADLINE, PATH_PRIOR_DEADLINE]
    assert "model (all folds) 1, model (fewer folds) 2, prior (no images) 1, prior (failed) 0, prior (deadline) 2" in caplog.text
    assert submission["fractured"].notna().all()
    assert len(submission) == 8 * 6


# --- deadline guard arithmetic --------------------------------------------------------------------


def test_throughput_cost_per_slice():
    throughput = Throughput()
    # 100 slices, 2 folds: 40 s in the models, 10 s else -> 0.2 s per slice-fold, 0.1 s per slice.
    throughput.record(n_slices=100, n_folds=2, wall_seconds=50.0, model_seconds=40.0)
    assert throughput.seconds_per_slice(2) == pytest.approx(0.5)
    assert throughput.seconds_per_slice(1) == pytest.approx(0.3)
    throughput.record(n_slices=100, n_folds=1, wall_seconds=30.0, model_seconds=20.0)
    # Model: 60 s over 300 slice-folds; other: 20 s over 200 slices.
    assert throughput.seconds_per_slice(2) == pytest.approx(0.1 + 2 * 0.2)


def test_throughput_rejects_empty_record():
    with pytest.raises(ValueError, match="at least one slice"):
        Throughput().record(n_slices=0, n_folds=2, wall_seconds=1.0, model_seconds=1.0)
    with pytest.raises(ValueError, match="no study has been measured"):
        Throughput().seconds_per_slice(1)


def test_guard_projection_and_eta():
    clock = FakeClock(100.0)
    guard = DeadlineGuard(budget_s=1000.0, all_folds=5, fallback_folds=2, clock=clock, start=0.0)
    assert guard.eta(500) is None
    guard.record(n_slices=100, n_folds=5, wall_seconds=60.0, model_seconds=50.0)  # 0.1 s/slice/fold + 0.1 s/slice
    assert guard.projected_total(5, 1000) == pytest.approx(100.0 + 0.6 * 1000)
    assert guard.projected_total(2, 1000) == pytest.approx(100.0 + 0.3 * 1000)
    assert guard.eta(1000) == pytest.approx(600.0)


def test_guard_first_study_always_runs_all_folds():
    guard = DeadlineGuard(budget_s=1e-9, all_folds=3, fallback_folds=1, clock=FakeClock(50.0), start=0.0)
    assert guard.choose(study_slices=100, remaining_slices=1000) == 3


def test_guard_steps_down_and_never_back():
    clock = FakeClock(0.0)
    guard = DeadlineGuard(budget_s=100.0, all_folds=4, fallback_folds=1, clock=clock, start=0.0)
    guard.record(n_slices=10, n_folds=4, wall_seconds=4.0, model_seconds=4.0)  # 0.1 s per slice and fold
    clock.now = 4.0
    assert guard.choose(study_slices=10, remaining_slices=200) == 4  # 4 + 0.4 * 200 = 84 <= 100
    clock.now = 30.0
    assert guard.choose(study_slices=10, remaining_slices=190) == 1  # 30 + 76 > 100; 1 fold: 30 + 1 fits
    clock.now = 31.0
    assert guard.choose(study_slices=10, remaining_slices=10) == 1  # all folds would fit again; stays at 1
    clock.now = 99.5
    assert guard.choose(study_slices=10, remaining_slices=10) == 0  # 99.5 + 1 > 100
    clock.now = 0.0
    assert guard.choose(study_slices=1, remaining_slices=1) == 0  # the prior is final


def test_guard_disabled_keeps_all_folds():
    guard = DeadlineGuard(budget_s=0.0, all_folds=2, fallback_folds=1, clock=FakeClock(1e9), start=0.0)
    guard.record(n_slices=10, n_folds=2, wall_seconds=100.0, model_seconds=100.0)
    assert guard.choose(study_slices=10, remaining_slices=10**6) == 2


def test_guard_single_fold_goes_to_prior():
    clock = FakeClock(0.0)
    guard = DeadlineGuard(budget_s=10.0, all_folds=1, fallback_folds=1, clock=clock, start=0.0)
    guard.record(n_slices=10, n_folds=1, wall_seconds=5.0, model_seconds=5.0)
    clock.now = 5.0
    assert guard.choose(study_slices=10, remaining_slices=30) == 1  # the remainder does not fit, this study does
    clock.now = 9.0
    assert guard.choose(study_slices=10, remaining_slices=20) == 0


def test_path_names_and_counts():
    assert path_of(5, 5) == PATH_ALL_FOLDS
    assert path_of(2, 5) == PATH_FEWER_FOLDS
    assert path_of(0, 5) == PATH_PRIOR_DEADLINE
    counts = count_paths([PATH_ALL_FOLDS, PATH_ALL_FOLDS, PATH_PRIOR_FAILED])
    assert list(counts) == [PATH_ALL_FOLDS, PATH_FEWER_FOLDS, PATH_PRIOR_NO_IMAGES, PATH_PRIOR_FAILED, PATH_PRIOR_DEADLINE]
    assert list(counts.values()) == [2, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="unknown prediction path"):
        count_paths(["model"])


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3 * 3600 + 4 * 60 + 5.4) == "3:04:05"
    assert format_duration(30600) == "8:30:00"


# --- prefetch and slice stride --------------------------------------------------------------------


def test_prefetcher_decodes_ahead_once(monkeypatch, tmp_path):
    import csfd.prepare

    calls: list[tuple[str, str]] = []
    second_started = threading.Event()

    def fake_load_study(folder, prepare_config):
        calls.append((Path(folder).name, threading.current_thread().name))
        if Path(folder).name == "b":
            second_started.set()
        return Path(folder).name

    monkeypatch.setattr(csfd.prepare, "load_study", fake_load_study)
    folders = [tmp_path / "a", None, tmp_path / "b", tmp_path / "c"]
    prefetcher = StudyPrefetcher(folders, None, depth=1)
    assert prefetcher.load(0) == "a"
    # Study "b" (index 2) is decoded in the background without being asked for.
    assert second_started.wait(timeout=10)
    assert prefetcher.load(2) == "b"
    assert prefetcher.load(3) == "c"
    prefetcher.close()
    assert sorted(name for name, _ in calls) == ["a", "b", "c"]
    assert all(thread.startswith("csfd-decode") for _, thread in calls)


def test_prefetcher_stop_decodes_nothing_more(monkeypatch, tmp_path):
    import csfd.prepare

    calls: list[str] = []
    gate = threading.Event()
    second_started = threading.Event()

    def gated_load_study(folder, prepare_config):
        calls.append(Path(folder).name)
        if Path(folder).name != "a":
            second_started.set()
            gate.wait(timeout=10)
        return Path(folder).name

    monkeypatch.setattr(csfd.prepare, "load_study", gated_load_study)
    prefetcher = StudyPrefetcher([tmp_path / name for name in "abcd"], None, depth=1)
    assert prefetcher.load(0) == "a"
    assert second_started.wait(timeout=10)
    prefetcher.stop()  # "b" is decoding; nothing after it may start
    gate.set()
    time.sleep(0.3)
    assert calls == ["a", "b"]


def test_prefetcher_depth_zero_runs_inline(monkeypatch, tmp_path):
    import csfd.prepare

    threads = []
    monkeypatch.setattr(csfd.prepare, "load_study", lambda folder, config: threads.append(threading.current_thread()))
    StudyPrefetcher([tmp_path / "a"], None, depth=0).load(0)
    assert threads == [threading.main_thread()]


def test_strided_positions_keep_last():
    assert strided_positions(10, 1).tolist() == list(range(10))
    assert strided_positions(10, 3).tolist() == [0, 3, 6, 9]
    assert strided_positions(11, 3).tolist() == [0, 3, 6, 9, 10]
    assert strided_positions(1, 4).tolist() == [0]
    with pytest.raises(ValueError, match="stride"):
        strided_positions(10, 0)


def test_interpolate_positions_linear():
    positions = np.array([0, 3, 5])
    values = np.array([[0.0, 1.0], [0.3, 0.4], [0.5, 0.0]])
    filled = interpolate_positions(values, positions, 6)
    np.testing.assert_allclose(filled[:, 0], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(filled[:, 1], [1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_predict_volume_stride_matches_at_predicted_slices(tiny_run):
    fold_models = load_fold_models(tiny_run.run_dir())
    size = tiny_run.prepare.image_size
    volume = np.random.default_rng(0).integers(0, 256, (11, size, size), dtype=np.uint8)
    full_vis, full_frac = predict_volume(volume, fold_models, batch_size=4)
    strided_vis, strided_frac = predict_volume(volume, fold_models, batch_size=4, slice_stride=3)
    kept = strided_positions(11, 3)
    np.testing.assert_allclose(strided_vis[kept], full_vis[kept], atol=1e-6)
    np.testing.assert_allclose(strided_frac[kept], full_frac[kept], atol=1e-6)
    np.testing.assert_allclose(strided_vis[1], (2 * full_vis[0] + full_vis[3]) / 3, atol=1e-6)
    assert strided_vis.shape == full_vis.shape == (11, 7)



def test_load_fold_models_logs_loaded_weights(tiny_run, caplog):
    caplog.set_level(logging.INFO, logger="csfd")
    fold_models = load_fold_models(tiny_run.run_dir())
    assert fold_models
    assert "random weights" not in caplog.text
    assert caplog.text.count("loaded from") == 2 * len(fold_models)
    assert "vertebra.pt" in caplog.text
    assert "fracture.pt" in caplog.text


def test_predict_volume_shared_batches(tiny_run):
    # predict_volume builds each batch once for all models with the same input, so its result
    # must equal each model run on its own per-slice stacks, averaged over folds.
    import torch

    from csfd.data import stack_indices, to_model_input

    fold_models = load_fold_models(tiny_run.run_dir())
    size = tiny_run.prepare.image_size
    volume = np.random.default_rng(1).integers(0, 256, (9, size, size), dtype=np.uint8)
    visibility, fracture = predict_volume(volume, fold_models, batch_size=4)

    def outputs(model, section):
        stacks = [to_model_input(volume[stack_indices(i, len(volume), section.context_slices)], section.image_size) for i in range(len(volume))]
        with torch.inference_mode():
            return torch.sigmoid(model(torch.from_numpy(np.stack(stacks)))).numpy()

    expected_vis = np.mean([outputs(m.vertebra, m.config.vertebra) for m in fold_models], axis=0)
    expected_frac = np.mean([outputs(m.fracture, m.config.fracture)[:, 7:] for m in fold_models], axis=0)
    assert len(fold_models) >= 2
    np.testing.assert_allclose(visibility, expected_vis, atol=1e-5)
    np.testing.assert_allclose(fracture, expected_frac, atol=1e-5)

# --- wheels -----------------------------------------------------------------------------------------


def test_compatible_platforms_expand_glibc():
    tags = compatible_platforms("manylinux_2_35_x86_64")
    assert tags[0] == "manylinux_2_35_x86_64"
    assert "manylinux_2_17_x86_64" in tags
    assert "manylinux2014_x86_64" in tags
    assert "manylinux1_x86_64" in tags
    assert "manylinux_2_36_x86_64" not in tags
    assert compatible_platforms("manylinux2014_x86_64")[0] == "manylinux_2_17_x86_64"
    assert compatible_platforms("win_amd64") == ["win_amd64"]


def test_wheel_compatibility_by_tags():
    linux = "manylinux_2_35_x86_64"
    assert wheel_is_compatible("dicomsdl-0.109.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "3.11", linux)
    assert not wheel_is_compatible("dicomsdl-0.109.4-cp312-cp312-manylinux_2_17_x86_64.whl", "3.11", linux)
    assert not wheel_is_compatible("x-1.0-cp311-cp311-manylinux_2_36_x86_64.whl", "3.11", linux)
    assert wheel_is_compatible("pylibjpeg-2.1.0-py3-none-any.whl", "3.11", linux)
    assert wheel_is_compatible("x-1.0-cp38-abi3-manylinux2014_x86_64.whl", "3.11", linux)


def test_select_wheels_names_missing(wheel_folder, tmp_path):
    requirements = pinned_requirements(WHEEL_PACKAGES)
    chosen = select_wheels(requirements, wheel_folder, python_version(), "manylinux_2_35_x86_64")
    assert len(chosen) == len(WHEEL_PACKAGES)
    with pytest.raises(WheelError, match="dicomsdl==0.0.1"):
        select_wheels(["dicomsdl==0.0.1"], wheel_folder, python_version(), "manylinux_2_35_x86_64")
    with pytest.raises(WheelError, match="CPython 3.99"):
        select_wheels(requirements[:1], wheel_folder, "3.99", "manylinux_2_35_x86_64")


def test_pip_download_command_is_binary_only(tmp_path):
    command = pip_download_command(["dicomsdl==0.109.4"], tmp_path, "3.11", "manylinux_2_35_x86_64")
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--only-binary=:all:" in command
    assert "--no-deps" in command
    assert command[command.index("--python-version") + 1] == "3.11"
    assert command[command.index("--abi") + 1] == "cp311"
    platforms = [command[i + 1] for i, part in enumerate(command) if part == "--platform"]
    assert platforms == compatible_platforms("manylinux_2_35_x86_64")
    assert command[-1] == "dicomsdl==0.109.4"


def test_pip_download_fetches_pure_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "10")
    monkeypatch.setenv("PIP_RETRIES", "0")
    requirement = pinned_requirements(["pylibjpeg"])
    try:
        wheels = download_wheels(requirement, tmp_path, "3.11", "manylinux_2_35_x86_64")
    except WheelError as error:
        pytest.skip(f"the package index is not reachable, so pip download is not tested: {error}")
    assert [w.name for w in wheels] == [f"pylibjpeg-{requirement[0].split('==')[1]}-py3-none-any.whl"]


def test_config_rejects_bad_predict_values():
    from csfd.config import ConfigError

    for override, message in (
        ("predict.slice_stride=0", "slice_stride"),
        ("predict.prefetch=-1", "prefetch"),
        ("predict.time_budget_s=-5", "time_budget_s"),
        ("predict.fallback_folds=0", "fallback_folds"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    assert yaml.safe_load(yaml.safe_dump(load_config(None).to_dict()))["kernel"]["python_version"] == "3.11"
