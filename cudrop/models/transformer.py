"""Pre-LN transformer blocks, a character-level GPT and a small ViT.

Where ``dropout=`` acts: every kind drops the MLP's hidden units on their way into its second
Linear (``nn.dropped_linear``: SliceOut and SparseDrop shrink that GEMM). SliceOut also slices
attention heads (only kept heads are projected and attended). Plain 'dropout' additionally
drops attention probabilities, embeddings and both residual branches, as GPT-2 does; the
structured kinds leave those dense, since they have no work to skip there.
"""
from __future__ import annotations

import numpy as np

from .. import autograd as ag
from .. import nn
from ..nn.init import normal, rng_of


def _elementwise(kind):
    """The kind used at embedding, residual and attention-probability positions."""
    return kind if kind == "dropout" else "none"


class TransformerBlock(nn.Module):
    """Pre-LN block on (B, T, dim): ``x = x + attn(ln1(x))``, then ``x + mlp(ln2(x))``, with
    ``heads`` attention heads (``causal`` hides future positions) and ``mlp`` = Linear(dim,
    mlp_ratio * dim), GELU, Linear back to dim. Every ``dropout`` kind drops the MLP's hidden
    units; 'dropout' also the attention probabilities and both residual branches, 'sliceout'
    (p > 0) also whole attention heads."""

    def __init__(self, dim, heads, *, causal, mlp_ratio=4, dropout="dropout", p=0.0, rng=None,
                 dtype=np.float32):
        super().__init__()
        elementwise = _elementwise(dropout)
        self.ln1 = nn.LayerNorm(dim, dtype=dtype)
        if dropout == "sliceout" and p > 0:
            self.attn = nn.SliceOutMultiHeadAttention(dim, heads, p, causal=causal, rng=rng,
                                                      dtype=dtype)
        else:
            self.attn = nn.MultiHeadAttention(dim, heads, causal=causal, dropout=elementwise, p=p,
                                              rng=rng, dtype=dtype)
        self.drop1 = nn.make_dropout(elementwise, p)
        self.ln2 = nn.LayerNorm(dim, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim, rng=rng, dtype=dtype), nn.GELU(),
                                 nn.dropped_linear(dropout, mlp_ratio * dim, dim, p, rng=rng,
                                                   dtype=dtype))
        self.drop2 = nn.make_dropout(elementwise, p)

    def forward(self, x):
        x = x + self.drop1(self.attn(self.ln1(x)))
        return x + self.drop2(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer over token ids (B, T) -> logits (B, T, vocab)."""

    def __init__(self, vocab_size, block_size=64, dim=128, depth=4, heads=4, dropout="dropout",
                 p=0.0, seed=0, dtype=np.float32):
        super().__init__()
        rng = rng_of(seed)
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, dim, rng=rng, dtype=dtype)
        self.pos = nn.Embedding(block_size, dim, rng=rng, dtype=dtype)
        self.drop = nn.make_dropout(_elementwise(dropout), p)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, causal=True, dropout=dropout,
                                                       p=p, rng=rng, dtype=dtype)
                                      for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, dtype=dtype)
        self.head = nn.Linear(dim, vocab_size, bias=False, rng=rng, dtype=dtype)
        nn.number_layers(self, seed)

    def forward(self, idx):
        idx = idx.data if isinstance(idx, ag.Tensor) else idx
        if idx.ndim != 2 or idx.shape[1] > self.block_size:
            raise ValueError(f"GPT expects token ids of shape (batch, time <= {self.block_size}), "
                             f"got {idx.shape}")
        xp = ag.Tensor(idx).xp
        x = self.tok(idx) + self.pos(xp.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(self.drop(x))))


class ViT(nn.Module):
    """Vision transformer: non-overlapping patches -> linear embedding + class token ->
    transformer blocks -> head on the class token."""

    def __init__(self, image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=64,
                 depth=4, heads=4, mlp_ratio=2, dropout="dropout", p=0.0, seed=0,
                 dtype=np.float32):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        rng = rng_of(seed)
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        n = (image_size // patch_size) ** 2
        self.embed = nn.Linear(in_channels * patch_size ** 2, dim, rng=rng, dtype=dtype)
        self.cls = nn.Parameter(normal(rng, (1, 1, dim), 0.02, dtype))
        self.pos = nn.Parameter(normal(rng, (1, n + 1, dim), 0.02, dtype))
        self.drop = nn.make_dropout(_elementwise(dropout), p)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, causal=False,
                                                       mlp_ratio=mlp_ratio, dropout=dropout, p=p,
                                                       rng=rng, dtype=dtype)
                                      for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, dtype=dtype)
        self.head = nn.Linear(dim, num_classes, rng=rng, dtype=dtype)
        nn.number_layers(self, seed)

    def forward(self, x):
        x = ag.as_tensor(x)
        b, c, h, w = x.shape
        if (c, h, w) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ViT expects images of shape (batch, {self.in_channels}, "
                             f"{self.image_size}, {self.image_size}), got {x.shape}")
        p, g = self.patch_size, self.image_size // self.patch_size
        patches = ag.reshape(ag.transpose(ag.reshape(x, (b, c, g, p, g, p)), (0, 2, 4, 1, 3, 5)),
                             (b, g * g, c * p * p))
        cls = self.cls + ag.Tensor(x.xp.zeros((b, 1, 1), x.dtype))  # broadcast over the batch
        z = ag.concat([cls, self.embed(patches)], axis=1) + self.pos
        z = self.ln(self.blocks(self.drop(z)))
        return self.head(z[:, 0])
