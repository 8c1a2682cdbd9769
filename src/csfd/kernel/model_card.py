"""MODEL_CARD.md of the weights dataset: versions, input specification, CV and intended use."""

from __future__ import annotations

import json
import logging
import platform
from importlib import metadata
from pathlib import Path

import pandas as pd

from csfd.config import ExperimentConfig

logger = logging.getLogger(__name__)

CARD_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pandas", "lightgbm", "pydicom", "dicomsdl", "opencv-python-headless")


def package_versions(names: tuple[str, ...] = CARD_PACKAGES) -> dict[str, str]:
    """Return the installed version of each package ("not installed" when absent), and Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cv_summary(stack_dir: Path) -> tuple[str, str]:
    """Return (score line, table) of the run's out-of-fold CV from summary.json and cv.csv."""
    summary_path = stack_dir / "summary.json"
    cv_path = stack_dir / "cv.csv"
    if not summary_path.is_file():
        return "No stacker was trained for this run (no stack/summary.json), so there is no CV score.", ""
    summary = json.loads(summary_path.read_text())
    parts = [f"Better method by out-of-fold CV: {summary.get('better_method', 'unknown')}"]
    for key, label in (("per_study_mean", "per-study metric"), ("flat_mean", "flat metric")):
        scores = summary.get(key)
        if isinstance(scores, dict):
            parts.append(f"{label}: " + ", ".join(f"{method} {value:.4f}" for method, value in scores.items()))
    if "n_studies" in summary:
        parts.append(f"{summary['n_studies']} studies")
    table = markdown_table(pd.read_csv(cv_path)) if cv_path.is_file() else ""
    return "; ".join(parts) + ".", table


def markdown_table(frame: pd.DataFrame) -> str:
    """Format a frame as a Markdown table, numbers with 4 decimals."""

    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    rows = [
        "| " + " | ".join(map(str, frame.columns)) + " |",
        "|" + "---|" * len(frame.columns),
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)),
    ]
    return "\n".join(rows)


def _model_lines(config: ExperimentConfig) -> list[str]:
    lines = []
    for name, model in (("vertebra", config.vertebra), ("fracture", config.fracture)):
        channels = 2 * model.context_slices + 1
        outputs = "7 (C1..C7 visible)" if name == "vertebra" else "14 (C1..C7 visible, C1..C7 fractured)"
        lines.append(
            f"| {name} | {model.backbone} | {model.image_size} x {model.image_size} | {channels} "
            f"(the slice and {model.context_slices} neighbour(s) on each side) | {outputs} |"
        )
    return lines


def model_card(config: ExperimentConfig, folds: list[int], stack_dir: Path, provenance: dict) -> str:
    """Return the model card text of a run."""
    prepare = config.prepare
    low = prepare.window_center - prepare.window_width / 2
    high = prepare.window_center + prepare.window_width / 2
    score_line, table = cv_summary(stack_dir)
    versions = package_versions()
    lines = [
        f"# csfd weights: experiment `{config.name}`",
        "",
        "Stage-1 slice models (vertebra visibility and fracture, one pair per fold) and the stage-2",
        "LightGBM stacker of the csfd pipeline for RSNA 2022 Cervical Spine Fracture Detection.",
        "",
        "## Intended use",
        "",
        "Research and the Kaggle competition only. This is not a medical device and is not validated",
        "for clinical use; do not use it to diagnose or treat patients.",
        "",
        "## Contents",
        "",
        f"- `runs/{config.name}/fold<k>/`: `vertebra.pt`, `fracture.pt`, `config.yaml` for folds {folds}",
        f"- `runs/{config.name}/stack/`: the stacker boosters, `stacker.json`, `summary.json`, `cv.csv`",
        "- `config.yaml`: the resolved experiment config that the kernel loads",
        "- `manifest.json`: file sizes and SHA-256 digests, the csfd commit and the build time",
        "",
        "## Input",
        "",
        f"- One axial CT study (a folder of DICOM slices), ordered head to feet.",
        f"- HU window: centre {prepare.window_center:g}, width {prepare.window_width:g}, so "
        f"[{low:g}, {high:g}] HU maps linearly to 0..255 (clipped).",
        f"- Each slice is resized with its aspect ratio kept to {prepare.image_size} x {prepare.image_size} "
        "(zero padding), then to the model's size, and scaled to [0, 1].",
        "",
        "| model | backbone | image size | channels | outputs |",
        "|---|---|---|---|---|",
        *_model_lines(config),
        "",
        "## Output",
        "",
        "The probability of a fracture in each of C1..C7 and in the patient (`patient_overall`),",
        f"clipped to [{config.stack.clip_min:g}, {config.stack.clip_max:g}].",
        "",
        "## Cross-validation (out of fold, competition weighted log loss, lower is better)",
        "",
        score_line,
        "",
    ]
    if table:
        lines += [table, ""]
    lines += [
        "## Versions",
        "",
        *(f"- {name}: {version}" for name, version in versions.items()),
        f"- csfd commit: {provenance.get('git_commit', 'unknown')}",
        f"- built: {provenance.get('built_at', 'unknown')}",
        "",
    ]
    return "\n".join(lines)
