"""Test helpers for the Kaggle kernel: a wheel folder and an environment without the wheels' packages.

The kernel installs its wheels offline into an image that lacks them. To rehearse that here,
`kaggle_like_venv` makes a fresh virtual environment whose only other packages are the
project venv's, seen through a folder of symbolic links that leaves out the wheels'
distributions and csfd itself.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def repack_installed_wheel(name: str, dest: Path) -> Path:
    """Write a wheel of the installed distribution `name` from its RECORD files; return its path.

    The wheel keeps the tags of the installed one (its WHEEL file), so it installs where the
    original did. Scripts outside site-packages and byte code are left out.
    """
    dist = metadata.distribution(name)
    site = Path(dist.locate_file(""))
    wheel_text = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise ValueError(f"{name}: its WHEEL file lists no Tag, so the wheel's file name is unknown")
    parts = [t.split("-") for t in tags]
    compressed = "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))
    distribution = str(canonicalize_name(dist.metadata["Name"])).replace("-", "_")
    path = dest / f"{distribution}-{dist.version}-{compressed}.whl"
    dist_info = f"{distribution}-{dist.version}.dist-info"
    record_rows = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in dist.files or []:
            relative = Path(str(file))
            if ".." in relative.parts or "__pycache__" in relative.parts:
                continue
            if relative.parent.name.endswith(".dist-info"):
                if relative.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                    continue
                arcname = f"{dist_info}/{relative.name}"
            else:
                arcname = relative.as_posix()
            data = (site / relative).read_bytes()
            archive.writestr(arcname, data)
            record_rows.append((arcname, _record_hash(data), str(len(data))))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows(record_rows)
        writer.writerow((f"{dist_info}/RECORD", "", ""))
        archive.writestr(f"{dist_info}/RECORD", buffer.getvalue())
    return path


def owned_top_level(names: list[str]) -> set[str]:
    """Return the top-level site-packages entries (packages, modules, dist-info) of distributions."""
    owned = set()
    for name in names:
        for file in metadata.distribution(name).files or []:
            parts = Path(str(file)).parts
            if parts and parts[0] != "..":
                owned.add(parts[0])
    return owned


def kaggle_like_venv(root: Path, without: list[str]) -> Path:
    """Create a venv at root/venv that imports the project venv's packages except `without` and csfd.

    Returns the venv's python. Its own site-packages comes first on sys.path, so what pip
    installs there is what the kernel imports.
    """
    project_site = Path(metadata.distribution("torch").locate_file(""))
    hidden = owned_top_level([*without, "csfd"])
    view = root / "site-view"
    view.mkdir(parents=True)
    for entry in project_site.iterdir():
        if entry.name in hidden or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
            continue
        (view / entry.name).symlink_to(entry)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    (Path(site) / "project_view.pth").write_text(str(view) + "\n")
    return python


def site_packages_of(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    return Path(out)


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"
