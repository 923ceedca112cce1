"""A small synthetic language whose true next-token distribution is known exactly, and its token batches.

Lesson 5 distils a language model. To say how far each student is from the *truth*, not only from its
teacher, the text comes from a language we wrote ourselves: a probabilistic finite-state grammar of
English-like sentences about three topics (a farm, the sea, a town)::

    the old cow that the hens see sleeps . a farmer feeds some sheep . the big dog runs .

Every document starts afresh: a topic is drawn (hidden), then sentences follow until the document has
its length. What the grammar knows, and a model must learn from the text alone:

* **topics**: each topic has its own nouns and its own taste in adjectives and verbs, so the first nouns
  of a document say which topic it is, and the later sentences keep to it;
* **agreement**: ``a`` and ``some`` mark singular and plural, and the verb agrees with its subject,
  across a relative clause too (``the cow that the hens see sleeps``: *sleeps* agrees with *cow*, not
  with the nearer *hens*);
* **ambiguity**: ``the`` and the nouns ``sheep`` and ``fish`` are singular or plural, so after
  ``the sheep`` both ``sleeps`` and ``sleep`` are right;
* **several modes per context**: after ``the`` come a handful of likely adjectives and nouns, and at a
  document's start the nouns of all three topics; a student that keeps only the largest mode is wrong.

The grammar is a hidden-state machine: in state ``s`` it emits token ``w`` and moves to state ``s'``
with probability ``T[s, w, s']``. The probability of the next token after a prefix is exact (the forward
algorithm): keep the probability of every state given the prefix, ``b``, then

    p(next = w | prefix) = sum_s b(s) sum_s' T[s, w, s'],      b'(s') ∝ sum_s b(s) T[s, w, s'].

The word probabilities (which nouns a topic prefers, ...) are drawn from a seed, so every seed is another
dialect of the same grammar, generated the same way on every machine. The language is ours (written for
this course, MIT like the rest of the project): no corpus is downloaded or shipped.

* :func:`make_language` builds it; :class:`Language` samples documents, gives the true next-token
  distribution of every position (:meth:`Language.next_token_probabilities`), the exact probability of a
  document (:meth:`Language.log_probability`; ``-inf`` for a document the grammar rules out), and turns
  tokens into text and back;
* :func:`language_splits` draws the train, validation and test documents;
* :class:`TokenLoader` cuts documents into ``(inputs, targets)`` batches for
  :func:`kdbook_utils.train.fit`: ``inputs`` is ``<bos>`` followed by the document without its last
  token, ``targets`` the document, so position ``t`` predicts token ``t`` from the tokens before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kdbook_utils import distributed
from kdbook_utils.errors import Seen, check_int, must_be
from kdbook_utils.train import resolve_device

__all__ = [
    "BOS",
    "Language",
    "TokenLoader",
    "TokenSplits",
    "language_splits",
    "make_language",
    "shift_right",
]

BOS = "<bos>"
"""The token every model input starts with (never a target: the language gives it probability 0)."""

DETERMINERS = {"sg": ("a", "the"), "pl": ("some", "the")}
DETERMINER_WEIGHTS = {"sg": (0.45, 0.55), "pl": (0.35, 0.65)}
ADJECTIVES = ("big", "small", "old", "young", "quiet", "happy", "red")
TOPIC_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "farm": (
        ("cow", "cows"),
        ("hen", "hens"),
        ("horse", "horses"),
        ("sheep", "sheep"),
        ("farmer", "farmers"),
    ),
    "sea": (("fish", "fish"), ("boat", "boats"), ("sailor", "sailors"), ("crab", "crabs"), ("gull", "gulls")),
    "town": (("baker", "bakers"), ("cat", "cats"), ("child", "children"), ("bus", "buses"), ("dog", "dogs")),
}
INTRANSITIVE = (("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait"))
TRANSITIVE = (("sees", "see"), ("likes", "like"), ("follows", "follow"), ("feeds", "feed"))
NUMBERS = ("sg", "pl")

PLURAL = 0.4  # a noun phrase is plural with this probability
FIRST_ADJECTIVE = 0.3  # a noun phrase has an adjective ...
SECOND_ADJECTIVE = 0.15  # ... and then a second one
RELATIVE_CLAUSE = 0.25  # a subject is followed by "that ..." (the cow that the hens see ...)


def _vocabulary() -> tuple[str, ...]:
    words = [BOS, "a", "some", "the", *ADJECTIVES]
    for nouns in TOPIC_NOUNS.values():
        for pair in nouns:
            words += [form for form in pair if form not in words]
    for pair in (*INTRANSITIVE, *TRANSITIVE):
        words += list(pair)
    return (*words, "that", ".")


@dataclass(frozen=True, eq=False)
class Language:
    """A hidden-state grammar over a vocabulary (see the module's docstring); build it with
    :func:`make_language`.

    ``transitions[s, w, s']`` is the probability of emitting token ``w`` and moving from state ``s`` to
    ``s'`` (each state's row sums to 1); ``start`` is the distribution of the first state of a document.
    """

    vocabulary: tuple[str, ...]
    states: tuple[str, ...]
    transitions: Tensor  # (S, V, S) float64
    start: Tensor  # (S,) float64
    seed: int
    topics: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False)
    _by_token: Tensor = field(init=False, repr=False)  # (V, S, S): the transitions that emit each token

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {word: index for index, word in enumerate(self.vocabulary)})
        object.__setattr__(self, "_by_token", self.transitions.permute(1, 0, 2).contiguous())

    def __repr__(self) -> str:
        return (
            f"Language(seed={self.seed}, {len(self.vocabulary)} tokens, {len(self.states)} states, "
            f"topics {', '.join(self.topics)})"
        )

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def bos_id(self) -> int:
        return self._index[BOS]

    @property
    def emissions(self) -> Tensor:
        """``(S, V)``: the probability that state ``s`` emits token ``w`` (whatever state follows)."""
        return self.transitions.sum(dim=2)

    def digest(self) -> str:
        """A short checksum of the whole grammar (vocabulary, states and probabilities)."""
        hasher = hashlib.sha256("|".join(self.vocabulary).encode())
        hasher.update("|".join(self.states).encode())
        hasher.update(self.transitions.numpy().tobytes())
        hasher.update(self.start.numpy().tobytes())
        return hasher.hexdigest()[:16]

    # ---------------------------------------------------------------------------------- text and tokens

    def encode(self, text: str) -> Tensor:
        """Token ids of a text of words separated by spaces, e.g. ``"the cow sleeps ."``."""
        if not isinstance(text, str):
            raise TypeError(must_be("The text", "a string of words separated by spaces", text))
        unknown = [word for word in text.split() if word not in self._index]
        if unknown:
            raise ValueError(
                must_be(
                    "Every word",
                    "in the language's vocabulary",
                    Seen(f"unknown word(s) {unknown}"),
                    f"The vocabulary is: {' '.join(self.vocabulary)}.",
                )
            )
        return torch.tensor([self._index[word] for word in text.split()], dtype=torch.int64)

    def decode(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Text of one document (1-D ids) or of each row of a batch (2-D: a list of strings)."""
        ids = torch.as_tensor(tokens)
        if ids.dim() == 2:
            return [str(self.decode(row)) for row in ids]
        self._check_ids(ids.reshape(1, -1), "The tokens")
        return " ".join(self.vocabulary[int(index)] for index in ids)

    def _check_ids(self, tokens: Tensor, what: str) -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                must_be(
                    what,
                    "an integer tensor of token ids",
                    tokens,
                    "Make them with language.encode(...) or language.sample(...).",
                )
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                must_be(
                    what,
                    f"token ids in 0..{self.vocab_size - 1}",
                    Seen(f"ids from {int(tokens.min())} to {int(tokens.max())}"),
                    "Padding (-100) belongs in targets only; cut it off before asking the language.",
                )
            )

    # ------------------------------------------------------------------------------------------ sampling

    def sample(self, count: int, length: int, *, seed: int = 0) -> Tensor:
        """``count`` documents of ``length`` tokens, int64 ``(count, length)``, drawn from the grammar.

        The same ``seed`` gives the same documents (the draws come from a seeded CPU generator).
        """
        check_int("count", count, minimum=1)
        check_int("length", length, minimum=1)
        generator = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
        # Two draws per token, each by inverting a cumulative distribution: the token from the state's
        # emissions, then the next state given the state and the token.
        emissions = self.emissions
        token_cdf = emissions.cumsum(dim=1)
        next_cdf = (self.transitions / emissions.clamp_min(1e-300).unsqueeze(2)).cumsum(dim=2)
        state = _draw(self.start.cumsum(0).expand(count, -1), generator)
        tokens = torch.empty(count, length, dtype=torch.int64)
        for position in range(length):
            word = _draw(token_cdf[state], generator)
            tokens[:, position] = word
            state = _draw(next_cdf[state, word], generator)
        return tokens

    # ------------------------------------------------------------------------------- the exact truth

    def next_token_probabilities(self, tokens: Tensor) -> Tensor:
        """The true ``p(x_t = w | x_0 .. x_{t-1})`` for every position of every document.

        ``tokens``: int64 ``(N, L)`` (or one document ``(L,)``), without ``<bos>``. Returns float64
        ``(N, L, V)``: row ``t`` is the distribution of token ``t`` given the tokens before it (row 0: of a
        document's first token). Once a document has a token the grammar rules out, its later rows are
        NaN (there is no true distribution after an impossible prefix); see :meth:`log_probability`.
        """
        single = isinstance(tokens, Tensor) and tokens.dim() == 1
        batch = tokens.unsqueeze(0) if single else tokens
        self._check_batch(batch)
        probabilities, _ = self._forward(batch)
        return probabilities[0] if single else probabilities

    def log_probability(self, tokens: Tensor) -> Tensor:
        """``log p(x_0 .. x_{L-1})`` of each document, float64 ``(N,)``; ``-inf`` for one the grammar
        rules out (an ungrammatical document)."""
        single = isinstance(tokens, Tensor) and tokens.dim() == 1
        batch = tokens.unsqueeze(0) if single else tokens
        self._check_batch(batch)
        _, log_probability = self._forward(batch)
        return log_probability[0] if single else log_probability

    def is_grammatical(self, tokens: Tensor) -> Tensor:
        """Whether the grammar can produce each document: bool ``(N,)``."""
        return torch.isfinite(self.log_probability(tokens))

    def _check_batch(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(
                must_be(
                    "The documents",
                    "token ids of shape (N, L) or (L,)",
                    tokens if isinstance(tokens, Tensor) else Seen(type(tokens).__name__),
                )
            )
        self._check_ids(tokens, "The documents")

    def _forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The forward algorithm: next-token probabilities (N, L, V) and log p of each document (N,)."""
        count, length = tokens.shape
        emissions = self.emissions  # (S, V)
        belief = self.start.expand(count, -1).clone()  # p(state | prefix), (N, S)
        probabilities = torch.empty(count, length, self.vocab_size, dtype=torch.float64)
        log_probability = torch.zeros(count, dtype=torch.float64)
        for position in range(length):
            probabilities[:, position] = belief @ emissions
            word = tokens[:, position]
            unnormalised = torch.empty_like(belief)
            for value in word.unique().tolist():  # documents with the same token share a matrix
                rows = (word == value).nonzero().squeeze(1)
                unnormalised[rows] = belief[rows] @ self._by_token[value]
            total = unnormalised.sum(dim=1)
            log_probability += torch.log(total)  # log 0 = -inf for a token the grammar rules out
            belief = unnormalised / total.clamp_min(1e-300).unsqueeze(1)  # all zero after such a token
        impossible = ~torch.isfinite(log_probability)
        if impossible.any():  # no true distribution after an impossible prefix
            first_bad = (
                torch.isinf(probabilities.gather(2, tokens.unsqueeze(2)).squeeze(2).log()).int().argmax(1)
            )
            after = torch.arange(length).unsqueeze(0) > first_bad.unsqueeze(1)
            probabilities[impossible.unsqueeze(1) & after] = float("nan")
        return probabilities, log_probability

    def entropy_rate(self, documents: Tensor) -> float:
        """The true per-token entropy ``H(p(. | prefix))`` in nats, averaged over every position of
        ``documents`` (the lowest cross-entropy any model can reach on such text)."""
        probabilities = self.next_token_probabilities(documents)
        terms = torch.where(probabilities > 0, -probabilities * probabilities.log(), torch.zeros(()))
        return float(terms.sum(dim=-1).mean())


def _draw(cumulative: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row of ``cumulative`` (rows of cumulative probabilities), by inverting it."""
    uniform = torch.rand(cumulative.shape[0], 1, dtype=cumulative.dtype, generator=generator)
    last = cumulative.shape[1] - 1
    return (
        torch.searchsorted(cumulative.contiguous(), uniform * cumulative[:, -1:]).squeeze(1).clamp_max(last)
    )


def _dirichlet(generator: np.random.Generator, size: int, concentration: float) -> np.ndarray:
    return generator.dirichlet(np.full(size, concentration))


Edge = tuple[str, str, str, float]
"""``(state, token, next state, probability)``: one transition of the grammar."""


def _topic_edges(topic: str, rng: np.random.Generator) -> list[Edge]:
    """Every transition of one topic's grammar, its word preferences drawn from ``rng``."""
    nouns = TOPIC_NOUNS[topic]
    noun_weights = _dirichlet(rng, len(nouns), 1.0)
    adjective_weights = _dirichlet(rng, len(ADJECTIVES), 0.8)
    intransitive_weights = _dirichlet(rng, len(INTRANSITIVE), 0.8)
    transitive_weights = _dirichlet(rng, len(TRANSITIVE), 0.8)
    intransitive_share = float(rng.uniform(0.3, 0.7))
    edges: list[Edge] = []

    def name(*parts: str) -> str:
        return ":".join((topic, *parts))

    def noun_phrase(source: str, role: str, then: dict[str, str]) -> None:
        """From ``source``: a determiner, up to two adjectives and a noun; then ``then[number]``."""
        for number, share in zip(NUMBERS, (1 - PLURAL, PLURAL)):
            after_det, after_adj1, after_adj2 = (
                name(role, number, stage) for stage in ("after-det", "after-adj", "after-2-adj")
            )
            for determiner, weight in zip(DETERMINERS[number], DETERMINER_WEIGHTS[number]):
                edges.append((source, determiner, after_det, share * weight))
            form = NUMBERS.index(number)
            steps = (
                (after_det, FIRST_ADJECTIVE, after_adj1),
                (after_adj1, SECOND_ADJECTIVE, after_adj2),
                (after_adj2, 0.0, None),
            )
            for here, adjective_chance, next_state in steps:
                if next_state is not None:
                    for adjective, weight in zip(ADJECTIVES, adjective_weights):
                        edges.append((here, adjective, next_state, adjective_chance * weight))
                for pair, weight in zip(nouns, noun_weights):
                    edges.append((here, pair[form], then[number], (1 - adjective_chance) * weight))

    def verb_phrase(source: str, number: str, probability: float) -> None:
        """From ``source``: a verb agreeing with ``number``, intransitive (then ".") or transitive (then an
        object)."""
        form = NUMBERS.index(number)
        for pair, weight in zip(INTRANSITIVE, intransitive_weights):
            edges.append((source, pair[form], name("end"), probability * intransitive_share * weight))
        for pair, weight in zip(TRANSITIVE, transitive_weights):
            edges.append(
                (source, pair[form], name("object"), probability * (1 - intransitive_share) * weight)
            )

    sentence = name("sentence")
    noun_phrase(sentence, "subject", {number: name("after-subject", number) for number in NUMBERS})
    for outer in NUMBERS:
        after_subject = name("after-subject", outer)
        relative = name("relative", outer)
        edges.append((after_subject, "that", relative, RELATIVE_CLAUSE))
        verb_phrase(after_subject, outer, 1 - RELATIVE_CLAUSE)
        # the cow that [the hens] [see] sleeps: the inner subject, its verb, then the outer verb
        inner_verbs = {inner: name("relative-verb", outer, inner) for inner in NUMBERS}
        noun_phrase(relative, f"relative-subject({outer})", inner_verbs)
        for inner in NUMBERS:
            form = NUMBERS.index(inner)
            for pair, weight in zip(TRANSITIVE, transitive_weights):
                edges.append((inner_verbs[inner], pair[form], name("main-verb", outer), weight))
        verb_phrase(name("main-verb", outer), outer, 1.0)
    noun_phrase(name("object"), "object", {number: name("end") for number in NUMBERS})
    edges.append((name("end"), ".", sentence, 1.0))
    return edges


def make_language(seed: int = 0) -> Language:
    """The course's language (see the module's docstring), its word probabilities drawn from ``seed``.

    The states are named after where a sentence is, e.g. ``farm:subject:sg:after-det`` (in a farm
    document, inside a singular subject, after its determiner). Every topic is equally likely.
    """
    check_int("seed", seed, minimum=0, fix="Any non-negative integer names a dialect; the course uses 0.")
    vocabulary = _vocabulary()
    word_index = {word: index for index, word in enumerate(vocabulary)}
    rng = np.random.default_rng(seed)
    topics = tuple(TOPIC_NOUNS)
    edges = [edge for topic in topics for edge in _topic_edges(topic, rng)]
    states = list(dict.fromkeys(name for source, _, target, _ in edges for name in (source, target)))
    index = {name: position for position, name in enumerate(states)}
    transitions = torch.zeros(len(states), len(vocabulary), len(states), dtype=torch.float64)
    for source, word, target, probability in edges:
        transitions[index[source], word_index[word], index[target]] += probability
    totals = transitions.sum(dim=(1, 2))
    assert torch.allclose(totals, torch.ones_like(totals)), "every state's outgoing probabilities sum to 1"
    start = torch.zeros(len(states), dtype=torch.float64)
    for topic in topics:
        start[index[f"{topic}:sentence"]] = 1.0 / len(topics)
    return Language(vocabulary, tuple(states), transitions, start, seed, topics)


# --------------------------------------------------------------------------------------------------------
# Documents and batches
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenSplits:
    """Documents to learn from (``train``), to choose on (``val``) and for the final comparison
    (``test``): int64 ``(N, L)`` each, drawn from ``language``."""

    train: Tensor
    val: Tensor
    test: Tensor
    language: Language

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name} {len(getattr(self, name)):,}" for name in ("train", "val", "test"))
        return f"TokenSplits({sizes} documents of {self.train.shape[1]} tokens, {self.language!r})"

    def subset(self, train: int) -> TokenSplits:
        """The same splits with only the first ``train`` training documents (a student's smaller share)."""
        check_int("train", train, minimum=1, maximum=len(self.train))
        return TokenSplits(self.train[:train], self.val, self.test, self.language)


def language_splits(
    language: Language, *, train: int, val: int, test: int, length: int, seed: int = 0
) -> TokenSplits:
    """Draw ``train``, ``val`` and ``test`` documents of ``length`` tokens from ``language``, each split
    from its own seed (derived from ``seed``), so the splits never share a draw."""
    for what, value in (("train", train), ("val", val), ("test", test), ("length", length)):
        check_int(what, value, minimum=1)
    check_int("seed", seed, minimum=0)
    draws = np.random.SeedSequence([seed, language.seed]).generate_state(3)
    parts = [language.sample(count, length, seed=int(draw)) for count, draw in zip((train, val, test), draws)]
    return TokenSplits(*parts, language)


def shift_right(documents: Tensor, bos_id: int) -> Tensor:
    """The model input for ``documents``: ``<bos>`` followed by each document without its last token."""
    start = torch.full_like(documents[:, :1], bos_id)
    return torch.cat([start, documents[:, :-1]], dim=1)


class TokenLoader:
    """``(inputs, targets)`` batches of documents for :func:`kdbook_utils.train.fit`.

    ``targets`` are the documents (int64 ``(B, L)``), ``inputs`` the same shifted right behind ``<bos>``
    (:func:`shift_right`), so a causal model's output at position ``t`` predicts token ``t`` from the
    tokens before it. Batches come on ``device`` (None: the device rule,
    :func:`kdbook_utils.train.resolve_device`). With ``shuffle`` the order changes every epoch, drawn
    from ``(seed, epoch)``, so two loaders with the same seed give the same batches. Under ``torchrun`` a
    training loader gives process ``r`` of ``w`` the rows ``r, r + w, ...`` of each global batch
    (``batch_size`` must then be a multiple of ``w``); an evaluation loader gives each process a
    contiguous block.
    """

    def __init__(
        self,
        documents: Tensor,
        batch_size: int,
        *,
        bos_id: int,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(documents, Tensor) or documents.dim() != 2 or documents.dtype != torch.int64:
            raise ValueError(
                must_be(
                    "The documents",
                    "an int64 tensor of shape (N, L)",
                    documents,
                    "Draw them with kdbook_utils.text.language_splits(...).",
                )
            )
        if len(documents) == 0:
            raise ValueError(must_be("The documents", "at least one document", Seen("an empty tensor")))
        self.documents = documents
        self.batch_size = check_int("batch_size", batch_size, minimum=1, fix="Use e.g. 64.")
        self.bos_id = check_int("bos_id", bos_id, minimum=0)
        self.shuffle = bool(shuffle)
        self.seed = check_int("seed", seed, minimum=0)
        self.device = resolve_device(device)
        self.epoch = 0
        self.current_epoch: int | None = None
        self.shards = distributed.world_size() if distributed.is_active() else 1
        self.rank = distributed.rank() if self.shards > 1 else 0
        if self.shards > 1 and self.shuffle and batch_size % self.shards:
            raise ValueError(must_be("batch_size", f"a multiple of the {self.shards} processes", batch_size))
        self.local_batch_size = batch_size // self.shards if self.shuffle else batch_size

    def __repr__(self) -> str:
        return (
            f"TokenLoader({len(self.documents):,} documents of {self.documents.shape[1]} tokens, "
            f"batch_size={self.batch_size}, shuffle={self.shuffle}, seed={self.seed})"
        )

    def _positions(self, epoch: int) -> Tensor:
        count = len(self.documents)
        if self.shuffle:
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            )
            order = torch.randperm(count, generator=generator)
            return order[self.rank : count - count % self.shards : self.shards] if self.shards > 1 else order
        if self.shards > 1:
            share, extra = divmod(count, self.shards)
            start = self.rank * share + min(self.rank, extra)
            return torch.arange(start, start + share + (self.rank < extra))
        return torch.arange(count)

    def __len__(self) -> int:
        return (len(self._positions(0)) + self.local_batch_size - 1) // self.local_batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.current_epoch = epoch
        positions = self._positions(epoch)
        for start in range(0, len(positions), self.local_batch_size):
            targets = self.documents[positions[start : start + self.local_batch_size]].to(self.device)
            yield shift_right(targets, self.bos_id), targets
