"""The fused attention pair (``functional.attention``): forward and backward against float64
math on the same rounded inputs, on NumPy and CuPy (on the GPU, float16/bfloat16 with head dim
16/32/64 run ``raw_kernels/attention.cu``; the other cases the batched-product path), ragged
lengths across the kernels' 64-row blocks, causal or not, the pool poisoned before each launch;
misaligned and strided inputs; errors."""
import math

import numpy as np
import pytest

import cudrop
import cudrop.functional as F
from cudrop import backend
from cudrop.autograd import Tensor, check_grad
from conftest import low_precision_dtype, poison_pool


def host(a):
    return backend.asnumpy(a)


def _reference(qkv, g, h, causal):
    """float64 output and qkv gradient."""
    b, t, d3 = qkv.shape
    hd = d3 // 3 // h
    q, k, v = qkv.reshape(b, t, 3, h, hd).transpose(2, 0, 3, 1, 4)
    s = q @ k.swapaxes(-1, -2) / math.sqrt(hd)
    if causal:
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, h * hd)
    go = g.reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    gv = p.swapaxes(-1, -2) @ go
    gp = go @ v.swapaxes(-1, -2)
    gs = p * (gp - (gp * p).sum(-1, keepdims=True)) / math.sqrt(hd)
    gq, gk = gs @ k, gs.swapaxes(-1, -2) @ q
    return y, np.stack([gq, gk, gv]).transpose(1, 3, 0, 2, 4).reshape(b, t, d3)


TOL = {"float16": 6e-3, "bfloat16": 4e-2, "float32": 1e-5, "float64": 1e-12}
# (batch, length, heads, head dim): lengths 1, below, at and across the 64-row blocks (197:
# ViT's 14 x 14 patches + 1); head dim 24 has no kernel (the product path on the GPU too)
SHAPES = [(2, 1, 2, 16), (1, 17, 3, 32), (2, 64, 2, 64), (1, 130, 2, 16), (1, 197, 2, 64),
          (3, 5, 1, 24)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_attention_pair_matches_float64(xp, dtype, shape, causal):
    dt = low_precision_dtype(xp, dtype)
    b, t, h, hd = shape
    rng = np.random.default_rng(sum(shape) + causal)
    qkv = xp.asarray((1.5 * rng.standard_normal((b, t, 3 * h * hd))).astype(np.float32)).astype(dt)
    g = xp.asarray(rng.standard_normal((b, t, h * hd)).astype(np.float32)).astype(dt)
    y64, gqkv64 = _reference(host(qkv).astype(np.float64), host(g).astype(np.float64), h, causal)
    poison_pool(xp)
    y, saved = F.attention(qkv, h, causal=causal)
    poison_pool(xp)
    gqkv = F.attention_backward(g, saved)
    tol = TOL[dtype]
    for got, want in ((y, y64), (gqkv, gqkv64)):
        assert got.dtype == dt and got.shape == want.shape
        got = host(got).astype(np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_attention_reads_misaligned_and_strided_inputs(xp, dtype):
    """A qkv view at an odd element offset (not 16-byte aligned) and a strided one (every
    other row) give the contiguous input's results."""
    dt = low_precision_dtype(xp, dtype)
    b, t, h, hd = 2, 70, 2, 32
    rng = np.random.default_rng(0)
    flat = xp.asarray(rng.standard_normal(b * t * 3 * h * hd * 2 + 1).astype(np.float32)).astype(dt)
    for qkv in (flat[1:1 + b * t * 3 * h * hd].reshape(b, t, 3 * h * hd),
                flat[:-1].reshape(b, 2 * t, 3 * h * hd)[:, ::2]):
        g = xp.ones((b, t, h * hd), dt)
        y, saved = F.attention(qkv, h, causal=True)
        want_y, want_g = F.attention(xp.array(qkv), h, causal=True)
        np.testing.assert_array_equal(host(y), host(want_y))
        np.testing.assert_array_equal(host(F.attention_backward(g, saved)),
                                      host(F.attention_backward(g, want_g)))


def test_attention_op_gradients(xp):
    """The Tensor op (``cudrop.attention``) against finite differences (float64)."""
    qkv = xp.asarray(np.random.default_rng(1).standard_normal((2, 5, 12)))
    for causal in (False, True):
        check_grad(lambda a: cudrop.attention(a, 2, causal=causal), qkv)


@pytest.mark.parametrize("qkv, heads, match", [
    (np.zeros((2, 3, 7)), 1, "3 \\* dim"), (np.zeros((2, 9)), 1, "3 \\* dim"),
    (np.zeros((2, 3, 12)), 3, "divisible by num_heads"),
    (np.zeros((2, 3, 12)), 0, "positive int"), (np.zeros((2, 3, 12)), True, "positive int"),
    (np.zeros((2, 3, 12), np.int32), 2, "float array")])
def test_attention_rejects_bad_input(qkv, heads, match):
    with pytest.raises((ValueError, TypeError), match=match):
        F.attention(qkv, heads)


def test_attention_backward_rejects_a_wrong_gradient_shape():
    _, saved = F.attention(np.zeros((1, 2, 6)), 1)
    with pytest.raises(ValueError, match="output's shape"):
        F.attention_backward(np.zeros((1, 2, 3)), saved)


def test_attention_flops_are_counted_once(xp):
    """Forward counts its two products (4 B H T² hd FLOPs), backward its four, on either path
    (the product path's matmuls count themselves; the kernel path counts for them)."""
    from cudrop import flops
    b, t, h, hd = 2, 9, 2, 16
    qkv = xp.asarray(np.random.default_rng(0).standard_normal((b, t, 3 * h * hd)).astype(np.float32))
    qkv = qkv.astype(np.float16)
    with flops.count() as c:
        y, saved = F.attention(qkv, h)
    assert c.total == 4 * b * h * t * t * hd
    with flops.count() as c:
        F.attention_backward(y, saved)
    assert c.total == 8 * b * h * t * t * hd
