"""Command line: `python -m csfd <command>`; each stage can run on its own."""

from __future__ import annotations

import argparse
import faulthandler
import io
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
    usable = sum(int(r["status"].isin(["done", "skipped"]).sum()) for r in reports.values())
    total = sum(len(r) for r in reports.values())
    if failed == 0:
        return 0
    if usable == 0:
        logger.error("prepare: %d of %d studies failed and none is cached. The reasons are in report.csv", failed, total)
        return 1
    if args.strict:
        logger.error("prepare: %d of %d studies failed and --strict is set. The reasons are in report.csv", failed, total)
        return 1
    logger.warning(
        "prepare: %d of %d studies failed (the reasons are in report.csv). A rerun retries them, "
        "and --strict makes this exit with status 1",
        failed,
        total,
    )
    return 0


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
    from csfd.distributed import distributed_session
    from csfd.train import train_fold

    config = _config(args)
    folds = range(config.folds.n_folds) if args.fold == "all" else [int(f) for f in args.fold.split(",")]
    # Under torchrun (WORLD_SIZE > 1) every process joins one process group; otherwise a no-op.
    with distributed_session(config.device):
        for fold in folds:
            train_fold(config, fold, resume=args.resume)
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


def cmd_kernel(args: argparse.Namespace) -> int:
    from csfd.kernel import build_kernel
    from csfd.kernel.wheels import WheelError

    config = _config(args)
    try:
        build_kernel(config, username=args.username, wheels_dir=args.wheels_dir, output_dir=args.output_dir, script=args.script)
    except WheelError as error:
        logger.error("%s", error)
        return 2
    return 0


def cmd_ssl_study(args: argparse.Namespace) -> int:
    from csfd.ssl_study import run_study, study_dir

    config = _config(args)
    summary = run_study(config)
    logger.info("SSL study written to %s (%.0f s)", study_dir(config), summary["wall_seconds"])
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from csfd.leaderboard import markdown_table, run_leaderboard, summary_columns

    table = run_leaderboard(args.runs, args.output)
    if table.empty:
        print(f"no run found under {args.runs}")
    else:
        print(markdown_table(table, summary_columns(table)), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from csfd.report import run_report

    index = run_report(_config(args), study_uid=args.study, method=args.method)
    print(index)
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's last checkpoint and finished stages, and fail if the run folder "
        "has another config (a run folder of the same config is resumed also without this flag)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("stack", help="train the stage-2 LightGBM stacker on out-of-fold predictions")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("predict", help="predict test_images and write submission.csv")
    _add_config_arguments(p)
    p.add_argument("--data", help="competition-format folder with test.csv and test_images (overrides paths.data_dir)")
    p.add_argument("--output", help="submission path (default: paths.submission_csv)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("kernel", help="build the Kaggle datasets (code, weights, wheels) and the inference kernel")
    _add_config_arguments(p)
    p.add_argument("--username", help="Kaggle username of the dataset and kernel ids (default: kernel.username, else $KAGGLE_USERNAME)")
    p.add_argument("--wheels-dir", help="folder of wheels to copy instead of pip download (default: kernel.wheels_dir)")
    p.add_argument("--output-dir", help="folder for the four Kaggle folders (default: kernel.output_dir)")
    p.add_argument("--script", help="kernel script template (default: kernels/csfd_inference.py of this repository)")
    p.set_defaults(func=cmd_kernel)

    p = sub.add_parser("leaderboard", help="compare the CV of every run folder: leaderboard.csv/.md and figures")
    p.add_argument("--runs", default="output/runs", help="folder of run folders (default: %(default)s)")
    p.add_argument("--output", help="folder for the leaderboard files (default: the parent of --runs)")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("report", help="write the visual report of a run into <run folder>/report/")
    _add_config_arguments(p)
    p.add_argument("--study", help="StudyInstanceUID shown slice by slice (default: the OOF study with the highest patient_overall)")
    p.add_argument(
        "--method",
        default="auto",
        choices=("auto", "stacker", "aggregate"),
        help="study-level OOF predictions scored: auto takes stack/summary.json's better method (default: %(default)s)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("score", help="score predictions with the competition metric (both forms)")
    p.add_argument("--labels", required=True, help="train.csv-format labels")
    p.add_argument("--predictions", required=True, help="submission (row_id, fractured) or wide CSV (StudyInstanceUID, patient_overall or Overall, C1..C7)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "ssl-study",
        help="compare supervised and semi-supervised stage 1 at several labelled fractions (settings: ssl.study.*)",
    )
    _add_config_arguments(p)
    p.set_defaults(func=cmd_ssl_study)
    return parser


def _enable_faulthandler() -> None:
    # A crash inside a C extension (dicomsdl on a damaged file, for one) then prints the Python
    # stack that led to it, not only "Segmentation fault".
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (io.UnsupportedOperation, AttributeError, ValueError):
        pass  # stderr has no file descriptor (captured or replaced), so there is nowhere to print


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sample"]:
        # argparse's REMAINDER drops options that start with "--", so the sample builder
        # parses its own arguments.
        from csfd.sample import main as sample_main

        setup_logging(logging.INFO)
        return sample_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    _enable_faulthandler()
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
