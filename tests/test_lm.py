"""Lesson 5's method (kdbook_utils.methods.lm), its model (models.gpt) and token batches in the training loop.

* each divergence against a hand computation on small distributions, against SciPy, and against TRL's
  ``generalized_jsd_loss`` (GKD's own loss, when TRL is installed: the test extra installs it);
* their limits: zero for equal distributions, forward and reverse differ, the JSD's bounds, the skew's
  endpoints and bound, the JSD's limits at beta -> 0 and 1;
* gradients (the closed forms), temperatures, and masking of padding;
* the distillers: token-level KD, sequence-level KD's teacher text, on-policy KD on the student's own samples;
* the model: causal, its feature points, sampling; and ``fit``/``evaluate`` on token batches.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from torch.nn import functional as F

from kdbook_utils.features import FeatureExtractor
from kdbook_utils.methods.lm import (
    DIVERGENCES,
    OnPolicyKD,
    TokenKD,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    target_mask,
    teacher_sequences,
    token_divergence,
)
from kdbook_utils.models import create_model
from kdbook_utils.models.gpt import GPT_FAMILY, generate
from kdbook_utils.text import TokenLoader, make_language, shift_right
from kdbook_utils.train import IGNORE_INDEX, evaluate, fit, freeze, seed_everything

P = [0.5, 0.4, 0.1]  # the teacher
Q = [0.8, 0.1, 0.1]  # the student


def logits_of(*rows: list[float], temperature: float = 1.0) -> torch.Tensor:
    """Logits whose softmax at ``temperature`` is each row: ``T * log(row)``, shaped (1, rows, V)."""
    return (temperature * torch.tensor(rows, dtype=torch.float64).log()).unsqueeze(0)


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


# ----------------------------------------------------------------------------- hand computations


def test_forward_and_reverse_kl_by_hand() -> None:
    forward = 0.5 * math.log(0.5 / 0.8) + 0.4 * math.log(0.4 / 0.1) + 0.1 * math.log(0.1 / 0.1)
    backward = 0.8 * math.log(0.8 / 0.5) + 0.1 * math.log(0.1 / 0.4) + 0.1 * math.log(0.1 / 0.1)
    assert forward == pytest.approx(0.31952, abs=1e-5) and backward == pytest.approx(0.23737, abs=1e-5)
    assert float(forward_kl(logits_of(Q), logits_of(P))) == pytest.approx(forward, rel=1e-6)
    assert float(reverse_kl(logits_of(Q), logits_of(P))) == pytest.approx(backward, rel=1e-6)


def test_the_generalised_jsd_by_hand() -> None:
    mixture = [0.5 * p + 0.5 * q for p, q in zip(P, Q)]  # [0.65, 0.25, 0.1]
    expected = 0.5 * kl(P, mixture) + 0.5 * kl(Q, mixture)
    assert float(generalized_jsd(logits_of(Q), logits_of(P), beta=0.5)) == pytest.approx(expected, rel=1e-6)
    beta = 0.9
    mixture = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
    expected = beta * kl(P, mixture) + (1 - beta) * kl(Q, mixture)
    assert float(generalized_jsd(logits_of(Q), logits_of(P), beta=beta)) == pytest.approx(expected, rel=1e-6)


def test_the_skew_kls_by_hand() -> None:
    alpha = 0.1
    skewed_student = [alpha * p + (1 - alpha) * q for p, q in zip(P, Q)]  # [0.77, 0.13, 0.1]
    skewed_teacher = [alpha * q + (1 - alpha) * p for p, q in zip(P, Q)]  # [0.53, 0.37, 0.1]
    assert float(skew_kl(logits_of(Q), logits_of(P), alpha=alpha)) == pytest.approx(
        kl(P, skewed_student), rel=1e-6
    )
    assert float(skew_kl(logits_of(Q), logits_of(P), alpha=alpha, reverse=True)) == pytest.approx(
        kl(Q, skewed_teacher), rel=1e-6
    )


def test_the_temperature_softens_both_sides_and_forward_and_reverse_kl_carry_t_squared() -> None:
    # logits T log p have softmax(logits / T) = p, so at temperature T the KL is that of P and Q, times T^2
    temperature = 2.0
    student, teacher = logits_of(Q, temperature=temperature), logits_of(P, temperature=temperature)
    assert float(forward_kl(student, teacher, temperature=temperature)) == pytest.approx(
        4 * kl(P, Q), rel=1e-6
    )
    assert float(reverse_kl(student, teacher, temperature=temperature)) == pytest.approx(
        4 * kl(Q, P), rel=1e-6
    )
    assert float(generalized_jsd(student, teacher, beta=0.0, temperature=temperature)) == pytest.approx(
        kl(P, Q), rel=1e-6
    ), "GKD's JSD has no T^2"


def test_the_mean_runs_over_scored_positions_only() -> None:
    student = logits_of(Q, Q, [0.1, 0.1, 0.8])
    teacher = logits_of(P, P, P)
    targets = torch.tensor([[0, IGNORE_INDEX, 2]])
    mask = target_mask(targets)
    assert mask.tolist() == [[True, False, True]]
    expected = (kl(P, Q) + kl(P, [0.1, 0.1, 0.8])) / 2
    assert float(forward_kl(student, teacher, mask=mask)) == pytest.approx(expected, rel=1e-6)
    per_position = forward_kl(student, teacher, mask=mask, reduction="none")
    assert per_position.shape == (1, 3) and float(per_position[0, 1]) == 0.0
    nothing = torch.zeros_like(mask)
    assert float(forward_kl(student, teacher, mask=nothing)) == 0.0, "no scored position: zero, not NaN"


# ----------------------------------------------------------------------------------- peers


def random_pair(shape: tuple[int, ...] = (3, 5, 7), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2, torch.randn(shape, generator=generator) * 2


def test_the_divergences_agree_with_scipy() -> None:
    student, teacher = random_pair((4, 9), seed=1)
    p = F.softmax(teacher.double(), -1).numpy()
    q = F.softmax(student.double(), -1).numpy()
    assert float(forward_kl(student, teacher)) == pytest.approx(rel_entr(p, q).sum(-1).mean(), rel=1e-5)
    assert float(reverse_kl(student, teacher)) == pytest.approx(rel_entr(q, p).sum(-1).mean(), rel=1e-5)
    js = np.mean([jensenshannon(a, b) ** 2 for a, b in zip(p, q)])  # natural log, squared distance
    assert float(generalized_jsd(student, teacher, beta=0.5)) == pytest.approx(js, rel=1e-5)
    m = 0.1 * p + 0.9 * q
    assert float(skew_kl(student, teacher, alpha=0.1)) == pytest.approx(
        rel_entr(p, m).sum(-1).mean(), rel=1e-5
    )


def trl_generalized_jsd():
    """TRL's GKD loss (``GKDTrainer.generalized_jsd_loss``), wherever this TRL version keeps it."""
    pytest.importorskip(
        "trl", reason="TRL is not installed (the test extra installs it: pip install -e '.[test]')"
    )
    for module, name in (
        ("trl.experimental.gkd.gkd_trainer", "GKDTrainer"),
        ("trl.trainer.gkd_trainer", "GKDTrainer"),
        ("trl", "GKDTrainer"),
    ):
        try:
            return getattr(importlib.import_module(module), name).generalized_jsd_loss
        except (ImportError, AttributeError):
            continue
    pytest.fail("TRL is installed but its GKDTrainer.generalized_jsd_loss was not found: update this lookup")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_divergences_agree_with_trl_s_gkd_loss(beta: float, temperature: float) -> None:
    peer = trl_generalized_jsd()
    student, teacher = random_pair()
    labels = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = IGNORE_INDEX  # padding
    theirs = float(peer(student, teacher, labels=labels, beta=beta, temperature=temperature))
    mask = target_mask(labels)
    ours = float(generalized_jsd(student, teacher, beta=beta, temperature=temperature, mask=mask))
    assert ours == pytest.approx(theirs, rel=1e-5)
    if beta == 0.0:  # GKD's forward KL has no T^2; ours (Hinton's per-token loss) has
        assert float(forward_kl(student, teacher, temperature=temperature, mask=mask)) == pytest.approx(
            theirs * temperature**2, rel=1e-5
        )
    if beta == 1.0:
        assert float(reverse_kl(student, teacher, temperature=temperature, mask=mask)) == pytest.approx(
            theirs * temperature**2, rel=1e-5
        )


# ------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_is_zero_for_equal_distributions_and_positive_otherwise(divergence: str) -> None:
    student, teacher = random_pair()
    assert float(token_divergence(teacher, teacher, divergence)) == pytest.approx(0.0, abs=1e-6)
    assert float(token_divergence(teacher + 3.0, teacher, divergence)) == pytest.approx(0.0, abs=1e-6), (
        "a constant added to the logits changes nothing"
    )
    assert float(token_divergence(student, teacher, divergence)) > 0.01


def test_forward_and_reverse_kl_differ_and_swap_with_the_roles() -> None:
    student, teacher = random_pair()
    assert abs(float(forward_kl(student, teacher)) - float(reverse_kl(student, teacher))) > 0.01
    assert float(forward_kl(student, teacher)) == pytest.approx(float(reverse_kl(teacher, student)), rel=1e-6)
    assert float(generalized_jsd(student, teacher)) == pytest.approx(float(generalized_jsd(teacher, student)))


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.8])
def test_the_jsd_lies_between_zero_and_the_entropy_of_its_weights(beta: float) -> None:
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    student, teacher = random_pair(seed=4)
    assert 0 < float(generalized_jsd(student, teacher, beta=beta)) < bound
    apart = torch.tensor([[[40.0, 0.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 0.0, 0.0, 40.0]]])
    assert float(generalized_jsd(*apart, beta=beta)) == pytest.approx(bound, rel=1e-4), "disjoint: the bound"


def test_the_jsd_tends_to_forward_kl_and_reverse_kl_at_its_ends() -> None:
    student, teacher = (logits.double() for logits in random_pair(seed=5))
    small = 1e-5
    assert float(generalized_jsd(student, teacher, beta=small)) / small == pytest.approx(
        float(forward_kl(student, teacher)), rel=2e-3
    )
    assert float(generalized_jsd(student, teacher, beta=1 - small)) / small == pytest.approx(
        float(reverse_kl(student, teacher)), rel=2e-3
    )


def test_the_skew_kl_is_the_kl_at_zero_and_bounded_by_log_one_over_alpha() -> None:
    student, teacher = random_pair(seed=6)
    assert float(skew_kl(student, teacher, alpha=0.0)) == pytest.approx(float(forward_kl(student, teacher)))
    assert float(skew_kl(student, teacher, alpha=0.0, reverse=True)) == pytest.approx(
        float(reverse_kl(student, teacher))
    )
    apart = torch.tensor([[0.0, -60.0]]), torch.tensor([[-60.0, 0.0]])
    assert float(forward_kl(*apart)) > 50, "without skew, disjoint distributions give a huge KL"
    for alpha in (0.1, 0.5):
        assert float(skew_kl(*apart, alpha=alpha)) == pytest.approx(math.log(1 / alpha), rel=1e-4)
        assert float(skew_kl(student, teacher, alpha=alpha)) < float(
            skew_kl(student, teacher, alpha=alpha / 2)
        )


# --------------------------------------------------------------------------------------- gradients


def test_the_gradients_are_the_closed_forms() -> None:
    student, teacher = random_pair((1, 6), seed=7)
    student = student.double().requires_grad_(True)
    teacher = teacher.double()
    temperature = 3.0
    (gradient,) = torch.autograd.grad(forward_kl(student, teacher, temperature=temperature), student)
    q, p = F.softmax(student / temperature, -1), F.softmax(teacher / temperature, -1)
    assert torch.allclose(gradient, temperature * (q - p)), "d T^2 KL(p||q) / dz = T (q - p)"
    (gradient,) = torch.autograd.grad(reverse_kl(student, teacher), student)
    q, p = F.softmax(student, -1), F.softmax(teacher, -1)
    log_ratio = q.log() - p.log()
    expected = q * (log_ratio - (q * log_ratio).sum(-1, keepdim=True))
    assert torch.allclose(gradient, expected), "d KL(q||p) / dz_i = q_i (log(q_i/p_i) - KL(q||p))"


def test_no_gradient_reaches_a_masked_position() -> None:
    student, teacher = random_pair((2, 4, 5), seed=8)
    student.requires_grad_(True)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    for divergence in DIVERGENCES:
        (gradient,) = torch.autograd.grad(token_divergence(student, teacher, divergence, mask=mask), student)
        assert float(gradient[~mask].abs().max()) == 0.0 and float(gradient[mask].abs().max()) > 0, divergence


def test_bad_arguments_are_refused() -> None:
    student, teacher = random_pair()
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(student, teacher[:, :2])
    with pytest.raises(ValueError, match="mask"):
        forward_kl(student, teacher, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student, teacher, beta=1.5)
    with pytest.raises(ValueError, match="'forward', 'reverse'"):
        token_divergence(student, teacher, "kl")
    with pytest.raises(ValueError, match="float tensor"):
        forward_kl(torch.zeros(3, 4, dtype=torch.int64), teacher[0, :3, :4])


# ------------------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def language():
    return make_language(0)


def tiny(vocab: int, seed: int = 0, **options) -> torch.nn.Module:
    seed_everything(seed)
    return create_model("tiny_gpt", vocab, context=12, **{"width": 16, "layers": 2, "heads": 2, **options})


def test_the_model_is_causal() -> None:
    model = tiny(20).eval()
    tokens = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 20
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert before.shape == (3, 12, 20)
    assert torch.equal(before[:, :7], after[:, :7]), "positions before the change must not see it"
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_the_model_names_its_feature_points() -> None:
    model = tiny(20)
    assert model.feature_points == ("embed", "block1", "block2")
    with FeatureExtractor(model, model.feature_points) as extractor:
        logits, features = extractor.forward_with_features(torch.zeros(2, 5, dtype=torch.int64))
    assert logits.shape == (2, 5, 20) and all(
        features[name].shape == (2, 5, 16) for name in model.feature_points
    )


def test_the_family_runs_from_small_to_large() -> None:
    sizes = [
        sum(p.numel() for p in create_model("tiny_gpt", 59, **options).parameters())
        for options in GPT_FAMILY.values()
    ]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.zeros(2, 5), "integer token ids"),
        (torch.zeros(5, dtype=torch.int64), "unsqueeze"),
        (torch.zeros(2, 13, dtype=torch.int64), "at most 12 tokens"),
        (torch.full((2, 3), 20), "token ids in 0..19"),
    ],
)
def test_the_model_refuses_input_it_cannot_read(tokens: torch.Tensor, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        tiny(20)(tokens)


def test_a_width_that_the_heads_do_not_divide_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of heads=4"):
        create_model("tiny_gpt", 10, width=30, heads=4)


def test_sampling_keeps_the_prompt_repeats_with_a_seed_and_is_greedy_at_temperature_zero() -> None:
    model = tiny(20)
    prompts = torch.randint(1, 20, (4, 3), generator=torch.Generator().manual_seed(1))
    first = generate(model, prompts, 6, bos_id=0, generator=torch.Generator().manual_seed(5))
    again = generate(model, prompts, 6, bos_id=0, generator=torch.Generator().manual_seed(5))
    assert first.shape == (4, 9) and torch.equal(first[:, :3], prompts) and torch.equal(first, again)
    greedy = generate(model, prompts, 6, bos_id=0, temperature=0)
    tokens = prompts
    with torch.no_grad():
        for _ in range(6):
            step = model(shift_right(torch.cat([tokens, tokens[:, :1]], 1), 0))[:, -1].argmax(
                -1, keepdim=True
            )
            tokens = torch.cat([tokens, step], 1)
    assert torch.equal(greedy, tokens)
    assert torch.equal(generate(model, prompts, 6, bos_id=0, top_k=1, generator=torch.Generator()), greedy)
    assert model.training, "generate restores the model's mode"


# ------------------------------------------------------------------------------------ the distillers


def pair(vocab: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny(vocab, seed=1, width=8, layers=1), freeze(tiny(vocab, seed=2))


def test_token_kd_is_the_divergence_on_the_data_plus_the_weighted_cross_entropy(language) -> None:
    student, teacher = pair(language.vocab_size)
    targets = language.sample(4, 12, seed=0)
    targets[0, -3:] = IGNORE_INDEX
    inputs = shift_right(targets.clamp_min(0), language.bos_id)
    for divergence in DIVERGENCES:
        method = TokenKD(student, teacher, divergence=divergence, alpha=0.25)
        logits, losses = method(inputs, targets)
        expected = token_divergence(student(inputs), teacher(inputs), divergence, mask=target_mask(targets))
        assert torch.allclose(losses["kd"], 0.75 * expected)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        assert torch.allclose(losses["ce"], 0.25 * ce)
    logits, losses = TokenKD(student, teacher)(inputs, targets)
    assert set(losses) == {"kd"}, "pure distillation has no cross-entropy term"
    losses["kd"].backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.head.weight.grad is not None


def test_sequence_level_kd_writes_the_teacher_s_continuations_of_the_prompts(language) -> None:
    _, teacher = pair(language.vocab_size)
    documents = language.sample(6, 12, seed=1)
    written = teacher_sequences(teacher, documents, 4, bos_id=language.bos_id, seed=3, batch_size=4)
    assert written.shape == documents.shape and torch.equal(written[:, :4], documents[:, :4])
    assert torch.equal(
        written, teacher_sequences(teacher, documents, 4, bos_id=language.bos_id, seed=3, batch_size=4)
    )
    greedy = teacher_sequences(teacher, documents, 4, bos_id=language.bos_id, temperature=0)
    assert torch.equal(greedy, generate(teacher, documents[:, :4], 8, bos_id=language.bos_id, temperature=0))
    with pytest.raises(ValueError, match="prompt_length"):
        teacher_sequences(teacher, documents, 12, bos_id=0)


def test_on_policy_kd_scores_the_student_s_own_continuation(language) -> None:
    student, teacher = pair(language.vocab_size)
    chosen = language.encode("cow")[0]
    with torch.no_grad():  # a student that always writes "cow": its samples are known
        student.head.weight.zero_()
        student.head.bias.fill_(-30.0)
        student.head.bias[chosen] = 30.0
    targets = language.sample(3, 12, seed=2)
    inputs = shift_right(targets, language.bos_id)
    method = OnPolicyKD(student, teacher, prompt_length=5, bos_id=language.bos_id)
    logits, losses = method(inputs, targets)
    written = torch.cat([targets[:, :5], torch.full((3, 7), int(chosen))], dim=1)
    own = shift_right(written, language.bos_id)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[:, 5:] = True
    assert torch.allclose(losses["kd"], reverse_kl(student(own), teacher(own), mask=mask))
    assert torch.allclose(logits, student(inputs)), "the logits fit logs are on the data"
    losses["kd"].backward()
    assert student.head.bias.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_on_policy_kd_repeats_with_its_seed_and_is_token_kd_without_sampling(language) -> None:
    student, teacher = pair(language.vocab_size)
    targets = language.sample(4, 12, seed=3)
    inputs = shift_right(targets, language.bos_id)
    first = OnPolicyKD(student, teacher, prompt_length=2, bos_id=language.bos_id, seed=4)(inputs, targets)[1][
        "kd"
    ]
    again = OnPolicyKD(student, teacher, prompt_length=2, bos_id=language.bos_id, seed=4)(inputs, targets)[1][
        "kd"
    ]
    assert torch.equal(first, again)
    off = OnPolicyKD(student, teacher, prompt_length=2, bos_id=language.bos_id, on_policy=0.0)(
        inputs, targets
    )[1]
    data = TokenKD(student, teacher, divergence="reverse")(inputs, targets)[1]
    assert torch.allclose(off["kd"], data["kd"])
    with pytest.raises(ValueError, match="cache"):
        OnPolicyKD(student, teacher, prompt_length=2, bos_id=0).use_teacher_cache(object())
    with pytest.raises(ValueError, match="prompt_length"):
        OnPolicyKD(student, teacher, prompt_length=12, bos_id=0)(inputs, targets)


# --------------------------------------------------------------------------- token batches in fit


def test_fit_and_evaluate_score_every_target_position_but_padding(language) -> None:
    documents = language.sample(64, 12, seed=4)
    model = tiny(language.vocab_size)
    history = fit(
        model,
        TokenLoader(documents, 16, bos_id=language.bos_id, shuffle=True, device="cpu"),
        epochs=2,
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        progress=False,
        device="cpu",
    )
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    padded = documents.clone()
    padded[:, 8:] = IGNORE_INDEX
    batches = [(shift_right(documents, language.bos_id), padded)]
    scores = evaluate(model, batches, device="cpu")
    with torch.no_grad():
        logits = model(shift_right(documents, language.bos_id))[:, :8]
    assert scores["count"] == 64 * 8
    expected_loss = F.cross_entropy(logits.reshape(-1, language.vocab_size), documents[:, :8].reshape(-1))
    assert scores["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    expected_accuracy = 100 * float((logits.argmax(-1) == documents[:, :8]).double().mean())
    assert scores["accuracy"] == pytest.approx(expected_accuracy)


def test_the_training_accuracy_is_counted_per_position(language) -> None:
    documents = language.sample(32, 12, seed=5)
    padded = documents.clone()
    padded[:, 6:] = IGNORE_INDEX
    model = tiny(language.vocab_size)
    inputs = shift_right(documents, language.bos_id)
    history = fit(
        model,
        [(inputs, padded)],
        epochs=1,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        progress=False,
        device="cpu",
    )
    with torch.no_grad():
        logits = model(inputs)[:, :6]
    assert history["train_acc"].iloc[0] == pytest.approx(
        100 * float((logits.argmax(-1) == documents[:, :6]).double().mean())
    )


@pytest.mark.parametrize(
    "targets, message",
    [(torch.zeros(4, 5, dtype=torch.int64), "inputs' shape"), (torch.full((4, 6), 99), "token ids in 0..58")],
)
def test_a_token_batch_with_wrong_targets_is_refused(language, targets: torch.Tensor, message: str) -> None:
    model = tiny(language.vocab_size)
    inputs = torch.zeros(4, 6, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        fit(model, [(inputs, targets)], epochs=1, progress=False, device="cpu")
