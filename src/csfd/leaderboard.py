"""Local CV leaderboard: every run folder under paths.runs_dir scored and compared in one table.

Each run contributes up to two rows:
- stage1: the plain aggregation of each fold's out-of-fold slice predictions
  (fold<k>/oof_slices.csv, with fold<k>/metrics.json as the fallback for the two metric forms);
- stage2: the LightGBM stacker, read from stack/cv.csv once stack/summary.json exists.

Outputs (beside the runs folder by default): leaderboard.csv, leaderboard.md,
leaderboard_targets.png and leaderboard_folds.png. A folder that matches neither layout is
skipped with a logged line, so other studies may keep their own folders under runs_dir.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from csfd.constants import TARGETS
from csfd.io_utils import atomic_path, atomic_write_csv, atomic_write_text

logger = logging.getLogger(__name__)

FLOAT_FORMAT = "%.5f"
STAGE1 = "stage1"
STAGE2 = "stage2"
METHOD_OF_STAGE = {STAGE1: "aggregate", STAGE2: "stacker"}
# Config keys left out of the comparison: paths differ between machines, not between models,
# and the name is the experiment column already.
IGNORED_CONFIG_PREFIXES = ("paths.",)
IGNORED_CONFIG_KEYS = ("name",)
TOP_RUNS_PLOTTED = 5
MAX_RUNS_IN_FOLD_PLOT = 20


@dataclass
class RunEntry:
    """One (experiment, stage) row of the board with its per-fold scores."""

    experiment: str
    stage: str
    n_folds: int | None  # folds.n_folds of the run's config; None when it has none
    config: dict  # the resolved config flattened to dotted keys
    # One row per fold present: fold (int), per_study, flat and the eight targets' log losses.
    fold_scores: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)

    @property
    def folds(self) -> list[int]:
        return [int(k) for k in self.fold_scores["fold"]]

    @property
    def complete(self) -> bool:
        return self.n_folds is not None and set(range(self.n_folds)) <= set(self.folds)

    @property
    def label(self) -> str:
        return f"{self.experiment} {self.stage}"


def flatten_config(values: dict, prefix: str = "") -> dict:
    """Flatten nested mappings to dotted keys; lists become JSON text so they compare as values."""
    flat: dict = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, dotted + "."))
        elif isinstance(value, (list, tuple)):
            flat[dotted] = json.dumps(list(value))
        else:
            flat[dotted] = value
    return flat


def differing_config_keys(configs: list[dict]) -> list[str]:
    """Return the sorted dotted keys whose values are not the same in every config.

    A key that some configs lack counts as differing. paths.* and name are left out.
    """
    keys = sorted(set().union(*configs)) if configs else []
    differing = []
    for key in keys:
        if key in IGNORED_CONFIG_KEYS or key.startswith(IGNORED_CONFIG_PREFIXES):
            continue
        values = {json.dumps(config.get(key, "<missing>"), sort_keys=True, default=str) for config in configs}
        if len(values) > 1:
            differing.append(key)
    return differing


def _fold_index(folder: Path) -> int | None:
    suffix = folder.name[len("fold") :]
    if not folder.name.startswith("fold") or not suffix.lstrip("-").isdigit():
        return None
    return int(suffix)


def _read_json(path: Path) -> dict | None:
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning("skipping %s: not valid JSON (%s)", path, error)
        return None
    if not isinstance(payload, dict):
        logger.warning("skipping %s: expected a JSON object, found %s", path, type(payload).__name__)
        return None
    return payload


def _read_yaml_config(path: Path) -> dict | None:
    try:
        payload = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        logger.warning("skipping %s: not valid YAML (%s)", path, error)
        return None
    if not isinstance(payload, dict):
        logger.warning("skipping %s: expected a mapping at the top level", path)
        return None
    return payload


def _labels_of(config: dict, run_dir: Path) -> pd.DataFrame | None:
    data_dir = config.get("paths", {}).get("data_dir")
    path = Path(str(data_dir)) / "train.csv" if data_dir else None
    if path is None or not path.is_file():
        logger.warning(
            "%s: labels %s not found, so its stage-1 per-target scores are empty; run the leaderboard from "
            "the directory the run was trained in, because paths.data_dir may be relative",
            run_dir, path,
        )
        return None
    return pd.read_csv(path, dtype={"StudyInstanceUID": str})


def _score_fold_oof(oof_path: Path, labels: pd.DataFrame) -> dict:
    from csfd.features import aggregate_predictions
    from csfd.metric import competition_score, per_target_scores

    slices = pd.read_csv(oof_path, dtype={"StudyInstanceUID": str})
    predictions = aggregate_predictions(slices)
    fold_labels = labels[labels["StudyInstanceUID"].isin(predictions["StudyInstanceUID"])]
    return {**competition_score(fold_labels, predictions), **per_target_scores(fold_labels, predictions)}


def _aggregate_score(metrics: dict | None) -> dict | None:
    """Return metrics.json's cv.aggregate ({"per_study", "flat"}), or None when it has none."""
    cv = metrics.get("cv") if metrics else None
    aggregate = cv.get("aggregate") if isinstance(cv, dict) else None
    if not isinstance(aggregate, dict) or not {"per_study", "flat"} <= set(aggregate):
        return None
    return aggregate


def _fold_scores(folder: Path, aggregate: dict, labels: pd.DataFrame | None) -> dict:
    """Score oof_slices.csv against the labels, or fall back to metrics.json's two metric forms."""
    recorded = {"per_study": float(aggregate["per_study"]), "flat": float(aggregate["flat"])}
    if labels is None:
        return recorded
    oof_path = folder / "oof_slices.csv"
    if not oof_path.is_file():
        logger.warning("%s not found, so this fold has metrics.json's scores and no per-target scores", oof_path)
        return recorded
    try:
        return _score_fold_oof(oof_path, labels)
    except ValueError as error:  # ScoreInputError, invalid slice columns, an unreadable CSV
        logger.warning("%s cannot be scored (%s), so this fold has metrics.json's scores only", oof_path, error)
        return recorded


def _stage1_entry(run_dir: Path, fold_dirs: dict[int, Path]) -> RunEntry | None:
    """Score the folds whose training finished (metrics.json with cv.aggregate)."""
    config: dict | None = None
    rows = []
    hashes = set()
    labels: pd.DataFrame | None = None
    labels_read = False
    for fold, folder in sorted(fold_dirs.items()):
        if fold < 0:
            logger.debug("%s: fold %d trains on every study and has no OOF score", folder, fold)
            continue
        metrics_path, config_path = folder / "metrics.json", folder / "config.yaml"
        if not metrics_path.is_file() or not config_path.is_file():
            logger.info("%s: no metrics.json or config.yaml, so fold %d counts as missing", folder, fold)
            continue
        metrics = _read_json(metrics_path)
        aggregate = _aggregate_score(metrics)
        if aggregate is None:
            logger.info("%s: metrics.json has no cv.aggregate score, so fold %d counts as missing", folder, fold)
            continue
        fold_config = _read_yaml_config(config_path)
        if fold_config is None:
            continue
        config = config or fold_config
        hashes.add(metrics.get("config_hash"))
        if not labels_read:
            labels, labels_read = _labels_of(config, run_dir), True
        rows.append({"fold": fold, **_fold_scores(folder, aggregate, labels)})
    if config is None:
        return None
    if len(hashes) > 1:
        logger.warning("%s: folds were trained with different configs (hashes %s)", run_dir, ", ".join(sorted(map(str, hashes))))
    scores = pd.DataFrame(rows, columns=["fold", "per_study", "flat", *TARGETS])
    return RunEntry(run_dir.name, STAGE1, _n_folds(config, run_dir), flatten_config(config), scores)


def _stage2_entry(run_dir: Path, stage1: RunEntry) -> RunEntry | None:
    stack_dir = run_dir / "stack"
    if not stack_dir.is_dir():
        return None
    if not (stack_dir / "summary.json").is_file():
        logger.info("%s: no summary.json (stacker unfinished or failed), so stage 2 is left off the board", stack_dir)
        return None
    cv_path = stack_dir / "cv.csv"
    if not cv_path.is_file():
        logger.warning("%s: summary.json exists but cv.csv is missing; rerun `make stack`", stack_dir)
        return None
    table = pd.read_csv(cv_path, dtype={"fold": str})
    missing = [c for c in ("method", "fold", "per_study", "flat", *TARGETS) if c not in table.columns]
    if missing:
        logger.warning("%s: missing column(s) %s, so stage 2 is left off the board", cv_path, ", ".join(missing))
        return None
    rows = table[(table["method"] == METHOD_OF_STAGE[STAGE2]) & (table["fold"] != "mean")].copy()
    rows["fold"] = rows["fold"].astype(int)
    scores = rows[["fold", "per_study", "flat", *TARGETS]].sort_values("fold").reset_index(drop=True)
    return RunEntry(run_dir.name, STAGE2, stage1.n_folds, stage1.config, scores)


def _n_folds(config: dict, run_dir: Path) -> int | None:
    folds = config.get("folds")
    value = folds.get("n_folds") if isinstance(folds, dict) else None
    if not isinstance(value, int):
        logger.warning("%s: config has no integer folds.n_folds, so the run counts as incomplete", run_dir)
        return None
    return value


def collect_runs(runs_dir: str | Path) -> list[RunEntry]:
    """Read every run folder under `runs_dir`; folders of another layout are skipped with a log line."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs folder not found: {runs_dir}; train a run first or pass --runs")
    entries: list[RunEntry] = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        fold_dirs = {k: p for p in run_dir.iterdir() if p.is_dir() and (k := _fold_index(p)) is not None}
        stage1 = _stage1_entry(run_dir, fold_dirs) if fold_dirs else None
        if stage1 is None:
            logger.info(
                "skipping %s: no fold<k>/ folder with config.yaml and a metrics.json CV score (not a stage-1 run folder)",
                run_dir,
            )
            continue
        entries.append(stage1)
        stage2 = _stage2_entry(run_dir, stage1)
        if stage2 is not None:
            entries.append(stage2)
    return entries


def leaderboard_table(entries: list[RunEntry]) -> pd.DataFrame:
    """Build the board: complete rows by mean per-study CV ascending, then the incomplete ones.

    Columns, in this order: experiment, stage, method, complete, folds (present, space
    separated), n_folds (expected), cv_per_study, cv_flat, cv_per_study_std (sample std over
    folds), the eight per-target log losses (means over folds), fold<k>_per_study and
    fold<k>_flat for every fold index seen, then the config keys that differ between runs.
    """
    fold_ids = sorted({k for entry in entries for k in entry.folds})
    config_keys = differing_config_keys([entry.config for entry in entries])
    rows = []
    for entry in entries:
        scores = entry.fold_scores
        row = {
            "experiment": entry.experiment,
            "stage": entry.stage,
            "method": METHOD_OF_STAGE[entry.stage],
            "complete": entry.complete,
            "folds": " ".join(str(k) for k in entry.folds),
            "n_folds": entry.n_folds,
            "cv_per_study": scores["per_study"].mean(),
            "cv_flat": scores["flat"].mean(),
            "cv_per_study_std": scores["per_study"].std(ddof=1) if len(scores) > 1 else np.nan,
        }
        # NaN when a fold lacks per-target scores, so these means never cover fewer folds than cv_per_study.
        row.update({target: scores[target].astype(float).mean(skipna=False) for target in TARGETS})
        by_fold = scores.set_index("fold")
        for k in fold_ids:
            row[f"fold{k}_per_study"] = by_fold.at[k, "per_study"] if k in by_fold.index else np.nan
            row[f"fold{k}_flat"] = by_fold.at[k, "flat"] if k in by_fold.index else np.nan
        row.update({key: _config_text(entry.config.get(key)) for key in config_keys})
        rows.append(row)
    columns = [
        "experiment", "stage", "method", "complete", "folds", "n_folds",
        "cv_per_study", "cv_flat", "cv_per_study_std", *TARGETS,
        *[f"fold{k}_{form}" for k in fold_ids for form in ("per_study", "flat")],
        *config_keys,
    ]
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        return table
    table["n_folds"] = table["n_folds"].astype("Int64")
    # Incomplete after complete; inside each group by CV (NaN last), then by name for ties.
    table["_incomplete"] = ~table["complete"].astype(bool)
    table = table.sort_values(
        ["_incomplete", "cv_per_study", "experiment", "stage"], kind="mergesort", na_position="last"
    ).drop(columns="_incomplete")
    return table.reset_index(drop=True)


def _config_text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _format_cell(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else FLOAT_FORMAT % value
    if value is None or value is pd.NA:
        return ""
    return str(value).replace("|", "\\|")


def markdown_table(table: pd.DataFrame, columns: list[str] | None = None) -> str:
    """Render `table` as a GitHub Markdown table with the board's fixed float format."""
    columns = columns or list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table[columns].iterrows():
        lines.append("| " + " | ".join(_format_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summary_columns(table: pd.DataFrame) -> list[str]:
    """Return the columns of the printed board: everything but the per-fold scores."""
    return [c for c in table.columns if not (c.startswith("fold") and c != "folds")]


def plot_target_comparison(table: pd.DataFrame) -> Figure:
    """Draw grouped bars: one group per target, one bar per board row, mean log loss over folds."""
    figure = Figure(figsize=(10, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    n_runs = max(len(table), 1)
    width = 0.8 / n_runs
    x = np.arange(len(TARGETS))
    for i, row in enumerate(table.itertuples(index=False)):
        values = [getattr(row, target) for target in TARGETS]
        marker = "" if row.complete else " (incomplete)"
        axes.bar(x - 0.4 + width * (i + 0.5), values, width, label=f"{row.experiment} {row.stage}{marker}")
    axes.set_xticks(x, list(TARGETS))
    axes.set_ylabel("weighted log loss (mean over folds)")
    axes.set_title(f"Per-target CV of the top {len(table)} rows (lower is better)")
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def plot_fold_spread(entries: list[RunEntry]) -> Figure:
    """Draw each row's per-fold per-study scores as points and their mean as a bar marker."""
    figure = Figure(figsize=(9, 0.45 * len(entries) + 1.6))
    axes = figure.add_subplot(1, 1, 1)
    fold_ids = sorted({k for entry in entries for k in entry.folds})
    colours = {k: f"C{i % 10}" for i, k in enumerate(fold_ids)}
    for position, entry in enumerate(entries):
        y = len(entries) - 1 - position  # the best row on top
        scores = entry.fold_scores
        for fold, value in zip(scores["fold"], scores["per_study"]):
            axes.scatter(value, y, color=colours[int(fold)], s=30, zorder=3)
        if len(scores):
            axes.scatter(scores["per_study"].mean(), y, marker="|", color="black", s=300, zorder=4)
    for fold in fold_ids:
        axes.scatter([], [], color=colours[fold], s=30, label=f"fold {fold}")
    axes.scatter([], [], marker="|", color="black", s=100, label="mean")
    labels = [entry.label + ("" if entry.complete else " (incomplete)") for entry in entries]
    axes.set_yticks(np.arange(len(entries))[::-1], labels, fontsize=8)
    axes.set_xlabel("per-study weighted log loss (lower is better)")
    axes.set_title("CV per fold")
    axes.legend(fontsize=8, loc="best")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def write_leaderboard(entries: list[RunEntry], out_dir: str | Path) -> pd.DataFrame:
    """Write leaderboard.csv, leaderboard.md and the two PNG figures into `out_dir`; return the table."""
    out_dir = Path(out_dir)
    table = leaderboard_table(entries)
    atomic_write_csv(table, out_dir / "leaderboard.csv", float_format=FLOAT_FORMAT)
    text = ["# Local CV leaderboard", ""]
    text.append(
        "Weighted multi-label log loss, lower is better; the mean over folds of each fold's out-of-fold score. "
        "stage1 is the plain aggregation of the slice models, stage2 the LightGBM stacker. "
        "Incomplete runs (folds missing against folds.n_folds) come last."
    )
    text.append("")
    if table.empty:
        text.append("No run found.")
    else:
        text.append(markdown_table(table, summary_columns(table)))
        text.append("Per-fold scores: leaderboard.csv. Figures: leaderboard_targets.png, leaderboard_folds.png.")
    atomic_write_text(out_dir / "leaderboard.md", "\n".join(text) + "\n")
    if table.empty:
        logger.warning("no run found, so the leaderboard figures are not drawn")
        return table

    ordered = {(e.experiment, e.stage): e for e in entries}
    ranked = [ordered[(row.experiment, row.stage)] for row in table.itertuples()]
    # Bars of a run with missing folds would not compare like for like, so they are drawn only
    # when no run is complete.
    complete = table[table["complete"].astype(bool)]
    compared = (complete if len(complete) else table).head(TOP_RUNS_PLOTTED)
    _save_figure(plot_target_comparison(compared), out_dir / "leaderboard_targets.png")
    _save_figure(plot_fold_spread(ranked[:MAX_RUNS_IN_FOLD_PLOT]), out_dir / "leaderboard_folds.png")
    return table


def _save_figure(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def run_leaderboard(runs_dir: str | Path = "output/runs", out_dir: str | Path | None = None) -> pd.DataFrame:
    """Collect the runs, write the board beside `runs_dir` (or into `out_dir`) and return it."""
    runs_dir = Path(runs_dir)
    out_dir = Path(out_dir) if out_dir is not None else runs_dir.parent
    entries = collect_runs(runs_dir)
    table = write_leaderboard(entries, out_dir)
    logger.info("leaderboard of %d rows written to %s", len(table), out_dir / "leaderboard.csv")
    return table
