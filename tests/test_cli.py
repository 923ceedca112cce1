"""The command line (python -m kdbook_utils): list, run, show and record, and its errors.

The runs use preset quick (the embedded digits) with the lessons' settings cut down through ``--set``
(one teacher epoch, a few student epochs, two seeds), so that every lesson's pipeline runs end to end
through the command line in about a minute each on two cores.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdbook_utils import cli
from kdbook_utils.experiments import RESULT_COLUMNS, read_results
from kdbook_utils.lessons import settings_hash
from kdbook_utils.lessons.records import LESSONS
from kdbook_utils.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, list[str]] = {
    "hinton": ["--set", "teacher=resnet8", "--set", "teacher_epochs=5", "--set", "epochs=6", "--set", "student_images=300", "--set", "batch_size=16",
               "--set", "temperatures=4", "--set", "alphas=0.5"],
    "lsl": ["--set", "teacher_epochs=1", "--set", "epochs=8", "--set", "student_images=100", "--set", "alphas=0.3"],
    "crosslayer": ["--set", "teachers=1", "--set", "teacher_epochs=1", "--set", "gram_epochs=1", "--set",
                   "task_epochs=2"],
    "mskd": ["--set", "teacher_epochs=1", "--set", "head_epochs=1", "--set", "epochs=2", "--set", "student_images=200"],
    "lm": ["--set", "teacher=gpt-1x32", "--set", "teacher_documents=300", "--set", "teacher_epochs=1", "--set", "length=12",
           "--set", "student_documents=64", "--set", "warmup_epochs=1", "--set", "epochs=1", "--set", "val_documents=32",
           "--set", "test_documents=32", "--set", "samples=16"],
}  # fmt: skip
"""Each lesson's settings cut down to a smoke-sized run (the lessons' own tests check what they learn)."""

STAGED: dict[str, list[str]] = {"hinton": [], "lsl": ["--stage", "final"], "crosslayer": ["--stage", "final"],
                                "mskd": [], "lm": []}  # fmt: skip
"""hinton and mskd run their whole record(); lsl's final stage brings its sweep along; crosslayer runs its
final stage alone (its ablation grid is the same code, ten times longer)."""


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Path(os.environ.get("KDBOOK_TEST_CLI_CACHE", tmp_path_factory.getbasetemp() / "cli-cache"))
    monkeypatch.setenv("KDBOOK_CACHE", str(cache))


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_list_names_every_lesson_stage_and_preset(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli("list", capsys=capsys)
    assert status == 0
    for lesson, entry in LESSONS.items():
        assert lesson in out and entry.title in out and repr(entry.baseline) in out
        for stage in cli.STAGES[lesson]:
            assert f"stage {stage}" in out
    for preset in PRESETS:
        assert preset in out
    assert set(cli.STAGES) == set(LESSONS)


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["run", "hintn"], ["'hintn'", "Did you mean 'hinton'?"]),
        (["run", "hinton", "--preset", "lap"], ["'lap'", "quick, lab, paper", "Did you mean 'lab'?"]),
        (["run", "hinton", "--stage", "finl"], ["'finl'", "sweep, final", "Did you mean 'final'?"]),
        (["run", "mskd", "--stage", "sweep"], ["'sweep'", "its stages are final"]),
        (["run", "hinton", "--seeds", "1", "1"], ["--seeds 1 1 repeats a seed"]),
        (["run", "hinton", "--data", "/no/such/folder"], ["'/no/such/folder'", "does not exist", "--data"]),
        (["run", "hinton", "--set", "epoch=3"], ["'epoch'", "Did you mean 'epochs'?"]),
        (["run", "hinton", "--set", "epochs=2.5"], ["epochs=2.5", "whole number"]),
        (["run", "hinton", "--set", "student=3"], ["student=3", "e.g. --set student='cnn-3x16'"]),
        (["run", "hinton", "--set", "epochs"], ["FIELD=VALUE", "'epochs'"]),
        (
            ["run", "lm", "--set", "student=gpt-1x33"],
            ["'gpt-1x33'", "gpt-1x32, gpt-2x32", "Did you mean 'gpt-1x32'?"],
        ),
        (["run", "hinton", "--device", "tpu"], ["--device tpu", "'auto', 'cpu', 'cuda'"]),
        (["run", "hinton", "--ray", "--cpus-per-run", "0"], ["--cpus-per-run 0", "e.g. --cpus-per-run 1"]),
        (["show", "/no/such/results"], ["'/no/such/results'", "results/lab/hinton.csv"]),
        (["record", "hinton", "--preset", "paper", "--data", "/no/such/folder"], ["'/no/such/folder'"]),
    ],
)
def test_every_bad_argument_says_what_was_given_and_the_fix(
    argv: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli(*argv, capsys=capsys)
    assert status == 2 and out == ""
    for text in shown:
        assert text in err, f"{text!r} not in {err!r}"


@pytest.mark.parametrize("argv", [["run", "hinton", "--seeds", "0", "x"], ["run", "hinton", "--seeds", "-1"]])
def test_bad_seeds_are_refused_by_the_parser(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert "a seed must be a non-negative integer" in capsys.readouterr().err


def test_missing_data_names_the_root_and_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli("run", "hinton", "--preset", "lab", "--data", str(tmp_path), capsys=capsys)
    assert status == 2
    assert str(tmp_path) in err and "--data <folder>" in err


def test_ray_and_torchrun_do_not_mix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    status, _, err = run_cli("run", "hinton", "--ray", capsys=capsys)
    assert status == 2 and "--ray and torchrun do not mix" in err


def test_stages_bring_the_stages_they_need() -> None:
    assert cli._stages("hinton", ["final"]) == ["sweep", "final"]
    assert cli._stages("crosslayer", ["final"]) == ["final"]
    assert cli._stages("lsl", None) == ["sweep", "final"]


def test_overrides_keep_the_settings_types() -> None:
    settings = LESSONS["hinton"].settings["quick"]
    changed = cli._apply_overrides("hinton", settings, ["temperatures=[2, 8]", "seeds=7"])
    assert changed.temperatures == (2, 8) and changed.seeds == (7,)
    assert cli._apply_overrides("hinton", settings, ["student=cnn-2x16"]).student == "cnn-2x16"
    assert cli._apply_overrides("hinton", settings, ["lr=0.1"]).lr == 0.1


def test_several_values_are_written_with_commas_or_by_repeating_set() -> None:
    settings = LESSONS["hinton"].settings["quick"]
    assert cli._apply_overrides("hinton", settings, ["temperatures=4,8"]).temperatures == (4.0, 8.0)
    repeated = cli._apply_overrides("hinton", settings, ["temperatures=4", "temperatures=8", "epochs=3"])
    assert repeated.temperatures == (4.0, 8.0) and repeated.epochs == 3
    assert cli._apply_overrides("hinton", settings, ["students=cnn-1x8,cnn-3x32"]).students == (
        "cnn-1x8",
        "cnn-3x32",
    )
    assert cli._apply_overrides("hinton", settings, ["student_images=None"]).student_images is None


def test_the_preset_comes_from_kdbook_preset_unless_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KDBOOK_PRESET", "lab")
    status, _, err = run_cli("run", "hinton", "--data", "/no/such/folder", capsys=capsys)
    assert status == 2 and "Preset lab (from $KDBOOK_PRESET)" in err and "holds cifar10" in err
    status, _, err = run_cli("run", "hinton", "--preset", "paper", "--data", "/no/such/folder", capsys=capsys)
    assert (
        status == 2 and "--preset paper is used; $KDBOOK_PRESET=lab is ignored" in err and "cifar100" in err
    )


def test_bad_arguments_are_refused_before_anything_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDBOOK_CACHE", str(cache))
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    started = time.perf_counter()
    for argv in (["--out", str(a_file)], ["--set", "student=cnn-4x32"], ["--set", "temperatures=4", "8"],
                 ["--set", "alphas=2"], ["--set", "seeds=0,0"]):  # fmt: skip
        status, out, err = run_cli("run", "hinton", "--preset", "smoke", *argv, capsys=capsys)
        assert status == 2 and out == "" and "error:" in err, argv
    assert not list(cache.rglob("*.pt")), "no model was trained"
    assert time.perf_counter() - started < 30
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    status, _, _ = run_cli("run", "hinton", "--preset", "lab", "--data", "empty", capsys=capsys)
    assert status == 2 and not (tmp_path / "results").exists(), "a refused run leaves no folder behind"


@pytest.mark.parametrize("lesson", list(LESSONS))
def test_run_writes_the_results_file_and_show_prints_it(
    lesson: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", lesson, "--preset", "quick", "--seeds", "0", "1", "--out", str(tmp_path), *TINY[lesson],
            *STAGED[lesson]]  # fmt: skip
    status, out, _ = run_cli(*argv, capsys=capsys)
    assert status == 0
    runs, provenance = read_results(tmp_path / "quick" / lesson)
    assert set(RESULT_COLUMNS) <= set(runs.columns)
    expected_stages = cli._stages(lesson, STAGED[lesson][1:] or None)
    assert list(dict.fromkeys(runs["stage"])) == expected_stages == provenance["stages"]
    final = runs[runs["stage"] == "final"]
    assert sorted(final["seed"].unique()) == [0, 1]
    assert set(final["split"]) == {"val", "test"}
    assert LESSONS[lesson].baseline in set(final["method"])
    assert runs["accuracy"].between(0, 100).all()
    settings = LESSONS[lesson].settings["quick"]
    assert provenance["settings"]["seeds"] == [0, 1] and provenance["settings_hash"] != settings_hash(
        settings
    )
    assert provenance["command"] == "python -m kdbook_utils " + shlex.join(argv)
    assert provenance["lesson"] == lesson and provenance["preset"] == "quick"
    assert "Stage final (test split" in out and "verdict" in out
    # show prints the same comparison from the file
    status, shown, _ = run_cli("show", str(tmp_path), capsys=capsys)
    assert status == 0
    assert shown.split("Stage final")[1] == out.split("Stage final")[1]


def test_python_dash_m_runs_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "kdbook_utils", "list"], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0 and "crosslayer" in done.stdout
    done = subprocess.run([sys.executable, "-m", "kdbook_utils", "run", "nope"], cwd=ROOT, capture_output=True, check=False,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 2 and "Unknown lesson 'nope'" in done.stderr
