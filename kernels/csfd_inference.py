"""Kaggle inference kernel for RSNA 2022 Cervical Spine Fracture Detection (offline).

1. Installs the wheels dataset with `pip install --no-index --find-links` (no internet).
2. Puts the code dataset first on sys.path, so `import csfd` loads the uploaded package.
3. Runs csfd.predict.run_predict, the code path of `make predict`, with the weights dataset's
   config and models, and writes submission.csv to the working folder.
If any step fails, it still writes a submission: studies that cannot be predicted get the
prevalence prior, and if the prediction cannot run at all, every row gets the prior.

`python -m csfd kernel` writes this file into the kernel folder with the dataset paths below
filled in. Each setting can be overridden by an environment variable of the same name or by an
option (`--data-dir` for CSFD_DATA_DIR, and so on), so the same script runs locally:

    python csfd_inference.py --data-dir input/sample --code-dir output/kaggle/csfd-code \\
        --weights-dir output/kaggle/csfd-weights --wheels-dir output/kaggle/csfd-wheels \\
        --working-dir /tmp/working [KEY=value config overrides]

CSFD_STRICT=1 (or --strict) re-raises a failure after writing the prior submission and exits
with status 1; by default the kernel exits 0 so that Kaggle scores the prior submission.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the deadline guard counts the budget from here

import argparse  # noqa: E402
import csv  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# BEGIN SETTINGS (written by `python -m csfd kernel`)
SETTINGS = {
    "CSFD_DATA_DIR": "/kaggle/input/rsna-2022-cervical-spine-fracture-detection",
    "CSFD_CODE_DIR": "/kaggle/input/csfd-code",
    "CSFD_WEIGHTS_DIR": "/kaggle/input/csfd-weights",
    "CSFD_WHEELS_DIR": "/kaggle/input/csfd-wheels",
    "CSFD_WORKING_DIR": "/kaggle/working",
    "CSFD_TIME_BUDGET_S": "30600",
}
# The prevalence prior per prediction_type (csfd.constants.PREVALENCE), for the last-resort
# submission when csfd itself cannot be imported.
PRIOR = {
    "patient_overall": 0.475978,
    "C1": 0.072313,
    "C2": 0.141159,
    "C3": 0.036157,
    "C4": 0.053492,
    "C5": 0.080238,
    "C6": 0.137197,
    "C7": 0.194651,
}
# END SETTINGS

OPTIONS = {
    "--data-dir": "CSFD_DATA_DIR",
    "--code-dir": "CSFD_CODE_DIR",
    "--weights-dir": "CSFD_WEIGHTS_DIR",
    "--wheels-dir": "CSFD_WHEELS_DIR",
    "--working-dir": "CSFD_WORKING_DIR",
    "--time-budget-s": "CSFD_TIME_BUDGET_S",
}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("csfd_kernel")


def parse_settings(argv: list[str]) -> tuple[dict[str, str], list[str], bool]:
    """Return the settings (option > environment variable > default), config overrides and strict mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for option, name in OPTIONS.items():
        parser.add_argument(option, dest=name, help=f"overrides ${name} (default: {SETTINGS[name]})")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 after a failure (as CSFD_STRICT=1)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=value", help="config overrides, for example predict.prefetch=0")
    # Notebook runners may pass arguments of their own (-f <file>): those are ignored, not errors.
    args, unknown = parser.parse_known_args(argv)
    overrides = [item for item in args.overrides if "=" in item]
    unknown += [item for item in args.overrides if "=" not in item]
    if unknown:
        print(f"csfd kernel: ignoring arguments that are neither options nor KEY=value: {unknown}", file=sys.stderr)
    settings = {name: getattr(args, name) or os.environ.get(name) or default for name, default in SETTINGS.items()}
    strict = args.strict or os.environ.get("CSFD_STRICT", "") == "1"
    return settings, overrides, strict


def setup_logging(working_dir: Path) -> None:
    working_dir.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(working_dir / "kernel.log", mode="w")]
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._csfd_console = True  # csfd.logs.setup_logging then adds no second console handler
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)


def _pip_install(wheels_dir: Path, requirements: list[str]) -> subprocess.CompletedProcess:
    # Only the wheels dataset may be a source: drop pip settings of the machine (index URLs, links).
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels_dir), *requirements]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def _tail(result: subprocess.CompletedProcess) -> str:
    return " | ".join((result.stderr or result.stdout).strip().splitlines()[-4:])


def install_wheels(wheels_dir: Path) -> None:
    """Install the wheels dataset's requirements offline; a failure is logged and skipped.

    One pip call installs them all. If it fails, each package is retried on its own so that
    one incompatible wheel does not block the others. A package that still fails is missing
    at run time: csfd then reads DICOM with the decoders that remain, and studies that none
    can read get the prior.
    """
    requirements_file = wheels_dir / "requirements.txt"
    if not requirements_file.is_file():
        logger.warning("No %s; installing no wheels (expected the wheels dataset at %s)", requirements_file, wheels_dir)
        return
    requirements = requirements_file.read_text().split()
    started = time.monotonic()
    result = _pip_install(wheels_dir, requirements)
    if result.returncode == 0:
        installed = [line for line in result.stdout.splitlines() if line.startswith("Successfully installed")]
        logger.info(
            "pip install --no-index from %s in %.1f s: %s", wheels_dir, time.monotonic() - started,
            installed[0] if installed else "all requirements were already installed",
        )
    else:
        logger.warning("pip failed to install %s together (%s); installing them one by one", requirements, _tail(result))
        for requirement in requirements:
            result = _pip_install(wheels_dir, [requirement])
            if result.returncode != 0:
                logger.warning("pip failed to install %s from %s (exit %d): %s", requirement, wheels_dir,
                               result.returncode, _tail(result))
            else:
                logger.info("Installed %s from %s", requirement, wheels_dir)
    importlib.invalidate_caches()


def import_code(code_dir: Path):
    """Import csfd from the code dataset (first on sys.path) and return the module."""
    if not (code_dir / "csfd" / "__init__.py").is_file():
        raise FileNotFoundError(
            f"{code_dir / 'csfd' / '__init__.py'} not found: attach the code dataset, uploaded with "
            "`kaggle datasets create -p <folder> --dir-mode tar` so that its csfd/ folder is kept"
        )
    sys.path.insert(0, str(code_dir))
    import csfd

    location = Path(csfd.__file__).resolve().parent
    if location != (code_dir / "csfd").resolve():
        logger.warning("csfd was imported from %s, not from the code dataset %s", location, code_dir)
    logger.info("csfd from %s", location)
    return csfd


def predict(settings: dict[str, str], overrides: list[str], output: Path) -> None:
    weights_dir = Path(settings["CSFD_WEIGHTS_DIR"])
    config_path = weights_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: attach the weights dataset built by `python -m csfd kernel`")
    from csfd.config import load_config
    from csfd.predict import run_predict

    config = load_config(
        config_path,
        [
            f"paths.data_dir={settings['CSFD_DATA_DIR']}",
            f"paths.runs_dir={weights_dir / 'runs'}",
            f"paths.submission_csv={output}",
            f"predict.time_budget_s={float(settings['CSFD_TIME_BUDGET_S'])}",
            *overrides,
        ],
    )
    run_predict(config, output, start=START)


def write_prior_submission(test_csv: Path, output: Path) -> int:
    """Write the prevalence prior for every row of test.csv with the standard library; return the rows."""
    with test_csv.open(newline="") as source:
        rows = [(row["row_id"], PRIOR[row["prediction_type"]]) for row in csv.DictReader(source)]
    partial = output.with_name(output.name + ".partial")
    with partial.open("w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["row_id", "fractured"])
        writer.writerows(rows)
    os.replace(partial, output)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    settings, overrides, strict = parse_settings(sys.argv[1:] if argv is None else argv)
    working_dir = Path(settings["CSFD_WORKING_DIR"])
    setup_logging(working_dir)
    logger.info("Settings: %s; overrides: %s", settings, overrides or "none")
    output = working_dir / "submission.csv"

    install_wheels(Path(settings["CSFD_WHEELS_DIR"]))
    try:
        import_code(Path(settings["CSFD_CODE_DIR"]))
        predict(settings, overrides, output)
    # The kernel's only job is a complete submission.csv, so any failure, logged with its
    # traceback, falls back to the prior for every row.
    except Exception:
        logger.exception("Prediction failed; writing the prevalence prior for every row instead")
        rows = write_prior_submission(Path(settings["CSFD_DATA_DIR"]) / "test.csv", output)
        logger.error("Wrote %s with the prior for all %d rows", output, rows)
        if strict:
            return 1
    logger.info("Done after %.0f s: %s", time.monotonic() - START, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
