"""Build the Kaggle submission folders of a trained run: three datasets and the kernel.

Under kernel.output_dir (default output/kaggle), each folder named by its slug:
    <code_dataset>/      the csfd package as source, dataset-metadata.json
    <weights_dataset>/   fold models, stacker, config.yaml, manifest.json, MODEL_CARD.md, dataset-metadata.json
    <wheels_dataset>/    binary wheels, requirements.txt, dataset-metadata.json
    <kernel_slug>/       csfd_inference.py (the kernel script), kernel-metadata.json
Each folder is ready for `kaggle datasets create -p <folder> --dir-mode tar` or
`kaggle kernels push -p <folder>` (docs/KAGGLE.md). Nothing here contacts Kaggle.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import csfd
from csfd.config import ExperimentConfig, save_config
from csfd.constants import PREVALENCE
from csfd.inference import find_fold_dirs
from csfd.kernel.model_card import model_card
from csfd.kernel.wheels import build_wheels_folder

logger = logging.getLogger(__name__)

USERNAME_PLACEHOLDER = "your-kaggle-username"
KERNEL_SCRIPT = "csfd_inference.py"
KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"
FOLD_FILES = ("config.yaml", "vertebra.pt", "fracture.pt", "metrics.json")
# Besides the boosters (fold<k>/<target>.txt), what predict_stacker and the model card read.
STACK_FILES = ("stacker.json", "summary.json", "cv.csv")
SLUG_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{1,48}[a-z0-9]")
SETTINGS_BLOCK = re.compile(r"(# BEGIN SETTINGS[^\n]*\n)(.*?)(# END SETTINGS)", re.DOTALL)


@dataclass(frozen=True)
class KernelBuild:
    """Folders written by build_kernel and the Kaggle ids they will have."""

    code_dir: Path
    weights_dir: Path
    wheels_dir: Path
    kernel_dir: Path
    username: str
    folds: tuple[int, ...]

    def dataset_id(self, folder: Path) -> str:
        return f"{self.username}/{folder.name}"


def resolve_username(config: ExperimentConfig, username: str | None = None) -> str:
    """Return the Kaggle username: the argument, kernel.username, $KAGGLE_USERNAME, else a placeholder."""
    name = username or config.kernel.username or os.environ.get("KAGGLE_USERNAME", "")
    if not name:
        logger.warning(
            "No Kaggle username (kernel.username, --username or $KAGGLE_USERNAME); the metadata says %r, "
            "replace it before uploading", USERNAME_PLACEHOLDER,
        )
        return USERNAME_PLACEHOLDER
    if "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid Kaggle username {name!r}: expected a user slug without '/' or spaces")
    return name


def default_script_path() -> Path:
    """Return kernels/csfd_inference.py of the repository that holds this csfd package."""
    return Path(csfd.__file__).resolve().parents[2] / "kernels" / KERNEL_SCRIPT


def _check_slug(value: str, key: str) -> None:
    if not SLUG_PATTERN.fullmatch(value):
        raise ValueError(
            f"kernel.{key}: {value!r} is not a valid Kaggle slug; use 3 to 50 lowercase letters, digits and hyphens"
        )


def _title(slug: str) -> str:
    # Kaggle derives a kernel's slug from its title: lowercased, spaces to hyphens.
    return slug.replace("-", " ")


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _dataset_metadata(folder: Path, username: str, license_name: str, slug: str | None = None) -> None:
    slug = slug or folder.name
    _write_json(
        folder / "dataset-metadata.json",
        {"title": _title(slug), "id": f"{username}/{slug}", "licenses": [{"name": license_name}]},
    )


def _fresh_folder(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit(repo: Path) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("Could not read the git commit of %s (%s); the manifest says unknown", repo, error)
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def build_code_dataset(folder: Path, username: str, license_name: str) -> list[Path]:
    """Copy the csfd package's Python sources into `folder`/csfd; return the copied files."""
    package = Path(csfd.__file__).resolve().parent
    _fresh_folder(folder)
    copied = []
    for source in sorted(package.rglob("*.py")):
        if "__pycache__" in source.parts:
            continue
        target = folder / "csfd" / source.relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied.append(target)
    _dataset_metadata(folder, username, license_name)
    return copied


def build_weights_dataset(config: ExperimentConfig, folder: Path, username: str, provenance: dict) -> tuple[int, ...]:
    """Copy the run's fold models and stacker into `folder` with the config, manifest and model card."""
    run_root = config.run_dir()
    fold_dirs = find_fold_dirs(run_root, config.predict.folds)
    if not fold_dirs:
        raise FileNotFoundError(f"no trained fold under {run_root}; train the run (make train FOLD=k) first")
    _fresh_folder(folder)
    target_run = folder / "runs" / config.name
    for fold, fold_dir in fold_dirs:
        for name in FOLD_FILES:
            source = fold_dir / name
            if source.is_file():
                (target_run / fold_dir.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target_run / fold_dir.name / name)
            elif name != "metrics.json":
                raise FileNotFoundError(f"{source} not found; fold {fold} of {run_root} is incomplete, retrain it")
    stack_dir = run_root / "stack"
    if (stack_dir / "summary.json").is_file():
        wanted = [stack_dir / name for name in STACK_FILES] + sorted(stack_dir.glob("fold*/*.txt"))
        for source in (path for path in wanted if path.is_file()):
            target = target_run / "stack" / source.relative_to(stack_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    else:
        logger.warning("No stacker in %s; the kernel will use the plain aggregation", stack_dir)
    save_config(config, folder / "config.yaml")

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {
        **provenance,
        "experiment": config.name,
        "folds": [fold for fold, _ in fold_dirs],
        "config_hash": config.hash(),
        "files": {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    _write_json(folder / "manifest.json", manifest)
    folds = [fold for fold, _ in fold_dirs]
    (folder / "MODEL_CARD.md").write_text(model_card(config, folds, target_run / "stack", provenance))
    _dataset_metadata(folder, username, config.kernel.license)
    return tuple(folds)


def render_kernel_script(template: str, settings: dict[str, str]) -> str:
    """Return the kernel script with its settings block replaced by `settings` and the prior."""
    match = SETTINGS_BLOCK.search(template)
    if match is None:
        raise ValueError("the kernel script has no '# BEGIN SETTINGS' ... '# END SETTINGS' block to fill in")
    body = "SETTINGS = " + json.dumps(settings, indent=4) + "\n"
    body += "# The prevalence prior per prediction_type (csfd.constants.PREVALENCE), for the last-resort\n"
    body += "# submission when csfd itself cannot be imported.\n"
    body += "PRIOR = " + json.dumps(PREVALENCE, indent=4) + "\n"
    return template[: match.start(2)] + body + template[match.end(2) :]


def build_kernel_folder(config: ExperimentConfig, folder: Path, username: str, datasets: list[str], script: Path) -> Path:
    """Write the rendered kernel script and kernel-metadata.json into `folder`; return the script."""
    if not script.is_file():
        raise FileNotFoundError(f"kernel script not found: {script}; pass --script with the path of {KERNEL_SCRIPT}")
    kernel = config.kernel
    code, weights, wheels = datasets
    settings = {
        "CSFD_DATA_DIR": f"{KAGGLE_INPUT}/{kernel.competition}",
        "CSFD_CODE_DIR": f"{KAGGLE_INPUT}/{code}",
        "CSFD_WEIGHTS_DIR": f"{KAGGLE_INPUT}/{weights}",
        "CSFD_WHEELS_DIR": f"{KAGGLE_INPUT}/{wheels}",
        "CSFD_WORKING_DIR": KAGGLE_WORKING,
        "CSFD_TIME_BUDGET_S": f"{kernel.time_budget_s:g}",
    }
    _fresh_folder(folder)
    target = folder / KERNEL_SCRIPT
    target.write_text(render_kernel_script(script.read_text(), settings))
    _write_json(
        folder / "kernel-metadata.json",
        {
            "id": f"{username}/{kernel.kernel_slug}",
            "title": _title(kernel.kernel_slug),
            "code_file": KERNEL_SCRIPT,
            "language": "python",
            "kernel_type": "script",
            "is_private": True,
            "enable_gpu": True,
            "enable_tpu": False,
            "enable_internet": False,
            "dataset_sources": [f"{username}/{name}" for name in datasets],
            "competition_sources": [kernel.competition],
            "kernel_sources": [],
            "model_sources": [],
        },
    )
    return target


def build_kernel(
    config: ExperimentConfig,
    username: str | None = None,
    wheels_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    script: str | Path | None = None,
) -> KernelBuild:
    """Write the code, weights and wheels datasets and the kernel folder of the run `config` names.

    wheels_dir (else kernel.wheels_dir) is a local folder of wheels to copy; when both are
    empty, pip downloads the wheels (needs the network to the package index).
    """
    kernel = config.kernel
    for key in ("code_dataset", "weights_dataset", "wheels_dataset", "kernel_slug"):
        _check_slug(getattr(kernel, key), key)
    user = resolve_username(config, username)
    root = Path(output_dir or kernel.output_dir)
    source = Path(wheels_dir) if wheels_dir else (Path(kernel.wheels_dir) if kernel.wheels_dir else None)
    repo = Path(csfd.__file__).resolve().parents[2]
    provenance = {
        "csfd_version": getattr(csfd, "__version__", "unknown"),
        "git_commit": _git_commit(repo),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    # Wheels first: the step most likely to fail (network), before anything else is replaced.
    wheels_folder = root / kernel.wheels_dataset
    staging = _fresh_folder(root / f".{kernel.wheels_dataset}.partial")
    build_wheels_folder(kernel.wheel_packages, staging, kernel.python_version, kernel.platform, source)
    _dataset_metadata(staging, user, kernel.license, slug=kernel.wheels_dataset)
    if wheels_folder.exists():
        shutil.rmtree(wheels_folder)
    staging.rename(wheels_folder)

    code_folder = root / kernel.code_dataset
    build_code_dataset(code_folder, user, kernel.license)
    weights_folder = root / kernel.weights_dataset
    folds = build_weights_dataset(config, weights_folder, user, provenance)
    kernel_folder = root / kernel.kernel_slug
    build_kernel_folder(
        config,
        kernel_folder,
        user,
        [kernel.code_dataset, kernel.weights_dataset, kernel.wheels_dataset],
        Path(script) if script else default_script_path(),
    )
    build = KernelBuild(code_folder, weights_folder, wheels_folder, kernel_folder, user, folds)
    logger.info(
        "Kaggle folders written under %s (folds %s). Upload with:\n"
        "  kaggle datasets create -p %s --dir-mode tar\n"
        "  kaggle datasets create -p %s --dir-mode tar\n"
        "  kaggle datasets create -p %s\n"
        "  kaggle kernels push -p %s\n"
        "(`kaggle datasets version -p <folder> --dir-mode tar -m <notes>` for later versions; see docs/KAGGLE.md)",
        root, list(folds), code_folder, weights_folder, wheels_folder, kernel_folder,
    )
    return build
