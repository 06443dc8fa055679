"""Multi-head self-attention: the fused ``attention`` op (one kernel each way on the GPU for
16-bit types), or composed ops where attention probabilities are dropped."""
from __future__ import annotations

import math

import numpy as np

from .. import autograd as ag
from ..functional._attention import causal_bias
from .dropout import Identity
from .layers import Linear
from .module import Module


class MultiHeadAttention(Module):
    """Self-attention over x of shape (B, T, dim). ``causal`` hides future positions.
    ``dropout``/``p`` apply to the attention probabilities."""

    def __init__(self, dim, num_heads, *, causal=False, dropout=None, p=0.0, rng=None,
                 dtype=np.float32):
        super().__init__()
        for name, v in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.causal = dim, num_heads, causal
        self.qkv = Linear(dim, 3 * dim, rng=rng, dtype=dtype)
        self.proj = Linear(dim, dim, rng=rng, dtype=dtype)
        from .variants import make_dropout  # variants imports this module (SliceOut heads)
        self.attn_drop = make_dropout(dropout, p)

    def forward(self, x):
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MultiHeadAttention expects (batch, time, {self.dim}), got {x.shape}")
        qkv = self.qkv(x)
        if isinstance(self.attn_drop, Identity) or not self.attn_drop.is_training:
            return self.proj(ag.attention(qkv, self.num_heads, causal=self.causal))
        # dropped probabilities: the composed ops (the fused op never forms them)
        b, t, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        qkv = ag.transpose(ag.reshape(qkv, (b, t, 3, h, hd)), (2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        # the scale on q (B, H, T, hd) rather than on the scores (B, H, T, T): T / hd times
        # fewer elements (4x for GPT's T = 256, hd = 64), and exact where it is a power of 2
        s = ag.matmul(q * (1.0 / math.sqrt(hd)), ag.transpose(k, (0, 1, 3, 2)))
        if self.causal:
            s = s + causal_bias(x.xp, t, x.dtype)
        a = self.attn_drop(ag.softmax(s, axis=-1))
        y = ag.reshape(ag.transpose(ag.matmul(a, v), (0, 2, 1, 3)), (b, t, d))
        return self.proj(y)

    def extra_repr(self):
        return f"dim={self.dim}, heads={self.num_heads}, causal={self.causal}"
