"""The synthetic language of lesson 5 (kdbook_utils.text): its exact next-token distribution against counts
of sampled text, the rules it encodes (topics, agreement, ambiguity), sampling, and the token batches."""

from __future__ import annotations

import math

import pytest
import torch

from kdbook_utils.text import (
    BOS,
    TokenLoader,
    language_splits,
    make_language,
    shift_right,
)


@pytest.fixture(scope="module")
def language():
    return make_language(0)


def probabilities_after(language, text: str) -> dict[str, float]:
    """The true distribution of the token after ``text`` (a prefix), as {word: probability}."""
    tokens = language.encode(text + " .")  # any token: only the prefix's row is read
    row = language.next_token_probabilities(tokens)[len(text.split())]
    return {word: float(row[index]) for index, word in enumerate(language.vocabulary)}


def test_every_true_next_token_distribution_sums_to_one_and_never_predicts_bos(language) -> None:
    documents = language.sample(200, 24, seed=3)
    probabilities = language.next_token_probabilities(documents)
    assert probabilities.shape == (200, 24, language.vocab_size)
    assert torch.allclose(probabilities.sum(-1), torch.ones(200, 24, dtype=torch.float64))
    assert float(probabilities[..., language.bos_id].abs().max()) == 0.0


def test_a_document_s_probability_is_the_product_of_its_next_token_probabilities(language) -> None:
    documents = language.sample(50, 16, seed=4)
    rows = language.next_token_probabilities(documents).gather(2, documents.unsqueeze(2)).squeeze(2)
    assert torch.allclose(language.log_probability(documents), rows.log().sum(dim=1))
    assert bool(language.is_grammatical(documents).all()), "every sampled document is grammatical"


@pytest.mark.parametrize("prefix_length", [0, 1, 2, 4])
def test_the_true_distribution_matches_the_frequencies_of_sampled_text(language, prefix_length: int) -> None:
    """Sample many documents, keep those that start with the most frequent prefix of this length, and count
    the token after it: every frequency must lie within 4.5 binomial standard deviations of the true
    probability of that token after that prefix."""
    documents = language.sample(60_000, prefix_length + 1, seed=11)
    if prefix_length:
        prefixes, counts = documents[:, :prefix_length].unique(dim=0, return_counts=True)
        prefix = prefixes[counts.argmax()]
        documents = documents[(documents[:, :prefix_length] == prefix).all(dim=1)]
    kept = len(documents)
    assert kept >= 300, f"too few documents share the most frequent prefix ({kept})"
    observed = torch.bincount(documents[:, -1], minlength=language.vocab_size).double() / kept
    truth = language.next_token_probabilities(documents[:1])[0, -1]
    spread = (truth * (1 - truth) / kept).sqrt().clamp_min(1 / kept)
    worst = float(((observed - truth).abs() / spread).max())
    assert worst < 4.5, f"a frequency is {worst:.1f} standard deviations from the truth ({kept} documents)"


def test_the_true_distributions_average_to_the_frequencies_at_every_position(language) -> None:
    """Averaged over sampled prefixes, p(x_t | x_<t) is the frequency of x_t at position t."""
    documents = language.sample(20_000, 12, seed=12)
    mean_prediction = language.next_token_probabilities(documents).mean(dim=0)  # (L, V)
    for position in range(12):
        observed = torch.bincount(documents[:, position], minlength=language.vocab_size).double() / 20_000
        spread = (observed * (1 - observed) / 20_000).sqrt().clamp_min(1 / 20_000)
        worst = float(((observed - mean_prediction[position]).abs() / spread).max())
        assert worst < 5, f"position {position}: {worst:.1f} standard deviations"


def test_the_grammar_s_rules(language) -> None:
    grammatical = language.is_grammatical
    ok = [
        "the cow that the hens see sleeps .",
        "some sheep sleep .",
        "a fish sees the boats .",
        "the old small dog runs . the cat likes a bus .",
    ]
    wrong = [
        "the cow that the hens sees sleeps .",  # the inner verb agrees with the inner subject
        "the cow that the hens see sleep .",  # the outer verb agrees with the outer subject
        "a cows sleep .",  # "a" is singular
        "some cow sleeps .",  # "some" is plural
        "the cow sleeps . the fish swims .",  # an unknown word would fail encode; here: topic change
        "the old small red cow sleeps .",  # at most two adjectives
        "the cow . sleeps",
    ]
    for text in ok:
        assert bool(grammatical(language.encode(text).unsqueeze(0))), text
    for text in wrong[:4] + wrong[5:]:
        assert not bool(grammatical(language.encode(text).unsqueeze(0))), text
    with pytest.raises(ValueError, match="'swims'"):
        language.encode(wrong[4])
    assert not bool(grammatical(language.encode("the cow sleeps . the fish sleeps .").unsqueeze(0)))


def test_topics_agreement_and_ambiguity_shape_the_next_token(language) -> None:
    start = probabilities_after(language, "the")
    for noun in ("cow", "fish", "cat"):  # a document's first noun can come from any topic: several modes
        assert start[noun] > 0.01, noun
    farm = probabilities_after(language, "the cow sleeps . the")
    assert farm["hen"] > 0 and farm["fish"] == 0 and farm["cat"] == 0, "the topic persists"
    sheep = probabilities_after(language, "the sheep")
    assert sheep["sleeps"] > 0 and sheep["sleep"] > 0, "'the sheep' is singular or plural"
    cow = probabilities_after(language, "the cow")
    assert cow["sleeps"] > 0.01 and cow["sleep"] == 0
    relative = probabilities_after(language, "the cow that the hens see")
    assert relative["sleeps"] > 0.01 and relative["sleep"] == 0, "agreement across the relative clause"
    assert probabilities_after(language, "the cow sleeps")["."] == 1.0


def test_an_impossible_prefix_has_probability_zero_and_no_distribution_after_it(language) -> None:
    tokens = language.encode("a cows sleep . the")
    assert language.log_probability(tokens) == -math.inf
    rows = language.next_token_probabilities(tokens)
    assert torch.isfinite(rows[:2]).all() and rows[2:].isnan().all()


def test_sampling_is_repeatable_and_the_seed_matters(language) -> None:
    assert torch.equal(language.sample(20, 10, seed=5), language.sample(20, 10, seed=5))
    assert not torch.equal(language.sample(20, 10, seed=5), language.sample(20, 10, seed=6))
    other = make_language(1)
    assert other.vocabulary == language.vocabulary and other.digest() != language.digest()
    assert make_language(0).digest() == language.digest()
    assert torch.equal((other.transitions > 0), (language.transitions > 0)), "same grammar, other weights"


def test_the_splits_are_drawn_separately(language) -> None:
    splits = language_splits(language, train=100, val=50, test=50, length=12, seed=0)
    assert splits.train.shape == (100, 12) and splits.val.shape == (50, 12)
    assert not torch.equal(splits.val, splits.test[:50])
    assert torch.equal(splits.subset(30).train, splits.train[:30])
    assert torch.equal(language_splits(language, train=100, val=50, test=50, length=12).test, splits.test)


def test_text_round_trips_and_unknown_words_are_named(language) -> None:
    text = "the old cow that some hens follow sleeps ."
    assert language.decode(language.encode(text)) == text
    assert language.decode(language.encode(text).unsqueeze(0)) == [text]
    assert language.vocabulary[language.bos_id] == BOS
    with pytest.raises(ValueError, match="'unicorn'"):
        language.encode("the unicorn sleeps")
    with pytest.raises(ValueError, match="token ids in 0..58"):
        language.decode([0, 99])


def test_the_entropy_rate_is_the_mean_entropy_of_the_true_distributions(language) -> None:
    documents = language.sample(100, 16, seed=2)
    rows = language.next_token_probabilities(documents)
    entropy = -(rows * rows.clamp_min(1e-300).log()).sum(-1).mean()
    assert language.entropy_rate(documents) == pytest.approx(float(entropy))
    assert 0.5 < language.entropy_rate(documents) < math.log(language.vocab_size)


def test_token_batches_predict_each_token_from_the_tokens_before_it(language) -> None:
    documents = language.sample(10, 6, seed=0)
    loader = TokenLoader(documents, 4, bos_id=language.bos_id, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    inputs, targets = batches[0]
    assert torch.equal(targets, documents[:4])
    assert torch.equal(inputs[:, 0], torch.full((4,), language.bos_id))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(shift_right(documents, language.bos_id)[4:8], batches[1][0])


def test_a_shuffling_loader_is_repeatable_per_epoch(language) -> None:
    documents = language.sample(40, 5, seed=0)
    first = [
        targets for _, targets in TokenLoader(documents, 8, bos_id=0, shuffle=True, seed=3, device="cpu")
    ]
    again = TokenLoader(documents, 8, bos_id=0, shuffle=True, seed=3, device="cpu")
    assert all(torch.equal(a, b) for a, (_, b) in zip(first, again))
    second_epoch = [targets for _, targets in again]  # the loader's second epoch
    assert not all(torch.equal(a, b) for a, b in zip(first, second_epoch)), "each epoch has its own order"
    assert sorted(map(tuple, torch.cat(first).tolist())) == sorted(map(tuple, documents.tolist()))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: TokenLoader(torch.zeros(4, 3), 2, bos_id=0), "int64 tensor of shape"),
        (lambda: TokenLoader(torch.zeros(4, 3, dtype=torch.int64), 0, bos_id=0), "batch_size"),
        (lambda: make_language(-1), "seed"),
        (lambda: make_language(0).sample(0, 4), "count"),
        (lambda: language_splits(make_language(0), train=0, val=1, test=1, length=4), "train"),
        (
            lambda: make_language(0).next_token_probabilities(torch.zeros(2, 2, 2, dtype=torch.int64)),
            "(N, L)",
        ),
        (lambda: make_language(0).log_probability(torch.tensor([[1, -100]])), "Padding"),
    ],
)
def test_bad_input_is_refused_with_the_value_and_the_fix(call, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        call()
