"""Lesson 5 (distilling a language model): its settings per preset, its runner, figures and tables.

The students are small causal transformers; the teacher is a larger one trained on the course's synthetic
language (:mod:`kdbook_utils.text`), whose true next-token distribution is known, so every student is
measured against the truth as well as against its teacher. Every student starts from the same *warm*
student (trained alone on its documents for ``warmup_epochs``, as the papers start from a fine-tuned
student), then trains ``epochs`` more with one method:

* ``student alone``: cross-entropy with the documents (the baseline);
* ``forward KL``: token-level KD on the documents, ``KL(teacher || student)`` at every position;
* ``reverse KL``: the same positions, ``KL(student || teacher)``;
* ``on-policy``: reverse KL on the student's own continuations of the documents' first tokens (GKD);
* ``sequence-level KD``: cross-entropy with the teacher's continuations of the same prompts.

Each run is measured on the validation and test documents (perplexity, next-token accuracy, KL from the
truth and from the teacher) and on samples the student writes (how many the grammar accepts, the
student's reverse KL to the teacher and its entropy along its own text).
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.experiments import TrainedModel, cached_model, compare
from kdbook_utils.lessons import LessonRunner, Stage
from kdbook_utils.methods.lm import (
    OnPolicyKD,
    TokenKD,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    teacher_sequences,
)
from kdbook_utils.models import create_model
from kdbook_utils.models.gpt import GPT_FAMILY, generate
from kdbook_utils.plots import DPI
from kdbook_utils.presets import Preset
from kdbook_utils.text import Language, TokenLoader, TokenSplits, language_splits, make_language, shift_right
from kdbook_utils.train import (
    CrossEntropy,
    DeviceLike,
    NonFiniteLossError,
    fit,
    precision_name,
    resolve_device,
    seed_everything,
)

# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMSettings:
    """What lesson 5 runs in one preset."""

    language_seed: int  # the dialect of the language (make_language)
    length: int  # tokens per document
    teacher: str  # a member of kdbook_utils.models.gpt.GPT_FAMILY
    teacher_documents: int
    teacher_epochs: int
    student: str
    student_documents: int  # the students' training documents (the first of the teacher's)
    warmup_epochs: int  # every student first trains alone this long (the shared warm start)
    epochs: int  # then each method trains this long
    batch_size: int
    lr: float  # AdamW, cosine schedule (the teacher and every student)
    prompt_length: int  # on-policy and sequence-level KD continue the documents' first tokens
    val_documents: int
    test_documents: int
    samples: int  # documents each student writes per split, to measure its own text
    seeds: tuple[int, ...]


SETTINGS: dict[str, LMSettings] = {
    "quick": LMSettings(
        language_seed=0, length=32, teacher="gpt-2x64", teacher_documents=8000, teacher_epochs=4,
        student="gpt-1x32", student_documents=1000, warmup_epochs=10, epochs=4, batch_size=32, lr=3e-3,
        prompt_length=4, val_documents=300, test_documents=300, samples=200, seeds=(0, 1, 2, 3, 4),
    ),
    "lab": LMSettings(
        language_seed=0, length=32, teacher="gpt-2x64", teacher_documents=16000, teacher_epochs=6,
        student="gpt-1x32", student_documents=2000, warmup_epochs=10, epochs=6, batch_size=32, lr=3e-3,
        prompt_length=4, val_documents=500, test_documents=500, samples=400, seeds=(0, 1, 2, 3, 4),
    ),
    "paper": LMSettings(
        language_seed=0, length=32, teacher="gpt-4x128", teacher_documents=50000, teacher_epochs=10,
        student="gpt-1x32", student_documents=5000, warmup_epochs=20, epochs=10, batch_size=64, lr=2e-3,
        prompt_length=4, val_documents=1000, test_documents=1000, samples=1000, seeds=(0, 1, 2, 3, 4),
    ),
    "smoke": LMSettings(
        language_seed=0, length=12, teacher="gpt-1x32", teacher_documents=200, teacher_epochs=1,
        student="gpt-1x32", student_documents=64, warmup_epochs=1, epochs=1, batch_size=32, lr=3e-3,
        prompt_length=4, val_documents=32, test_documents=32, samples=16, seeds=(0, 1),
    ),
}  # fmt: skip

ALONE = "student alone"
FORWARD = "forward KL"
REVERSE = "reverse KL"
ON_POLICY = "on-policy"
SEQUENCE = "sequence-level KD"
METHODS: dict[str, dict[str, str]] = {
    ALONE: {"method": "alone"},
    FORWARD: {"method": "forward"},
    REVERSE: {"method": "reverse"},
    ON_POLICY: {"method": "on-policy"},
    SEQUENCE: {"method": "sequence"},
}
"""The lesson's students, by the name its tables use, and the job that trains each."""

METRICS: dict[str, tuple[str, bool]] = {
    "perplexity": ("held-out perplexity", False),
    "kl_true": ("KL(truth || student), nats/token", False),
    "kl_teacher": ("KL(teacher || student), nats/token", False),
    "own_reverse_kl": ("KL(student || teacher) on its own text", False),
    "grammatical": ("grammatical samples (%)", True),
}
"""The measurements compared over seeds: column -> (label, whether higher is better)."""

DESCRIPTIVE: dict[str, str] = {
    "accuracy": "next-token accuracy (%)",
    "own_entropy": "entropy on its own text, nats/token",
    "distinct": "distinct samples (%)",
}
"""Measurements shown but not judged better or worse (a lower entropy is neither)."""


CPU_THREADS = 1
"""PyTorch threads while the lesson trains and measures on a CPU. These models are so small that splitting
each operation between threads gains little, and on a busy machine it loses much: on this project's shared
2-core machine, under load, one teacher step took 70 ms with one thread and 0.6-1.7 s with two."""


@contextmanager
def cpu_threads(device: DeviceLike, count: int = CPU_THREADS) -> Iterator[None]:
    """Run the block with ``count`` PyTorch threads when ``device`` is the CPU (restored afterwards)."""
    if resolve_device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def family_options(name: str) -> dict[str, int]:
    if name not in GPT_FAMILY:
        raise ValueError(f"Unknown model {name!r}; the family is {', '.join(GPT_FAMILY)}.")
    return dict(GPT_FAMILY[name])


# --------------------------------------------------------------------------------------------------------
# Measuring a language model
# --------------------------------------------------------------------------------------------------------


def _logits(model: nn.Module, documents: Tensor, bos_id: int, batch_size: int = 512) -> Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(documents), batch_size):
            batch = documents[start : start + batch_size].to(device)
            parts.append(model(shift_right(batch, bos_id)).float().cpu())
    model.train(was_training)
    return torch.cat(parts)


def kl_from_truth(truth: Tensor, logits: Tensor) -> Tensor:
    """``KL(truth || model)`` at every position, ``(N, L)``: ``sum_v p(v) (log p(v) - log q(v))``, the
    terms with ``p(v) = 0`` left out (the truth rules some tokens out; ``log 0`` never enters)."""
    log_q = F.log_softmax(logits.double(), dim=-1)
    terms = torch.where(
        truth > 0, truth * (truth.clamp_min(1e-300).log() - log_q), torch.zeros((), dtype=truth.dtype)
    )
    return terms.sum(dim=-1)


def measure(
    model: nn.Module,
    teacher: nn.Module,
    language: Language,
    documents: Tensor,
    truth: Tensor,
    *,
    samples: int,
    seed: int,
) -> tuple[dict[str, float], Tensor]:
    """A language model's measurements on ``documents`` (with their true next-token distributions) and on
    ``samples`` documents it writes itself (drawn with ``seed``). Returns them and the samples.

    * ``perplexity``: ``exp`` of the mean cross-entropy per token; ``accuracy``: next-token accuracy (%);
    * ``kl_true`` and ``kl_teacher``: ``KL(truth || model)`` and ``KL(teacher || model)`` per token;
    * on its own text: ``grammatical`` (% the grammar accepts), ``own_reverse_kl``
      (``KL(model || teacher)`` per token, what on-policy distillation minimises), ``own_entropy`` (the
      entropy of its next-token distributions, nats per token) and ``distinct`` (% of different samples).
    """
    bos = language.bos_id
    logits = _logits(model, documents, bos)
    teacher_logits = _logits(teacher, documents, bos)
    flat = logits.reshape(-1, logits.shape[-1])
    cross_entropy = float(F.cross_entropy(flat, documents.reshape(-1)))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    written = generate(
        model, torch.empty(samples, 0, dtype=torch.int64), documents.shape[1], bos_id=bos, generator=generator
    ).cpu()
    own, teacher_own = _logits(model, written, bos), _logits(teacher, written, bos)
    log_own = F.log_softmax(own, dim=-1)
    scores = {
        "perplexity": math.exp(cross_entropy),
        "accuracy": 100.0 * float((logits.argmax(-1) == documents).double().mean()),
        "kl_true": float(kl_from_truth(truth, logits).mean()),
        "kl_teacher": float(forward_kl(logits, teacher_logits)),
        "grammatical": 100.0 * float(language.is_grammatical(written).double().mean()),
        "own_reverse_kl": float(reverse_kl(own, teacher_own)),
        "own_entropy": float(-(log_own.exp() * log_own).sum(-1).mean()),
        "distinct": 100.0 * len(set(map(tuple, written.tolist()))) / samples,
    }
    return scores, written


@dataclass
class LMRun:
    """One trained student: its network, history, measurements per split, its samples, time and whether
    it failed (a non-finite loss)."""

    model: nn.Module
    history: pd.DataFrame
    scores: dict[str, dict[str, float]]  # split -> measurement -> value
    samples: dict[str, Tensor]  # split -> documents the student wrote
    seconds: float
    failed: str = ""

    def rows(self, **labels: Any) -> list[dict[str, Any]]:
        """Tidy rows, one per split: ``{**labels, split, output, <measurements>, seconds, failed}``."""
        return [
            {
                **labels,
                "split": split,
                "output": "final",
                **values,
                "seconds": self.seconds,
                "failed": self.failed,
            }
            for split, values in self.scores.items()
        ]


# --------------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------------


def lesson_data(preset: Preset, root: str | None = None, progress: bool = True) -> None:
    """Lesson 5 needs no data set on disk: it writes its own documents (``LMLesson.prepare``)."""


def _adamw(method: nn.Module, lr: float) -> torch.optim.Optimizer:
    parameters = [parameter for parameter in method.parameters() if parameter.requires_grad]
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)


@dataclass
class LMLesson(LessonRunner):
    """What lesson 5 runs, written once for the notebook, the results recorder and the command line.

    A job is ``{"method": "alone" | "forward" | "reverse" | "on-policy" | "sequence"}`` (:data:`METHODS`).
    Every run is kept under its job and seed (the base class); ``warm`` keeps the warm-started student of
    each seed; ``truth`` holds the true next-token distributions of the validation and test documents.
    """

    STAGES: ClassVar[dict[str, Stage]] = {
        "final": Stage(
            "every student (alone, forward KL, reverse KL, on-policy, sequence-level KD) from the "
            "same warm start, over the seeds",
            (),
            lambda runner: runner.headline(),
            split="test",
        ),
    }
    SETTINGS: ClassVar[Mapping[str, LMSettings]] = SETTINGS
    lesson: ClassVar[str] = "lm"

    language: Language
    teacher: TrainedModel
    truth: dict[str, Tensor]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.warm: dict[int, nn.Module] = {}
        self._teacher_text: Tensor | None = None

    @classmethod
    def prepare(
        cls,
        preset: Preset,
        splits: Any = None,
        *,
        device: DeviceLike = None,
        progress: bool = True,
        settings: LMSettings | None = None,
    ) -> LMLesson:
        """Draw the documents, compute their true next-token distributions, and load the teacher (shipped,
        cached, or trained once on every training document where the preset allows). ``splits`` is not
        used: the lesson writes its own text."""
        settings = cls.settings_for(preset, settings)
        device, precision = cls.runtime(preset, device)
        with cpu_threads(device):
            language = make_language(settings.language_seed)
            documents = language_splits(language, train=settings.teacher_documents, val=settings.val_documents,
                                        test=settings.test_documents, length=settings.length)  # fmt: skip
            truth = {
                split: language.next_token_probabilities(getattr(documents, split))
                for split in ("val", "test")
            }
            teacher = cls._teacher(preset, settings, language, documents, device, precision, progress)
        return cls(preset, settings, documents, device, precision, progress, language, teacher, truth)

    @staticmethod
    def _teacher(
        preset: Preset,
        settings: LMSettings,
        language: Language,
        documents: TokenSplits,
        device: torch.device,
        precision: torch.dtype | None,
        progress: bool,
    ) -> TrainedModel:
        options = family_options(settings.teacher)
        recipe = {
            "kind": "lm teacher",
            "arch": "tiny_gpt",
            "options": options,
            "context": settings.length,
            "language": language.digest(),
            "documents": settings.teacher_documents,
            "train_data": f"language {settings.language_seed} n={settings.teacher_documents} documents",
            "epochs": settings.teacher_epochs,
            "lr": settings.lr,
            "batch_size": settings.batch_size,
            "seed": 0,
            "precision": precision_name(precision),
        }

        def build(will_train: bool) -> nn.Module:
            seed_everything(0)
            return create_model("tiny_gpt", language.vocab_size, context=settings.length, **options)

        def train(model: nn.Module) -> pd.DataFrame:
            loader = TokenLoader(
                documents.train, settings.batch_size, bos_id=language.bos_id, shuffle=True, device=device
            )
            val = TokenLoader(documents.val, 512, bos_id=language.bos_id, device=device)
            return fit(model, loader, val, epochs=settings.teacher_epochs, optimizer=_adamw(model, settings.lr),
                       device=device, precision=precision, progress=progress,
                       desc=f"teacher {settings.teacher}")  # fmt: skip

        name = f"{settings.teacher}_language{settings.language_seed}_{settings.length}tokens"
        return cached_model(name, recipe, build, train, device=device, may_train=preset.train_teachers)

    def teacher_models(self) -> dict[str, TrainedModel]:
        return {"teacher": self.teacher}

    def evaluation_loader(self, split: str) -> TokenLoader:
        """The ``split`` documents in order (next-token accuracy over every position)."""
        return TokenLoader(getattr(self.splits, split), 512, bos_id=self.language.bos_id, device=self.device)

    def scale(self) -> Markdown:
        """The run's scale: documents, tokens and epochs for each student, and the teacher's documents and
        its KL from the true language."""
        s = self.settings
        where = {
            "shipped": "shipped with the course",
            "cache": "from your cache",
            "trained": "trained in this run",
        }
        kl = self.teacher_scores("val")["kl_true"]
        return Markdown(
            f"**Scale** (preset `{self.preset.name}`, device `{self.device}`): each student learns from "
            f"**{s.student_documents:,}** documents of {s.length} tokens ({s.warmup_epochs} epochs alone, then "
            f"**{s.epochs}** with its method; seeds {', '.join(map(str, s.seeds))}); the comparisons use "
            f"{s.val_documents:,} validation and {s.test_documents:,} test documents. The teacher ({s.teacher}, "
            f"{where[self.teacher.source]}) learned from {s.teacher_documents:,} documents, more than any "
            f"student, and is **{kl:.4f}** nats per token from the true language on the validation documents."
        )

    # ---------------------------------------------------------------------------------------- students

    @property
    def student_documents(self) -> Tensor:
        return self.splits.train[: self.settings.student_documents]

    def build(self) -> nn.Module:
        """A fresh (untrained) student."""
        return create_model(
            "tiny_gpt",
            self.language.vocab_size,
            context=self.settings.length,
            **family_options(self.settings.student),
        )

    def _fit(self, method: nn.Module, documents: Tensor, epochs: int, seed: int, desc: str) -> pd.DataFrame:
        loader = TokenLoader(
            documents,
            self.settings.batch_size,
            bos_id=self.language.bos_id,
            shuffle=True,
            seed=seed,
            device=self.device,
        )
        return fit(
            method,
            loader,
            epochs=epochs,
            optimizer=_adamw(method, self.settings.lr),
            device=self.device,
            precision=self.precision,
            progress=False,
            desc=desc,
        )

    def warm_student(self, seed: int) -> nn.Module:
        """The seed's warm start: a fresh student trained alone for ``warmup_epochs`` (kept, and copied
        for every method)."""
        if seed not in self.warm:
            with cpu_threads(self.device):
                seed_everything(seed)
                student = self.build()
                self._fit(student, self.student_documents, self.settings.warmup_epochs, seed, "warm start")
            self.warm[seed] = student
        return copy.deepcopy(self.warm[seed]).requires_grad_(True)

    def teacher_text(self) -> Tensor:
        """Sequence-level KD's documents: the teacher's continuations of the students' documents' prompts
        (written once, shared by every seed)."""
        if self._teacher_text is None:
            self._teacher_text = teacher_sequences(
                self.teacher.model,
                self.student_documents.to(self.device),
                self.settings.prompt_length,
                bos_id=self.language.bos_id,
                seed=0,
            ).cpu()
        return self._teacher_text

    def method(self, name: str, student: nn.Module, seed: int) -> tuple[nn.Module, Tensor]:
        """The method that trains ``student`` as job ``name`` (a value of ``METHODS``), and its documents."""
        documents = self.student_documents
        if name == "alone":
            return CrossEntropy(student), documents
        if name in ("forward", "reverse"):
            return TokenKD(student, self.teacher.model, divergence=name), documents
        if name == "on-policy":
            return OnPolicyKD(
                student,
                self.teacher.model,
                prompt_length=self.settings.prompt_length,
                bos_id=self.language.bos_id,
                seed=seed,
            ), documents
        if name == "sequence":
            return CrossEntropy(student), self.teacher_text()
        raise ValueError(
            f"Unknown method {name!r}; the lesson's are {[spec['method'] for spec in METHODS.values()]}."
        )

    def complete(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        known = [job["method"] for job in METHODS.values()]
        if spec.get("method") not in known:
            raise ValueError(f"Unknown method {spec.get('method')!r}; the lesson's are {known}.")
        return {"method": spec["method"]}

    def train_job(self, spec: dict[str, Any], seed: int) -> LMRun:
        """One student: the seed's warm start trained ``epochs`` more with the job's method, then measured."""
        with cpu_threads(self.device):
            return self._train(spec["method"], seed)

    def _train(self, method: str, seed: int) -> LMRun:
        student = self.warm_student(seed)
        trainer, documents = self.method(method, student, seed)
        started = time.perf_counter()
        failed = ""
        try:
            history = self._fit(trainer, documents, self.settings.epochs, seed, method)
        except NonFiniteLossError as error:
            history, failed = getattr(error, "history", pd.DataFrame()), f"non-finite loss ({error})"
        seconds = time.perf_counter() - started
        scores, samples = {}, {}
        for offset, split in enumerate(("val", "test")):
            scores[split], samples[split] = measure(
                student,
                self.teacher.model,
                self.language,
                getattr(self.splits, split),
                self.truth[split],
                samples=self.settings.samples,
                seed=1000 * (offset + 1) + seed,
            )
        return LMRun(student.eval(), history, scores, samples, seconds, failed)

    def headline(self, methods: Sequence[str] | None = None) -> pd.DataFrame:
        """Every student of ``methods`` (default: all of :data:`METHODS`) over the seeds: one row per run and
        split, every measurement a column."""
        chosen = {name: METHODS[name] for name in (methods or METHODS)}
        return self.table(chosen, self.settings.seeds)

    def teacher_scores(self, split: str = "test") -> dict[str, float]:
        """The teacher's own measurements (its KL to itself is 0)."""
        with cpu_threads(self.device):
            scores, _ = measure(
                self.teacher.model,
                self.teacher.model,
                self.language,
                getattr(self.splits, split),
                self.truth[split],
                samples=self.settings.samples,
                seed=7,
            )
        return scores


# --------------------------------------------------------------------------------------------------------
# Comparisons in words
# --------------------------------------------------------------------------------------------------------

VERDICT_WORDS = {"better": "better", "worse": "worse", "inconclusive": "inconclusive"}


def compare_metric(
    runs: pd.DataFrame,
    metric: str,
    baseline: str = ALONE,
    *,
    split: str = "test",
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The paired comparison over seeds of one measurement (:func:`kdbook_utils.experiments.compare`), with
    the verdict in the lesson's words: ``better``, ``worse`` or ``inconclusive``, turned round for a
    measurement where lower is better (perplexity, the KLs)."""
    higher_is_better = METRICS[metric][1] if metric in METRICS else True
    table = compare(runs, baseline, split=split, metric=metric, methods=methods).table.copy()
    flip = {"better": "worse", "worse": "better"}
    verdicts = table["verdict"].map(lambda v: v if higher_is_better else flip.get(v, v))
    table["verdict"] = verdicts.map(lambda v: VERDICT_WORDS.get(v, v))
    return table


def verdict_table(runs: pd.DataFrame, baseline: str = ALONE, *, split: str = "test") -> pd.DataFrame:
    """Every method against ``baseline`` on every judged measurement: mean, paired difference [95 %
    interval], verdict; one row per (measurement, method)."""
    rows = []
    for metric, (label, _) in METRICS.items():
        table = compare_metric(runs, metric, baseline, split=split)
        for method, row in table.iterrows():
            if method == baseline:
                continue
            rows.append(
                {
                    "measurement": label,
                    "method": method,
                    "mean": row["mean"],
                    "baseline mean": table.loc[baseline, "mean"],
                    "difference": row["difference"],
                    "ci_low": row["ci_low"],
                    "ci_high": row["ci_high"],
                    "seeds": int(row["seeds"]),
                    "verdict": row["verdict"],
                }
            )
    return pd.DataFrame(rows)


def verdict_sentence(
    runs: pd.DataFrame, method: str, metric: str, baseline: str = ALONE, *, split: str = "test"
) -> str:
    """One sentence computed from the runs: ``method`` against ``baseline`` on ``metric``, with the mean
    paired difference, its 95 % interval and the verdict word."""
    label = METRICS[metric][0] if metric in METRICS else DESCRIPTIVE.get(metric, metric)
    table = compare_metric(runs, metric, baseline, split=split, methods=[baseline, method])
    row = table.loc[method]
    if row["verdict"] in ("failed", "no verdict"):
        return f"**{method}** against **{baseline}** on {label}: {row['verdict']}."
    return (
        f"**{method}** against **{baseline}** on {label}: {row['mean']:.4g} against "
        f"{table.loc[baseline, 'mean']:.4g}, mean paired difference {row['difference']:+.3g} "
        f"[{row['ci_low']:+.3g}, {row['ci_high']:+.3g}] over {int(row['seeds'])} seeds: **{row['verdict']}**."
    )


def difference_words(runs: pd.DataFrame, method: str, other: str, metric: str, *, split: str = "test") -> str:
    """How ``method`` differs from ``other`` on a descriptive measurement, in words from the paired interval:
    ``"higher"``, ``"lower"`` or ``"inconclusive"``, with the numbers."""
    table = compare(runs, other, split=split, metric=metric, methods=[other, method]).table
    row = table.loc[method]
    word = {"better": "higher", "worse": "lower"}.get(str(row["verdict"]), "inconclusive")
    return (
        f"{word} ({row['mean']:.3g} against {table.loc[other, 'mean']:.3g}; paired difference "
        f"{row['difference']:+.3g} [{row['ci_low']:+.3g}, {row['ci_high']:+.3g}])"
    )


def summary_table(
    runs: pd.DataFrame, teacher: Mapping[str, float] | None = None, *, split: str = "test"
) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every measurement, one row per method (and the teacher)."""
    part = runs[(runs["split"] == split) & (runs["failed"] == "")]
    columns = [*METRICS, *DESCRIPTIVE]
    means = part.groupby("method", sort=False)[columns].mean()
    table = means.rename(columns={**{k: v[0] for k, v in METRICS.items()}, **DESCRIPTIVE})
    if teacher is not None:
        row = {(METRICS.get(k, (DESCRIPTIVE.get(k, k),))[0]): v for k, v in teacher.items() if k in columns}
        table = pd.concat([pd.DataFrame([row], index=["teacher"]), table])
    return table


def samples_table(
    lesson: LMLesson,
    language: Language,
    methods: Sequence[str],
    *,
    seed: int,
    count: int = 3,
    split: str = "test",
) -> pd.DataFrame:
    """The first ``count`` documents each method's student (of ``seed``) wrote, side by side, each marked
    with whether the grammar accepts it."""
    rows = {}
    for name in methods:
        written = lesson.job(METHODS[name], seed).samples[split][:count]
        accepted = language.is_grammatical(written).tolist()
        texts = language.decode(written)
        rows[name] = [f"{'✓' if ok else '✗'} {text}" for ok, text in zip(accepted, texts)]
    return pd.DataFrame(rows, index=[f"sample {k + 1}" for k in range(count)]).T


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def next_token_table(
    model: nn.Module, language: Language, prefix: str, temperature: float = 1.0, top: int = 12
) -> pd.DataFrame:
    """The ``top`` most likely next tokens after ``prefix``: the truth's probability and the model's at
    ``temperature``."""
    tokens = language.encode(prefix + " .") if prefix.strip() else language.encode(".")
    position = len(prefix.split())
    truth = language.next_token_probabilities(tokens)[position]
    logits = _logits(model, tokens.unsqueeze(0), language.bos_id)[0, position]
    model_probabilities = F.softmax(logits / temperature, dim=-1).double()
    order = (truth + model_probabilities).argsort(descending=True)[:top]
    return pd.DataFrame(
        {
            "token": [language.vocabulary[int(i)] for i in order],
            "truth": truth[order].numpy(),
            f"model (T = {temperature:g})": model_probabilities[order].numpy(),
        }
    )


def plot_next_token(
    models: Mapping[str, nn.Module], language: Language, prefix: str, temperature: float = 1.0, top: int = 14
) -> Figure:
    """Bars of the next-token distribution after ``prefix``: the truth and each model at ``temperature``."""
    tokens = language.encode(prefix + " .") if prefix.strip() else language.encode(".")
    position = len(prefix.split())
    truth = language.next_token_probabilities(tokens)[position]
    rows = {"truth": truth}
    for name, model in models.items():
        logits = _logits(model, tokens.unsqueeze(0), language.bos_id)[0, position]
        rows[f"{name} (T = {temperature:g})"] = F.softmax(logits / temperature, dim=-1).double()
    order = torch.stack(list(rows.values())).sum(0).argsort(descending=True)[:top]
    fig, ax = plt.subplots(figsize=(9.0, 3.4), layout="constrained", dpi=DPI)
    width = 0.8 / len(rows)
    positions = np.arange(len(order))
    for index, (name, probabilities) in enumerate(rows.items()):
        ax.bar(
            positions + (index - (len(rows) - 1) / 2) * width, probabilities[order].numpy(), width, label=name
        )
    ax.set_xticks(positions, [language.vocabulary[int(i)] for i in order], rotation=45, ha="right")
    ax.set_ylabel("probability of the next token")
    ax.set_title(f"After “{prefix or '(start of a document)'}”", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def fit_one_mode(
    target: Tensor,
    grid: Tensor,
    divergence: str,
    *,
    steps: int = 600,
    lr: float = 0.05,
    start: tuple[float, float] = (1.0, -0.5),
) -> tuple[Tensor, float, float]:
    """The discretised Gaussian on ``grid`` (a one-mode student: a mean and a spread) closest to the
    distribution ``target`` under ``divergence`` (``"forward"``, ``"reverse"``, ``"jsd"``, ``"skew-forward"``
    or ``"skew-reverse"``), found by gradient descent (Adam) from ``start`` = (mean, log spread).
    Returns its probabilities, mean and spread."""
    mean = torch.tensor(start[0], dtype=torch.float64, requires_grad=True)
    log_spread = torch.tensor(start[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([mean, log_spread], lr=lr)
    target_logits = target.clamp_min(1e-300).log().unsqueeze(0)
    losses: dict[str, Callable[[Tensor], Tensor]] = {
        "forward": lambda q: forward_kl(q, target_logits),
        "reverse": lambda q: reverse_kl(q, target_logits),
        "jsd": lambda q: generalized_jsd(q, target_logits),
        "skew-forward": lambda q: skew_kl(q, target_logits),
        "skew-reverse": lambda q: skew_kl(q, target_logits, reverse=True),
    }
    for _ in range(steps):
        logits = (-0.5 * ((grid - mean) / log_spread.exp()) ** 2).unsqueeze(0)
        loss = losses[divergence](logits)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        fitted = F.softmax(-0.5 * ((grid - mean) / log_spread.exp()) ** 2, dim=-1)
    return fitted, float(mean.detach()), float(log_spread.detach().exp())


def two_modes(grid: Tensor, weights: tuple[float, float] = (0.6, 0.4)) -> Tensor:
    """A distribution on ``grid`` with two separated modes (at -2 and 2, spread 0.5)."""
    bumps = [
        weight * torch.exp(-0.5 * ((grid - centre) / 0.5) ** 2)
        for weight, centre in zip(weights, (-2.0, 2.0))
    ]
    density = sum(bumps)
    return density / density.sum()


def plot_mode_covering(
    divergences: Sequence[str] = ("forward", "reverse"),
    *,
    starts: Sequence[float] = (-1.0, 1.0),
    weights: tuple[float, float] = (0.6, 0.4),
) -> Figure:
    """A two-mode teacher and the one-mode student each divergence fits to it (from each starting mean,
    with a spread of about 0.6): forward KL spreads over both modes, reverse KL settles on one."""
    grid = torch.linspace(-5, 5, 201, dtype=torch.float64)
    target = two_modes(grid, weights)
    fig, ax = plt.subplots(figsize=(7.5, 3.4), layout="constrained", dpi=DPI)
    ax.fill_between(grid.numpy(), target.numpy(), color="grey", alpha=0.35, label="teacher (two modes)")
    styles = iter(["-", "--", ":", "-."] * 4)
    for divergence in divergences:
        for start in starts:
            fitted, mean, spread = fit_one_mode(target, grid, divergence, start=(start, -0.5))
            ax.plot(
                grid.numpy(),
                fitted.numpy(),
                next(styles),
                linewidth=2,
                label=f"{divergence} KL fit from {start:+g}: mean {mean:+.2f}, spread {spread:.2f}"
                if "skew" not in divergence and divergence != "jsd"
                else f"{divergence} fit from {start:+g}: mean {mean:+.2f}",
            )
    ax.set_xlabel("outcome")
    ax.set_ylabel("probability")
    ax.set_title(
        "One mode fitted to two: mode covering (forward) and mode seeking (reverse)", fontsize="medium"
    )
    ax.legend(fontsize="x-small", loc="upper left")
    return fig


def plot_measurements(
    runs: pd.DataFrame,
    metrics: Sequence[str],
    methods: Sequence[str],
    *,
    split: str = "test",
    teacher: Mapping[str, float] | None = None,
) -> Figure:
    """One panel per measurement: every run as a dot (each seed's runs joined by a grey line), each method's
    mean as a bar, the teacher as a dashed line."""
    part = runs[(runs["split"] == split) & (runs["failed"] == "")]
    columns = min(3, len(metrics))  # at most three panels a row: legible at the book's column width
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 3.3 * rows), layout="constrained", dpi=DPI, squeeze=False
    )
    for unused in axes.flat[len(metrics) :]:
        unused.set_visible(False)
    colours = plt.cm.tab10(np.arange(len(methods)))
    for ax, metric in zip(axes.flat, metrics):
        label = METRICS[metric][0] if metric in METRICS else DESCRIPTIVE.get(metric, metric)
        for _, seed_runs in part[part["method"].isin(methods)].groupby("seed"):
            ordered = seed_runs.set_index("method").reindex(methods)
            ax.plot(range(len(methods)), ordered[metric], color="grey", alpha=0.4, linewidth=1)
        for index, (name, colour) in enumerate(zip(methods, colours)):
            values = part[part["method"] == name][metric]
            ax.scatter(np.full(len(values), index), values, color=colour, s=18, zorder=3)
            ax.hlines(values.mean(), index - 0.3, index + 0.3, color="black", linewidth=2, zorder=4)
        if teacher is not None and metric in teacher:
            ax.axhline(teacher[metric], color="grey", linestyle="--", linewidth=1, label="teacher")
            ax.legend(fontsize="x-small")
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize="small")
        ax.set_title(label, fontsize="small")
    fig.suptitle(
        f"Every student on the {split} documents and its own text (dots: seeds; bars: means)",
        fontsize="medium",
    )
    return fig


def comparison_text(runs: pd.DataFrame) -> str:
    """The lesson's measurements compared with the student alone, as text (the command line prints it)."""
    if ALONE not in set(runs["method"]) or not set(METRICS) <= set(runs.columns):
        return ""
    split = "test" if "test" in set(runs["split"]) else str(runs["split"].iloc[0])
    table = verdict_table(runs, split=split).set_index(["measurement", "method"])
    return (
        f"\nThe measurements ({split} split) against {ALONE!r}; lower is better for perplexity and the "
        f"KLs, higher for grammatical samples:\n" + table.to_string(float_format=lambda x: f"{x:.4g}")
    )


# --------------------------------------------------------------------------------------------------------
# The same losses on a pretrained pair (optional: needs transformers and, for names, the internet)
# --------------------------------------------------------------------------------------------------------

HF_DIVERGENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "forward KL": lambda student, teacher: forward_kl(student, teacher),
    "reverse KL": lambda student, teacher: reverse_kl(student, teacher),
    "JSD (beta = 0.5)": lambda student, teacher: generalized_jsd(student, teacher, beta=0.5),
    "skew KL (alpha = 0.1)": lambda student, teacher: skew_kl(student, teacher, alpha=0.1),
    "skew reverse KL (alpha = 0.1)": lambda student, teacher: skew_kl(
        student, teacher, alpha=0.1, reverse=True
    ),
}


def hf_divergences(student: Any, teacher: Any, text: str | Tensor, *, tokenizer: Any = None) -> pd.DataFrame:
    """The lesson's divergences between two Hugging Face causal language models on one text, per token.

    ``student`` and ``teacher`` are model names (loaded with ``transformers.AutoModelForCausalLM``, which
    downloads them on first use) or loaded models; they must share a vocabulary (e.g. ``"distilgpt2"`` and
    ``"gpt2"``). ``text`` is a string (tokenised with ``tokenizer``, by default the teacher's) or token ids
    ``(1, L)``. Returns one row per divergence: its mean over the text's positions.
    """
    transformers = importlib.import_module("transformers")  # optional: only this function needs it
    if isinstance(teacher, str) and tokenizer is None and isinstance(text, str):
        tokenizer = transformers.AutoTokenizer.from_pretrained(teacher)
    models = [
        transformers.AutoModelForCausalLM.from_pretrained(m) if isinstance(m, str) else m
        for m in (student, teacher)
    ]
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("A text needs a tokenizer: pass tokenizer=, or token ids instead of the text.")
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    else:
        ids = torch.as_tensor(text).reshape(1, -1)
    with torch.no_grad():
        student_logits, teacher_logits = (model.eval()(input_ids=ids).logits.float() for model in models)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"The models' vocabularies differ ({student_logits.shape[-1]} and "
            f"{teacher_logits.shape[-1]} tokens): distil between models that share a tokenizer."
        )
    values = {
        name: float(divergence(student_logits, teacher_logits)) for name, divergence in HF_DIVERGENCES.items()
    }
    return pd.DataFrame({"divergence": list(values), "mean per token (nats)": list(values.values())})
