"""A small decoder-only transformer (GPT-style) and sampling from it: the language models of lesson 5.

``create_model("tiny_gpt", vocab_size, context=32, width=64, layers=2, heads=4)`` reads token ids
``(N, L)`` and returns next-token logits ``(N, L, vocab_size)``: the output at position ``t`` depends on
tokens ``0 .. t`` only (causal self-attention, PyTorch's ``scaled_dot_product_attention`` with
``is_causal=True``). The layout, top to bottom:

===========  =====================================================  ===========  ==============
stage        what it does                                           output       feature point?
===========  =====================================================  ===========  ==============
embed        token embedding + learned position embedding           N x L x D    yes
block1 ...   pre-norm transformer block: x + attn(LN(x)), then      N x L x D    yes
             x + MLP(LN(x)) (MLP: D -> 4D -> D with GELU)
norm         final LayerNorm                                        N x L x D    no
head         Linear(D, vocab_size): the next-token logits           N x L x V    no
===========  =====================================================  ===========  ==============

:func:`generate` samples continuations (temperature, optional top-k), one token at a time.
``GPT_FAMILY`` names the lesson's teacher and students.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdbook_utils.errors import Seen, check_int, check_number, must_be
from kdbook_utils.models import register_model

__all__ = ["GPT_FAMILY", "TinyGPT", "generate", "tiny_gpt"]

GPT_FAMILY: dict[str, dict[str, int]] = {
    "gpt-1x32": {"layers": 1, "width": 32, "heads": 2},
    "gpt-2x32": {"layers": 2, "width": 32, "heads": 2},
    "gpt-2x64": {"layers": 2, "width": 64, "heads": 4},
    "gpt-4x128": {"layers": 4, "width": 128, "heads": 4},
}
"""Named members, smallest first: ``create_model("tiny_gpt", vocab, context=L, **GPT_FAMILY[name])``."""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` sees positions ``0 .. t`` only."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = (
            part.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for part in self.qkv(x).split(width, dim=2)
        )
        mixed = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(mixed.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc=nn.Linear(width, 4 * width),
                gelu=nn.GELU(),
                proj=nn.Linear(4 * width, width),
                drop=nn.Dropout(dropout),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Embedding(nn.Module):
    """Token embedding plus a learned embedding of each position (GPT-2's)."""

    def __init__(self, vocab_size: int, context: int, width: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.drop(self.tokens(tokens) + self.positions(positions))


class TinyGPT(nn.Module):
    """A decoder-only transformer over ``vocab_size`` tokens and at most ``context`` positions.

    Its children run in order: ``embed``, ``block1`` ... ``block<layers>``, ``norm``, ``head``;
    ``feature_points`` are ``embed`` and the blocks (each output ``(N, L, width)``).
    """

    def __init__(
        self, vocab_size: int, context: int, width: int, layers: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context = context
        self.embed = Embedding(vocab_size, context, width, dropout)
        for index in range(1, layers + 1):
            self.add_module(f"block{index}", Block(width, heads, dropout))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.feature_points: tuple[str, ...] = ("embed", *(f"block{index}" for index in range(1, layers + 1)))
        self.apply(_gpt2_init)

    def check_input(self, tokens: Tensor) -> None:
        """Raise a clear error unless ``tokens`` is an integer batch ``(N, L)`` of ids this model knows,
        with ``L`` at most its context (reads only the shape and dtype, and the range of the ids)."""
        name = f"The input of {getattr(self, 'arch', type(self).__name__)}"
        if not isinstance(tokens, Tensor):
            raise TypeError(must_be(name, "a tensor of token ids (N, L)", Seen(f"a {type(tokens).__name__}")))
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(
                must_be(
                    name,
                    "integer token ids (int64)",
                    Seen(f"dtype {tokens.dtype}"),
                    "A language model reads token ids, e.g. from kdbook_utils.text.TokenLoader.",
                )
            )
        if tokens.dim() != 2:
            fix = "For one sequence, add a batch dimension: tokens.unsqueeze(0)." if tokens.dim() == 1 else ""
            raise ValueError(
                must_be(name, "a 2-D batch of token ids (N, L)", Seen(f"shape {tuple(tokens.shape)}"), fix)
            )
        if tokens.shape[1] > self.context:
            raise ValueError(
                must_be(
                    name,
                    f"at most {self.context} tokens long (the model's context)",
                    Seen(f"{tokens.shape[1]} tokens"),
                    "Cut the sequence, or create the model with a larger context=.",
                )
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                must_be(
                    name,
                    f"token ids in 0..{self.vocab_size - 1}",
                    Seen(f"ids from {int(tokens.min())} to {int(tokens.max())}"),
                    "Padding (-100) belongs in the targets only, never in the inputs.",
                )
            )

    def forward(self, tokens: Tensor) -> Tensor:
        self.check_input(tokens)
        x = self.embed(tokens)
        for name in self.feature_points[1:]:
            x = getattr(self, name)(x)
        return self.head(self.norm(x))


def _gpt2_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model("tiny_gpt")
def tiny_gpt(
    num_classes: int,
    *,
    context: int = 32,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    dropout: float = 0.0,
) -> TinyGPT:
    """A :class:`TinyGPT` whose vocabulary has ``num_classes`` tokens (its output classes)."""
    check_int("tiny_gpt's context", context, minimum=1, fix="It is the longest input, e.g. 32 tokens.")
    check_int("tiny_gpt's width", width, minimum=1, fix="Use e.g. 64.")
    check_int("tiny_gpt's layers", layers, minimum=1, fix="Use e.g. 2.")
    check_int("tiny_gpt's heads", heads, minimum=1, fix="Use e.g. 4.")
    if width % heads:
        raise ValueError(
            must_be(
                "tiny_gpt's width",
                f"a multiple of heads={heads}",
                width,
                "Each head gets width / heads dimensions.",
            )
        )
    check_number("tiny_gpt's dropout", dropout, minimum=0.0, maximum=0.9)
    model = TinyGPT(num_classes, context, width, layers, heads, float(dropout))
    model.config = {"context": context, "width": width, "layers": layers, "heads": heads, "dropout": dropout}
    return model


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Tensor,
    new_tokens: int,
    *,
    bos_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each prompt by ``new_tokens`` tokens sampled from ``model``, one token at a time.

    ``prompts``: int64 ``(N, P)`` token ids without ``<bos>`` (``P`` may be 0). At each step the model
    reads ``<bos>`` and the tokens so far; the next token is drawn from ``softmax(logits / temperature)``,
    restricted to the ``top_k`` most likely tokens if given. ``temperature=0`` takes the most likely token
    (greedy decoding). Returns ``(N, P + new_tokens)``: the prompts and their continuations. The model
    runs in eval mode without gradients (its mode is restored); draws come from ``generator`` (on the
    model's device) when given. No key-value cache: each step runs the model on the whole prefix, which
    for sequences this short costs less than it saves in code.
    """
    if not isinstance(prompts, Tensor) or prompts.dim() != 2 or prompts.is_floating_point():
        raise ValueError(
            must_be(
                "prompts",
                "integer token ids of shape (N, P)",
                prompts,
                "For one prompt use prompts.unsqueeze(0); an empty prompt is torch.empty(N, 0).",
            )
        )
    check_int("new_tokens", new_tokens, minimum=1)
    check_number(
        "temperature", temperature, minimum=0.0, fix="0 is greedy decoding, 1 the model's own distribution."
    )
    if top_k is not None:
        check_int("top_k", top_k, minimum=1, fix="None keeps every token.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = prompts.to(device=device, dtype=torch.int64)
    start = torch.full((len(tokens), 1), bos_id, dtype=torch.int64, device=device)
    try:
        for _ in range(new_tokens):
            logits = model(torch.cat([start, tokens], dim=1))[:, -1].float()
            tokens = torch.cat([tokens, sample_next(logits, temperature, top_k, generator)], dim=1)
    finally:
        model.train(was_training)
    return tokens


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of ``logits`` ``(N, V)``: drawn from ``softmax(logits / T)`` (the ``top_k`` most
    likely only, if given), or the most likely one when ``temperature`` is 0. Returns ``(N, 1)``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=generator)
