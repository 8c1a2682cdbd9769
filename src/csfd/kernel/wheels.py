"""The wheels dataset: binary wheels of the packages the Kaggle image lacks.

The kernel runs without internet, so it installs these with
`pip install --no-index --find-links <wheels dataset>`. They are fetched with `pip download
--only-binary=:all: --no-deps` for the image's Python version and platform, or copied from a
local folder of wheels (for offline builds and tests).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

logger = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements.txt"
# Legacy manylinux names and the glibc minor version each stands for (PEP 600).
LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


class WheelError(RuntimeError):
    """Wheels that could not be downloaded or found for the kernel's Python and platform."""


def compatible_platforms(platform: str) -> list[str]:
    """Return the platform tags a machine with `platform` accepts, newest first.

    A manylinux_2_N_<arch> machine (glibc 2.N) also runs wheels built for every older glibc,
    so that tag expands to manylinux_2_N .. manylinux_2_5 plus the legacy names. pip download
    does not expand a --platform itself. Any other tag is returned unchanged.
    """
    legacy = re.fullmatch(r"(manylinux2014|manylinux2010|manylinux1)_(\w+)", platform)
    if legacy:
        platform = f"manylinux_2_{LEGACY_MANYLINUX[legacy.group(1)]}_{legacy.group(2)}"
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    glibc_minor, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 4, -1)]
    tags += [f"{name}_{arch}" for name, minor in LEGACY_MANYLINUX.items() if minor <= glibc_minor]
    return tags


def python_tag(python_version: str) -> str:
    """Return the CPython tag of a version such as "3.11": "cp311"."""
    match = re.fullmatch(r"3\.(\d+)", python_version.strip())
    if not match:
        raise ValueError(f"kernel.python_version: expected a version such as 3.11, got {python_version!r}")
    return f"cp3{match.group(1)}"


def pinned_requirements(packages: tuple[str, ...] | list[str]) -> list[str]:
    """Pin each package to the version installed here; an uninstalled one stays unpinned, with a warning."""
    requirements = []
    for name in packages:
        try:
            requirements.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            logger.warning("Package %s is not installed here, so its wheel is not pinned to a tested version", name)
            requirements.append(name)
    return requirements


def _split_requirement(requirement: str) -> tuple[str, str | None]:
    name, _, version = requirement.partition("==")
    return canonicalize_name(name.strip()), (version.strip() or None)


def wheel_is_compatible(filename: str, python_version: str, platform: str) -> bool:
    """Return whether a wheel file installs on CPython `python_version` on `platform`."""
    cpython = python_tag(python_version)
    minor = int(cpython[3:])
    interpreters = {cpython, "py3", *(f"py3{m}" for m in range(minor + 1))}
    platforms = set(compatible_platforms(platform)) | {"any"}
    for tag in parse_wheel_filename(filename)[3]:
        if tag.platform not in platforms:
            continue
        if tag.abi in (cpython, "none") and tag.interpreter in interpreters:
            return True
        # An abi3 wheel built for an older CPython 3 runs on newer ones.
        if tag.abi == "abi3" and tag.interpreter.startswith("cp3") and int(tag.interpreter[3:]) <= minor:
            return True
    return False


def pip_download_command(requirements: list[str], dest: Path, python_version: str, platform: str) -> list[str]:
    """Return the pip download command for binary wheels of `requirements` for the kernel's image."""
    command = [
        sys.executable, "-m", "pip", "download",
        "--only-binary=:all:", "--no-deps",
        "--python-version", python_version,
        "--implementation", "cp",
        "--abi", python_tag(python_version),
        "--abi", "abi3",
        "--abi", "none",
    ]
    for tag in compatible_platforms(platform):
        command += ["--platform", tag]
    command += ["--dest", str(dest), *requirements]
    return command


def download_wheels(requirements: list[str], dest: Path, python_version: str, platform: str) -> list[Path]:
    """Download the wheels with pip (needs the network to the package index); return their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    command = pip_download_command(requirements, dest, python_version, platform)
    logger.info("Downloading wheels: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise WheelError(
            f"pip download failed (exit {result.returncode}) for {', '.join(requirements)} "
            f"(Python {python_version}, {platform}):\n{tail}\n"
            "Without network access to the package index, pass a folder of wheels with --wheels-dir "
            "(or kernel.wheels_dir)."
        )
    return select_wheels(requirements, dest, python_version, platform)


def select_wheels(requirements: list[str], folder: Path, python_version: str, platform: str) -> list[Path]:
    """Return one compatible wheel in `folder` for each requirement, or raise WheelError naming the missing ones."""
    if not folder.is_dir():
        raise WheelError(f"wheel folder not found: {folder}")
    candidates = sorted(folder.glob("*.whl"))
    chosen, missing = [], []
    for requirement in requirements:
        name, version = _split_requirement(requirement)
        matches = []
        for path in candidates:
            wheel_name, wheel_version, _, _ = parse_wheel_filename(path.name)
            if wheel_name != name or (version is not None and str(wheel_version) != version):
                continue
            if wheel_is_compatible(path.name, python_version, platform):
                matches.append(path)
        if matches:
            chosen.append(matches[-1])
        else:
            missing.append(requirement)
    if missing:
        found = ", ".join(p.name for p in candidates) or "no wheels"
        raise WheelError(
            f"{folder}: no wheel for {', '.join(missing)} that installs on CPython {python_version} on {platform} "
            f"(found: {found}). Download them with `pip download --only-binary=:all: --no-deps "
            f"--python-version {python_version} --platform {platform} ...` or build without --wheels-dir."
        )
    return chosen


def build_wheels_folder(
    packages: tuple[str, ...] | list[str],
    dest: Path,
    python_version: str,
    platform: str,
    source_dir: Path | None = None,
) -> list[str]:
    """Fill `dest` with one wheel per package and a requirements.txt pinning them; return its lines.

    With `source_dir` the wheels are copied from that folder, else pip downloads them.
    """
    requirements = pinned_requirements(packages)
    dest.mkdir(parents=True, exist_ok=True)
    if source_dir is None:
        staging = dest / ".download"
        wheels = download_wheels(requirements, staging, python_version, platform)
    else:
        wheels = select_wheels(requirements, Path(source_dir), python_version, platform)
    lines = []
    for wheel in wheels:
        shutil.copy2(wheel, dest / wheel.name)
        name, version, _, _ = parse_wheel_filename(wheel.name)
        lines.append(f"{name}=={version}")
    if source_dir is None:
        shutil.rmtree(dest / ".download")
    (dest / REQUIREMENTS_FILE).write_text("\n".join(lines) + "\n")
    logger.info("Wheels for CPython %s on %s: %s", python_version, platform, ", ".join(w.name for w in wheels))
    return lines

