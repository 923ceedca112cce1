"""Shared data fixtures.

``cifar10_root``: the real CIFAR-10 JPEG copy, extracted once from the project's zips into a cache
folder (never into the repository) and reused by later sessions. The zips are looked for in
``$KDBOOK_CIFAR10_JPEG``, else ``<repo>/../shared/data/cifar10-jpeg`` (CI clones the repository with
``shared/`` beside it); tests that need them are skipped with the reason when they are missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR10_ZIPS = ("train.zip", "test.zip")


def cifar10_zip_folder() -> Path:
    configured = os.environ.get("KDBOOK_CIFAR10_JPEG")
    return Path(configured).expanduser() if configured else REPO.parent / "shared" / "data" / "cifar10-jpeg"


def _extraction_folder() -> Path:
    cache = os.environ.get("KDBOOK_CACHE")
    base = (
        Path(cache).expanduser() / "test-data" if cache else Path(tempfile.gettempdir()) / "kdbook-test-data"
    )
    return base / "cifar10-jpeg"


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """A folder holding ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` of the real CIFAR-10."""
    source = cifar10_zip_folder()
    archives = [source / name for name in CIFAR10_ZIPS]
    missing = [str(path) for path in archives if not path.is_file()]
    if missing:
        pytest.skip(
            f"the real CIFAR-10 zips are not here ({', '.join(missing)} missing); set KDBOOK_CIFAR10_JPEG "
            "to the folder holding train.zip and test.zip to run this test"
        )
    target = _extraction_folder()
    stamp = ";".join(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in archives)
    stamp_file = target / ".extracted-from"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return target

    # Extract next to the target, then rename, so an interrupted run never leaves a half-extracted copy.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".cifar10-jpeg-"))
    try:
        for archive in archives:
            with zipfile.ZipFile(archive) as opened:
                opened.extractall(staging)
        (staging / stamp_file.name).write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
