"""Distilling a language model: the divergences between a teacher's and a student's next-token
distributions, and the three choices of text to compute them on (the data, the teacher's samples, the
student's own samples).

A language model gives, at every position ``t`` of a sequence ``x``, a distribution over the next token:
the teacher's ``p(. | x_<t)``, the student's ``q(. | x_<t)``. Each loss below is a divergence ``D(p, q)``
summed over the vocabulary at each position, then averaged over the scored positions ``M`` (padding,
marked by ``IGNORE_INDEX`` in the targets or ``False`` in a ``mask``, is left out)::

    L = 1 / |M| * sum_{(n, t) in M} D( p(. | x_<t), q(. | x_<t) )

This per-token mean is the reduction of TRL's GKD trainer, DistiLLM's and MiniLLM's token losses.

The divergences (pure functions of the logits ``(..., V)``, classes in the last dimension):

* :func:`forward_kl`: ``T^2 KL(p_T || q_T)``, Hinton et al.'s soft-target loss at every position
  (token-level or "word-level" KD, Kim and Rush 2016, eq. 2). The student pays wherever the teacher has
  mass it lacks: it spreads over every mode (**mode covering**).
* :func:`reverse_kl`: ``KL(q || p)``, the direction of MiniLLM (Gu, Dong, Wei and Huang, "MiniLLM:
  Knowledge Distillation of Large Language Models", ICLR 2024). The student pays for mass where the
  teacher has little: it keeps to the teacher's large modes and may drop the small ones (**mode
  seeking**).
* :func:`skew_kl`: DistiLLM's alpha-skew KL ``KL(p || a p + (1 - a) q)`` and skew reverse KL
  ``KL(q || a q + (1 - a) p)`` (Ko, Kim, Chen and Yun, "DistiLLM: Towards Streamlined Distillation for
  Large Language Models", ICML 2024, eqs. 3-4, ``a = 0.1``): mixing a little of the first distribution
  into the second keeps the divergence and its gradient bounded when one of them is near zero.
* :func:`generalized_jsd`: GKD's generalised Jensen-Shannon divergence (Agarwal, Vieillard, Zhou, Stanczyk,
  Ramos, Geist and Bachem, "On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes", ICLR 2024, eq. 1)
  ``JSD(b) = b KL(p || m) + (1 - b) KL(q || m)``, ``m = b p + (1 - b) q``: close to forward KL (scaled by
  ``b``) for small ``b``, to reverse KL (scaled by ``1 - b``) for ``b`` near 1; at ``b = 0`` and ``b = 1``
  it is defined as forward and reverse KL, as GKD's code (TRL's ``generalized_jsd_loss``) does.

The text (the distillers that :func:`kdbook_utils.train.fit` trains):

* :class:`TokenKD`: the divergence at every position of the *training data* ("supervised" KD);
* sequence-level KD (Kim and Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016): the teacher
  writes the text (:func:`teacher_sequences`: continuations of training prompts, sampled), then the
  student learns it with plain cross-entropy (:class:`~kdbook_utils.train.CrossEntropy`);
* :class:`OnPolicyKD`: the divergence at every position of the *student's own samples*, scored by the
  teacher (GKD with student-generated data, ``lambda = 1``: "on-policy distillation"). The samples are
  taken as given (no gradient flows through the sampling), as in GKD.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.errors import Seen, check_choice, check_int, check_number, must_be
from kdbook_utils.models.gpt import generate
from kdbook_utils.text import shift_right
from kdbook_utils.train import IGNORE_INDEX, Distiller, per_position

__all__ = [
    "DIVERGENCES",
    "OnPolicyKD",
    "TokenKD",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_kl",
    "target_mask",
    "teacher_sequences",
    "token_divergence",
]

DIVERGENCES = ("forward", "reverse", "jsd", "skew-forward", "skew-reverse")
"""The names :func:`token_divergence` (and the distillers' ``divergence=``) accept."""


# --------------------------------------------------------------------------------------------------------
# Checks and the reduction
# --------------------------------------------------------------------------------------------------------


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> None:
    for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if not isinstance(logits, Tensor) or logits.dim() < 2 or not logits.is_floating_point():
            raise ValueError(
                must_be(
                    f"The {name} logits",
                    "a float tensor (..., V), classes last, e.g. (N, L, V)",
                    logits if isinstance(logits, Tensor) else Seen(type(logits).__name__),
                )
            )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            must_be(
                "The student and teacher logits",
                "of the same shape",
                Seen(f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"),
                "Both models must read the same tokens and share one vocabulary.",
            )
        )
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != student_logits.shape[:-1]):
        raise ValueError(
            must_be(
                "mask",
                f"a bool tensor of the logits' shape less the vocabulary, {tuple(student_logits.shape[:-1])}",
                mask if isinstance(mask, Tensor) else Seen(type(mask).__name__),
                "True marks a position that is scored; make it with target_mask(targets).",
            )
        )


def _check_temperature(temperature: float) -> float:
    return check_number("temperature", temperature, above=0.0, fix="1 is the models' own distributions.")


def target_mask(targets: Tensor) -> Tensor:
    """``True`` at every scored position: targets other than ``IGNORE_INDEX`` (-100, padding)."""
    return targets != IGNORE_INDEX


def _reduce(per_token: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Mean over the scored positions (``"mean"``), or the per-position values with unscored ones set to
    0 (``"none"``). With no scored position the mean is 0 (and still has a gradient)."""
    check_choice("reduction", reduction, ("mean", "none"))
    if mask is None:
        return per_token.mean() if reduction == "mean" else per_token
    scored = mask.to(per_token.dtype)
    if reduction == "none":
        return per_token * scored
    return (per_token * scored).sum() / scored.sum().clamp_min(1.0)


def _log_probabilities(logits: Tensor, temperature: float) -> Tensor:
    """Log-softmax at ``temperature`` in float32 at least (half-precision logits are promoted)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per position from log-probabilities: ``sum_v p (log p - log q)`` (0 where p = 0)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def _mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w a + (1 - w) b)`` from log-probabilities, without leaving log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


# --------------------------------------------------------------------------------------------------------
# The divergences
# --------------------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Hinton et al.'s KD loss at every position: ``T^2 KL(p_T || q_T)``, averaged over scored positions.

        forward_kl = T^2 / |M| * sum_{(n,t) in M} sum_v p_T(v) (log p_T(v) - log q_T(v)),
        p_T = softmax(teacher_logits / T),  q_T = softmax(student_logits / T)

    Minimised over ``q``, it is the cross-entropy with the teacher's distribution: the student must put
    probability wherever the teacher does (mode covering). ``reduction="none"`` returns the value of every
    position (0 where unscored).
    """
    temperature = _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, mask)
    log_q = _log_probabilities(student_logits, temperature)
    log_p = _log_probabilities(teacher_logits, temperature)
    return _reduce(_kl(log_p, log_q), mask, reduction) * temperature**2


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The reverse direction, ``T^2 KL(q_T || p_T)``, averaged over scored positions (MiniLLM's direction).

        reverse_kl = T^2 / |M| * sum_{(n,t) in M} sum_v q_T(v) (log q_T(v) - log p_T(v))

    The student is charged for probability it puts where the teacher has little, and nothing for modes
    of the teacher it leaves out: minimising it concentrates the student on the teacher's large modes
    (mode seeking). MiniLLM uses ``T = 1``; the ``T^2`` keeps the scale of :func:`forward_kl` at other
    temperatures.
    """
    temperature = _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, mask)
    log_q = _log_probabilities(student_logits, temperature)
    log_p = _log_probabilities(teacher_logits, temperature)
    return _reduce(_kl(log_q, log_p), mask, reduction) * temperature**2


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    reverse: bool = False,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """DistiLLM's skew KL (Ko et al. 2024, eqs. 3-4), averaged over scored positions:

        skew forward (reverse=False):  T^2 KL(p || alpha p + (1 - alpha) q)
        skew reverse (reverse=True):   T^2 KL(q || alpha q + (1 - alpha) p)

    ``alpha = 0`` is the plain forward (or reverse) KL; as ``alpha`` grows the second distribution is
    mixed with the first, so the log-ratio stays below ``log(1 / alpha)`` and the gradient stays bounded
    where the student (or the teacher) gives a token almost no probability. DistiLLM's default is 0.1.
    """
    temperature = _check_temperature(temperature)
    alpha = check_number(
        "alpha", alpha, minimum=0.0, maximum=0.999, fix="alpha = 0 is the plain KL; DistiLLM uses 0.1."
    )
    _check_pair(student_logits, teacher_logits, mask)
    log_q = _log_probabilities(student_logits, temperature)
    log_p = _log_probabilities(teacher_logits, temperature)
    first, second = (log_q, log_p) if reverse else (log_p, log_q)
    skewed = second if alpha == 0 else _mixture(first, second, alpha)
    return _reduce(_kl(first, skewed), mask, reduction) * temperature**2


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024, eq. 1), averaged over positions:

        JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

    with ``p`` the teacher's and ``q`` the student's distribution (at temperature ``T``; no ``T^2``, as in
    GKD). ``beta = 0.5`` is the ordinary Jensen-Shannon divergence, at most ``log 2``; in general
    ``0 <= JSD(beta) <= -beta log beta - (1 - beta) log(1 - beta)``. At ``beta = 0`` it is defined as
    :func:`forward_kl` and at ``beta = 1`` as :func:`reverse_kl` (GKD's code; the formula itself goes to 0
    at both ends, like ``beta KL(p || q)`` and ``(1 - beta) KL(q || p)``).
    """
    temperature = _check_temperature(temperature)
    beta = check_number(
        "beta",
        beta,
        minimum=0.0,
        maximum=1.0,
        fix="0 is forward KL, 1 reverse KL, 0.5 the Jensen-Shannon divergence.",
    )
    _check_pair(student_logits, teacher_logits, mask)
    log_q = _log_probabilities(student_logits, temperature)
    log_p = _log_probabilities(teacher_logits, temperature)
    if beta == 0:
        per_token = _kl(log_p, log_q)
    elif beta == 1:
        per_token = _kl(log_q, log_p)
    else:
        log_m = _mixture(log_p, log_q, beta)
        per_token = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return _reduce(per_token, mask, reduction)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "forward",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """One of :data:`DIVERGENCES` by name: ``"forward"`` (:func:`forward_kl`), ``"reverse"``
    (:func:`reverse_kl`), ``"jsd"`` (:func:`generalized_jsd` with ``beta``), ``"skew-forward"`` and
    ``"skew-reverse"`` (:func:`skew_kl` with ``alpha``)."""
    check_choice("divergence", divergence, DIVERGENCES)
    common = {"temperature": temperature, "mask": mask, "reduction": reduction}
    if divergence == "forward":
        return forward_kl(student_logits, teacher_logits, **common)
    if divergence == "reverse":
        return reverse_kl(student_logits, teacher_logits, **common)
    if divergence == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta=beta, **common)
    return skew_kl(
        student_logits, teacher_logits, alpha=alpha, reverse=divergence == "skew-reverse", **common
    )


# --------------------------------------------------------------------------------------------------------
# The distillers
# --------------------------------------------------------------------------------------------------------


def _check_weights(alpha: float) -> float:
    return check_number(
        "alpha",
        alpha,
        minimum=0.0,
        maximum=1.0,
        fix="alpha weighs the cross-entropy with the data; 0 is pure distillation.",
    )


class TokenKD(Distiller):
    """Token-level KD on the training data: ``alpha * CE(targets) + (1 - alpha) * D(p, q)`` at every scored
    position, ``D`` chosen by ``divergence`` (:func:`token_divergence`).

    ``forward(inputs, targets)``: ``inputs`` and ``targets`` are token ids ``(N, L)``
    (:class:`kdbook_utils.text.TokenLoader`); returns the student's logits ``(N, L, V)`` and the weighted
    terms ``{"ce": ..., "kd": ...}`` (``"ce"`` only when ``alpha > 0``). The teacher is frozen; its logits
    come from :meth:`~kdbook_utils.train.Distiller.teacher_outputs` (so a cache of them can serve them).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        divergence: str = "forward",
        temperature: float = 1.0,
        alpha: float = 0.0,
        beta: float = 0.5,
        skew: float = 0.1,
    ) -> None:
        super().__init__(student, teacher)
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        self.temperature = _check_temperature(temperature)
        self.alpha = _check_weights(alpha)
        self.beta = check_number("beta", beta, minimum=0.0, maximum=1.0)
        self.skew = check_number("skew", skew, minimum=0.0, maximum=0.999)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, temperature={self.temperature}, alpha={self.alpha}"

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_logits = self.teacher_outputs(inputs, targets).logits.detach()
        student_logits = self.student(inputs)
        kd = token_divergence(
            student_logits,
            teacher_logits,
            self.divergence,
            temperature=self.temperature,
            beta=self.beta,
            alpha=self.skew,
            mask=target_mask(targets),
        )
        losses = {"kd": (1.0 - self.alpha) * kd}
        if self.alpha > 0:
            losses = {"ce": self.alpha * F.cross_entropy(*per_position(student_logits, targets)), **losses}
        return student_logits, losses


@torch.no_grad()
def teacher_sequences(
    teacher: nn.Module,
    documents: Tensor,
    prompt_length: int,
    *,
    bos_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 512,
) -> Tensor:
    """Sequence-level KD's training text (Kim and Rush 2016): each document's first ``prompt_length``
    tokens, continued to the document's length by the teacher.

    Kim and Rush decode the teacher with beam search (an approximation of its most likely output) and
    train the student on the result with cross-entropy. Here the continuation is sampled at
    ``temperature`` (``0``: greedy decoding, the closest to their beam search), because a language of
    many equally good continuations has no single right one. Returns int64 documents shaped like
    ``documents``, on the teacher's device; the draws come from a generator seeded with ``seed``.
    """
    if not isinstance(documents, Tensor) or documents.dim() != 2:
        raise ValueError(must_be("documents", "token ids of shape (N, L)", documents))
    length = documents.shape[1]
    check_int(
        "prompt_length",
        prompt_length,
        minimum=0,
        maximum=length - 1,
        fix="The teacher must write at least one token of each document.",
    )
    device = next(teacher.parameters()).device
    generator = torch.Generator(device=device).manual_seed(check_int("seed", seed, minimum=0))
    parts = []
    for start in range(0, len(documents), batch_size):
        prompts = documents[start : start + batch_size, :prompt_length].to(device)
        parts.append(
            generate(
                teacher,
                prompts,
                length - prompt_length,
                bos_id=bos_id,
                temperature=temperature,
                top_k=top_k,
                generator=generator,
            )
        )
    return torch.cat(parts)


class OnPolicyKD(Distiller):
    """On-policy distillation (GKD, Agarwal et al. 2024): the student learns on text it wrote itself.

    For each batch, with probability ``on_policy`` (GKD's ``lambda``; 1 here by default), the first
    ``prompt_length`` tokens of every document are continued by the *student* (sampled at
    ``sample_temperature``, without gradient); the teacher scores the result, and the loss is the divergence
    ``D(p, q)`` (default reverse KL, as MiniLLM and GKD's on-policy runs) at every position of the
    continuation. Otherwise the batch's own text is used (as :class:`TokenKD`). The student thus practises
    where its own mistakes lead it, which training on fixed text never shows it ("exposure bias").

    ``forward`` returns the student's logits on the batch's *data* (so that the accuracy ``fit`` logs is
    on the training text, as for every other method) and ``{"kd": loss}``. The teacher always runs (a cache
    of its outputs on the data would not fit the samples). The draws come from a generator seeded with
    ``seed``, so a run is repeatable.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        prompt_length: int,
        bos_id: int,
        divergence: str = "reverse",
        temperature: float = 1.0,
        sample_temperature: float = 1.0,
        on_policy: float = 1.0,
        beta: float = 0.5,
        skew: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(student, teacher)
        self.prompt_length = check_int("prompt_length", prompt_length, minimum=0)
        self.bos_id = check_int("bos_id", bos_id, minimum=0)
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        self.temperature = _check_temperature(temperature)
        self.sample_temperature = check_number(
            "sample_temperature",
            sample_temperature,
            above=0.0,
            fix="1 samples from the student's own distribution.",
        )
        self.on_policy = check_number(
            "on_policy",
            on_policy,
            minimum=0.0,
            maximum=1.0,
            fix="GKD's lambda: 1 always samples, 0 never (then it is TokenKD).",
        )
        self.beta = check_number("beta", beta, minimum=0.0, maximum=1.0)
        self.skew = check_number("skew", skew, minimum=0.0, maximum=0.999)
        self.seed = check_int("seed", seed, minimum=0)
        self._generator: torch.Generator | None = None

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, prompt_length={self.prompt_length}, "
            f"on_policy={self.on_policy}, sample_temperature={self.sample_temperature}"
        )

    def use_teacher_cache(self, source: object) -> None:
        if source is not None:
            raise ValueError(
                "OnPolicyKD scores the student's own samples, which no cache of the teacher's "
                "outputs on the data holds; train it without a teacher cache."
            )
        super().use_teacher_cache(None)

    def _draws(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        length = targets.shape[1]
        if self.prompt_length >= length:
            raise ValueError(
                must_be(
                    "prompt_length",
                    f"shorter than the documents ({length} tokens)",
                    self.prompt_length,
                    "The student must write at least one token.",
                )
            )
        generator = self._draws(inputs.device)
        sample = bool(torch.rand((), device=inputs.device, generator=generator) < self.on_policy)
        if not sample:
            teacher_logits = self.teacher_outputs(inputs, targets).logits.detach()
            student_logits = self.student(inputs)
            mask = target_mask(targets)
            data_logits = student_logits
        else:
            written = generate(
                self.student,
                targets[:, : self.prompt_length],
                length - self.prompt_length,
                bos_id=self.bos_id,
                temperature=self.sample_temperature,
                generator=generator,
            )
            own_inputs = shift_right(written, self.bos_id)
            with torch.no_grad():
                teacher_logits = self.teacher(own_inputs).detach()
                data_logits = self.student(inputs)
            student_logits = self.student(own_inputs)
            mask = torch.zeros_like(written, dtype=torch.bool)
            mask[:, self.prompt_length :] = True  # the positions that predicted the student's tokens
        kd = token_divergence(
            student_logits,
            teacher_logits.to(student_logits.dtype),
            self.divergence,
            temperature=self.temperature,
            beta=self.beta,
            alpha=self.skew,
            mask=mask,
        )
        return data_logits, {"kd": kd}
