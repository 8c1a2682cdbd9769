"""Command line: `python -m csfd <command>`; each stage can run on its own."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from csfd.config import ConfigError, ExperimentConfig, load_config
from csfd.logs import setup_logging

logger = logging.getLogger("csfd")

DEFAULT_CONFIG = "configs/default.yaml"


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (default: %(default)s)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=value", help="config overrides, for example fracture.epochs=2 paths.data_dir=input/x"
    )


def _config(args: argparse.Namespace, extra: list[str] | None = None) -> ExperimentConfig:
    return load_config(args.config, [*(extra or []), *args.overrides])


def cmd_sample(args: argparse.Namespace) -> int:
    from csfd.sample import main as sample_main

    return sample_main(args.sample_args)


def cmd_prepare(args: argparse.Namespace) -> int:
    from csfd.prepare import run_prepare

    config = _config(args, [f"paths.data_dir={args.data}"] if args.data else None)
    reports = run_prepare(config, splits=tuple(args.splits.split(",")))
    failed = sum(int((r["status"] == "failed").sum()) for r in reports.values())
    return 0 if failed == 0 or not args.strict else 1


def cmd_folds(args: argparse.Namespace) -> int:
    from csfd.folds import write_folds

    config = _config(args)
    write_folds(
        Path(config.paths.data_dir) / "train.csv",
        Path(config.paths.folds_csv),
        config.folds.n_folds,
        config.folds.seed,
        overwrite=args.overwrite,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from csfd.train import train_fold

    config = _config(args)
    folds = range(config.folds.n_folds) if args.fold == "all" else [int(f) for f in args.fold.split(",")]
    for fold in folds:
        train_fold(config, fold)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from csfd.stack import run_stack

    run_stack(_config(args))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from csfd.predict import run_predict

    config = _config(args, [f"paths.data_dir={args.data}"] if args.data else None)
    output = Path(args.output) if args.output else Path(config.paths.submission_csv)
    run_predict(config, output)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import pandas as pd

    from csfd.metric import ScoreInputError, competition_score

    for path in (args.labels, args.predictions):
        if not Path(path).is_file():
            print(f"error: file not found: {path}", file=sys.stderr)
            return 2
    try:
        score = competition_score(pd.read_csv(args.labels), pd.read_csv(args.predictions))
    except ScoreInputError as error:
        print(f"error: {args.predictions}: {error}", file=sys.stderr)
        return 2
    print(f"per_study {score['per_study']:.5f}")
    print(f"flat      {score['flat']:.5f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m csfd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="build the synthetic sample dataset in the competition layout", add_help=False)
    p.add_argument("sample_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("prepare", help="decode DICOM studies into the uint8 slice cache")
    _add_config_arguments(p)
    p.add_argument("--data", help="competition-format folder (overrides paths.data_dir)")
    p.add_argument("--splits", default="train,test", help="comma-separated splits to prepare (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any study failed")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("folds", help="make the study-level folds once")
    _add_config_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="remake the folds even if the file exists")
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser("train", help="train the stage-1 slice models of one fold")
    _add_config_arguments(p)
    p.add_argument("--fold", default="0", help="fold index, -1 for all data, 'all' for every fold, or a list 0,1 (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("stack", help="train the stage-2 LightGBM stacker on out-of-fold predictions")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("predict", help="predict test_images and write submission.csv")
    _add_config_arguments(p)
    p.add_argument("--data", help="competition-format folder with test.csv and test_images (overrides paths.data_dir)")
    p.add_argument("--output", help="submission path (default: paths.submission_csv)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("score", help="score predictions with the competition metric (both forms)")
    p.add_argument("--labels", required=True, help="train.csv-format labels")
    p.add_argument("--predictions", required=True, help="submission (row_id, fractured) or wide CSV (StudyInstanceUID, patient_overall or Overall, C1..C7)")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
