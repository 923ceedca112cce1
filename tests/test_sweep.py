"""Many runs at once on Ray, interrupted and resumed (skipped where Ray is not installed).

The grid: lesson 1's sweep stage on preset quick with a cut-down setting, two jobs (the student alone,
and KD at T = 4, alpha = 0.5) over two seeds: 4 runs, on a local Ray instance with 2 CPUs (one per run).

1. ``python -m kdbook_utils run ... --ray`` starts in a subprocess; as soon as the first run's rows
   appear in the run folder the whole process group is killed (SIGKILL: no clean-up).
2. The same command again resumes: the runs already in the run folder are read back (their files are
   left untouched), only the others are trained.
3. The resumed table equals the one of an uninterrupted run without Ray, in this process, one run after
   the other (``LessonRunner.table``'s plain loop), with one thread as each Ray task has: every accuracy
   identical, the wall times aside.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdbook_utils.cli import STAGES
from kdbook_utils.data import preset_data
from kdbook_utils.experiments import read_results, write_results
from kdbook_utils.lessons.records import LESSONS
from kdbook_utils.lessons.sweep import RunFolder, ray_available
from kdbook_utils.presets import get_preset

pytestmark = pytest.mark.skipif(
    not ray_available(), reason='Ray is not installed (pip install "kdbook-utils[scale]")'
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"teacher": "resnet8", "teacher_epochs": 5, "epochs": 6, "student_images": 300, "batch_size": 16, "temperatures": (4.0,),
            "alphas": (0.5,), "sweep_seeds": (0, 1)}  # fmt: skip
TIME_LIMIT = 900


def command(out: Path) -> list[str]:
    overrides = [part for name, value in SETTINGS.items() for part in ("--set", f"{name}={value!r}")]
    return [sys.executable, "-m", "kdbook_utils", "run", "hinton", "--preset", "quick", "--stage", "sweep",
            "--out", str(out), "--ray", "--ray-cpus", "2", "--cpus-per-run", "1", *overrides]  # fmt: skip


def session_processes(session: int) -> list[int]:
    """The processes still alive in a session (Ray's own servers included), by their ids."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":  # field 6 of stat: the session id
                alive.append(int(entry.name))
    return alive


def kill_session(session: int) -> None:
    for pid in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_an_interrupted_sweep_resumes_without_redoing_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "KDBOOK_CACHE": str(cache), "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    runs = RunFolder(tmp_path / "out" / ".runs" / "quick" / "hinton")

    # 1. start, and kill everything as soon as the first run is in
    first = subprocess.Popen(command(tmp_path / "out"), cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + TIME_LIMIT
        while not runs.finished() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        kill_session(first.pid)
        output = first.communicate(timeout=60)[0]
    before = {key: runs.path(key).read_bytes() for key in runs.finished()}
    assert 1 <= len(before) < 4, (
        f"expected an interrupted sweep; found {len(before)} runs done:\n{output[-3000:]}"
    )
    assert not (tmp_path / "out" / "quick" / "hinton.csv").exists()

    # 2. resume: the finished runs are read back, the others trained
    second = subprocess.Popen(command(tmp_path / "out"), cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output = second.communicate(timeout=TIME_LIMIT)[0]
    finally:
        kill_session(second.pid)  # nothing should be left, but a Ray server must never outlive the test
    assert second.returncode == 0, output[-5000:]
    assert f"Ray: {4 - len(before)} run(s) trained, {len(before)} read back" in output
    assert len(runs.finished()) == 4
    assert {key: runs.path(key).read_bytes() for key in before} == before
    resumed, provenance = read_results(tmp_path / "out" / "quick" / "hinton")
    assert provenance["executor"].startswith("Ray")

    # 3. the same grid without Ray, one run after the other, in this process with one thread
    monkeypatch.setenv("KDBOOK_CACHE", str(cache))  # the teacher the Ray run trained and cached
    preset = get_preset("quick")
    settings = dataclasses.replace(LESSONS["hinton"].settings["quick"], **SETTINGS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = LESSONS["hinton"].runner.prepare(preset, preset_data(preset), device="cpu", progress=False,
                                                  settings=settings)  # fmt: skip
        plain = STAGES["hinton"]["sweep"].run(runner).assign(stage="sweep")
    finally:
        torch.set_num_threads(threads)
    write_results(
        plain, tmp_path / "plain", {"lesson": "hinton"}
    )  # the same file round trip as the Ray run's
    plain = read_results(tmp_path / "plain")[0]
    columns = [column for column in plain.columns if column != "seconds"]
    assert len(plain) == 8  # 4 runs x (val, test)
    pd.testing.assert_frame_equal(resumed[columns].reset_index(drop=True), plain[columns].reset_index(drop=True),
                                  check_dtype=False)  # fmt: skip
