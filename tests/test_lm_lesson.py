"""Lesson 5's runner, comparisons, figures and exercises (kdbook_utils.lessons.lm, exercises.lm), on the smoke
preset: every measurement of a run, the verdict words turned round where lower is better, the one-mode fits
of the mode-covering figure, and the optional Hugging Face path on a tiny model built offline."""

from __future__ import annotations

import math
import socket

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from kdbook_utils.exercises.lm import check_reading, check_reverse_kl
from kdbook_utils.lessons.lm import (
    ALONE,
    FORWARD,
    METHODS,
    METRICS,
    REVERSE,
    SETTINGS,
    LMLesson,
    compare_metric,
    comparison_text,
    cpu_threads,
    fit_one_mode,
    hf_divergences,
    kl_from_truth,
    next_token_table,
    plot_measurements,
    plot_mode_covering,
    plot_next_token,
    samples_table,
    summary_table,
    two_modes,
    verdict_sentence,
    verdict_table,
)
from kdbook_utils.methods.lm import forward_kl, reverse_kl
from kdbook_utils.presets import get_preset


@pytest.fixture(scope="module")
def lesson(tmp_path_factory: pytest.TempPathFactory) -> LMLesson:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDBOOK_CACHE", str(tmp_path_factory.mktemp("lm-cache")))
        return LMLesson.prepare(get_preset("smoke"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def runs(lesson: LMLesson) -> pd.DataFrame:
    return lesson.headline()


def test_every_student_is_measured_on_both_splits(lesson: LMLesson, runs: pd.DataFrame) -> None:
    settings = SETTINGS["smoke"]
    assert set(runs["method"]) == set(METHODS) and set(runs["split"]) == {"val", "test"}
    assert sorted(runs["seed"].unique()) == list(settings.seeds)
    assert len(runs) == len(METHODS) * len(settings.seeds) * 2
    for column in (*METRICS, "accuracy", "own_entropy", "distinct"):
        assert runs[column].notna().all(), column
    assert runs["accuracy"].between(0, 100).all() and runs["grammatical"].between(0, 100).all()
    assert (runs["perplexity"] > 1).all() and (runs["kl_true"] > 0).all()


def test_the_lesson_trains_with_one_thread_and_gives_the_others_back(lesson: LMLesson) -> None:
    before = torch.get_num_threads()
    lesson.job({"method": "reverse"}, 1)
    assert torch.get_num_threads() == before
    with cpu_threads("cpu", 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_every_student_starts_from_its_seed_s_warm_start(lesson: LMLesson) -> None:
    first, again = lesson.warm_student(0), lesson.warm_student(0)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    other = lesson.warm_student(1)
    assert not torch.equal(first.head.weight, other.head.weight)
    assert first.head.weight.requires_grad, "a copy that trains"


def test_the_measurements_are_those_of_the_trained_network(lesson: LMLesson) -> None:
    run = lesson.job({"method": "forward"}, 0)
    documents = lesson.splits.test
    with torch.no_grad():
        inputs = torch.cat([torch.full((len(documents), 1), lesson.language.bos_id), documents[:, :-1]], 1)
        logits, teacher_logits = run.model(inputs), lesson.teacher.model(inputs)
    scores = run.scores["test"]
    cross_entropy = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), documents.reshape(-1)
    )
    assert scores["perplexity"] == pytest.approx(math.exp(float(cross_entropy)), rel=1e-5)
    assert scores["kl_teacher"] == pytest.approx(float(forward_kl(logits, teacher_logits)), rel=1e-4)
    assert scores["kl_true"] == pytest.approx(
        float(kl_from_truth(lesson.truth["test"], logits).mean()), rel=1e-5
    )
    written = run.samples["test"]
    assert scores["grammatical"] == pytest.approx(
        100 * float(lesson.language.is_grammatical(written).double().mean())
    )
    with torch.no_grad():
        own = torch.cat([torch.full((len(written), 1), lesson.language.bos_id), written[:, :-1]], 1)
        expected = reverse_kl(run.model(own), lesson.teacher.model(own))
    assert scores["own_reverse_kl"] == pytest.approx(float(expected), rel=1e-4)


def test_the_truth_s_kl_leaves_out_impossible_tokens() -> None:
    truth = torch.tensor([[[0.5, 0.5, 0.0]]], dtype=torch.float64)
    logits = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    assert float(kl_from_truth(truth, logits)) == pytest.approx(math.log(2), rel=1e-6)


def fake_runs(values: dict[str, list[float]], metric: str) -> pd.DataFrame:
    rows = [
        {"method": method, "seed": seed, "split": "test", "output": "final", "failed": "", metric: value}
        for method, series in values.items()
        for seed, value in enumerate(series)
    ]
    return pd.DataFrame(rows)


def test_the_verdict_is_turned_round_where_lower_is_better() -> None:
    runs = fake_runs(
        {
            ALONE: [2.0, 2.1, 2.2, 2.0],
            FORWARD: [1.5, 1.6, 1.6, 1.4],
            REVERSE: [2.5, 2.7, 2.6, 2.6],
            "same": [2.0, 2.3, 2.0, 2.1],
        },
        "perplexity",
    )
    table = compare_metric(runs, "perplexity")
    assert table.loc[FORWARD, "verdict"] == "better" and table.loc[REVERSE, "verdict"] == "worse"
    assert table.loc["same", "verdict"] == "inconclusive"
    higher = compare_metric(
        fake_runs({ALONE: [50, 52, 51], FORWARD: [60, 61, 63]}, "grammatical"), "grammatical"
    )
    assert higher.loc[FORWARD, "verdict"] == "better"
    sentence = verdict_sentence(runs, FORWARD, "perplexity")
    assert "**better**" in sentence and "[" in sentence and "4 seeds" in sentence


def test_the_lesson_s_text_and_tables(lesson: LMLesson, runs: pd.DataFrame) -> None:
    table = verdict_table(runs)
    assert set(table["verdict"]) <= {"better", "worse", "inconclusive"}
    assert len(table) == len(METRICS) * (len(METHODS) - 1)
    summary = summary_table(runs, lesson.teacher_scores())
    assert list(summary.index) == ["teacher", *METHODS]
    assert "grammatical samples (%)" in summary.columns
    samples = samples_table(lesson, lesson.language, list(METHODS), seed=0, count=2)
    assert samples.shape == (len(METHODS), 2)
    assert all(cell[0] in "✓✗" for cell in samples.to_numpy().ravel())
    text = comparison_text(runs.assign(stage="final"))
    assert "perplexity" in text and "verdict" in text


def test_the_figures_draw(lesson: LMLesson, runs: pd.DataFrame) -> None:
    assert isinstance(plot_next_token({"teacher": lesson.teacher.model}, lesson.language, "the", 2.0), Figure)
    assert isinstance(plot_measurements(runs, ["perplexity", "kl_teacher"], list(METHODS)), Figure)
    table = next_token_table(lesson.teacher.model, lesson.language, "the cow")
    assert table["truth"].sum() <= 1 + 1e-9 and len(table) == 12


def test_forward_kl_covers_both_modes_and_reverse_kl_seeks_the_nearest() -> None:
    grid = torch.linspace(-5, 5, 201, dtype=torch.float64)
    target = two_modes(grid)
    _, mean, spread = fit_one_mode(target, grid, "forward", start=(1.0, -0.5))
    assert abs(mean - float((grid * target).sum())) < 0.1 and spread > 1.5, "forward: the mean of both modes"
    for start, mode in ((1.0, 2.0), (-1.0, -2.0)):
        _, mean, spread = fit_one_mode(target, grid, "reverse", start=(start, -0.5))
        assert abs(mean - mode) < 0.2 and spread < 0.8, f"reverse from {start}: the mode at {mode}"
    assert isinstance(plot_mode_covering(("forward", "reverse")), Figure)


# -------------------------------------------------------------------------------------------- exercises


def reference(student, teacher, mask):
    return reverse_kl(student, teacher, mask=mask)


def test_the_reverse_kl_check_accepts_the_answer_and_names_mistakes_without_the_answer() -> None:
    assert check_reverse_kl(reference).passed
    swapped = check_reverse_kl(lambda s, t, m: forward_kl(s, t, mask=m))
    assert not swapped.passed and "wrong way round" in swapped.feedback
    unmasked = check_reverse_kl(lambda s, t, m: reverse_kl(s, t))
    assert not unmasked.passed and "Padding" in unmasked.feedback
    detached = check_reverse_kl(lambda s, t, m: reverse_kl(s.detach(), t, mask=m))
    assert not detached.passed and "gradient" in detached.feedback

    def stub(s, t, m):
        raise NotImplementedError

    assert check_reverse_kl(stub).status == "not done"
    for result in (swapped, unmasked):
        assert "log_softmax" not in result.feedback and "sum(" not in result.feedback


def test_the_reading_check_follows_the_run(runs: pd.DataFrame) -> None:
    means = runs[runs["split"] == "test"].groupby("method")[["kl_teacher", "own_entropy"]].mean()
    best, lowest = means["kl_teacher"].idxmin(), means["own_entropy"].idxmin()
    assert check_reading(runs, best, lowest).passed
    other = next(name for name in METHODS if name != best)
    wrong = check_reading(runs, other, lowest)
    assert not wrong.passed and best not in wrong.feedback.split(":")[0]
    assert "not one of the students" in check_reading(runs, "nobody", lowest).feedback
    assert check_reading(runs, None, None).status == "not done"


# ------------------------------------------------------------------------------ the optional HF part


def test_the_divergences_of_a_hugging_face_pair_built_offline() -> None:
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (the test extra has it)"
    )
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    student, teacher = transformers.GPT2LMHeadModel(config), transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (1, 10))
    table = hf_divergences(student, teacher, ids).set_index("divergence")["mean per token (nats)"]
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    assert table["forward KL"] == pytest.approx(float(forward_kl(s, t)), rel=1e-5)
    assert table["reverse KL"] == pytest.approx(float(reverse_kl(s, t)), rel=1e-5)
    assert float(hf_divergences(teacher, teacher, ids)["mean per token (nats)"].abs().max()) < 1e-6
    with pytest.raises(ValueError, match="tokenizer"):
        hf_divergences(student, teacher, "a text without a tokenizer")


def test_the_hugging_face_pair_by_name_needs_the_internet() -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as error:
        pytest.skip(f"no internet here (the models would be downloaded): {error}")
    try:
        table = hf_divergences("distilgpt2", "gpt2", "The cat sat on the mat.")
    except (
        OSError
    ) as error:  # no internet (or no hub cache): the optional part is skipped, as in the notebook
        pytest.skip(f"the Hugging Face hub is not reachable from here: {str(error)[:120]}")
    assert (table["mean per token (nats)"] > 0).all()
