"""Layers, containers, state_dict, attention and model builders."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import cudrop as cd
from cudrop import models, nn
from cudrop.autograd import check_grad

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _to64(m):
    return m.to(dtype=np.float64)


def test_linear_matches_formula_and_grad(xp):
    rng = np.random.default_rng(0)
    lin = _to64(nn.Linear(5, 3, rng=1)).to("gpu" if xp is not np else "cpu")
    x = xp.asarray(rng.standard_normal((4, 5)))
    y = lin(cd.Tensor(x))
    ref = x @ lin.weight.data + lin.bias.data
    assert np.allclose(cd.backend.asnumpy(y.data), cd.backend.asnumpy(ref))
    check_grad(lambda x_, w, b: (x_ @ w + b), x, lin.weight.data, lin.bias.data)


def test_linear_3d_input_matches_2d(xp):
    lin = _to64(nn.Linear(6, 4, rng=0)).to("gpu" if xp is not np else "cpu")
    x = xp.asarray(np.random.default_rng(1).standard_normal((2, 3, 6)))
    y = lin(cd.Tensor(x)).data
    ref = (x.reshape(6, 6) @ lin.weight.data + lin.bias.data).reshape(2, 3, 4)
    assert np.allclose(cd.backend.asnumpy(y), cd.backend.asnumpy(ref))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("k, n, bias", [(1, 24, True), (4, 24, True), (4, 24, False),
                                        (12, 24, True), (16, 24, True), (16, 10, True),
                                        (16, 10, False), (4, 3, True), (72, 70, True)])
def test_linear_pair_16_bit_small_k_or_n_matches_float64(xp, dtype, k, n, bias):
    """The functional linear pair with K or N not a multiple of 8 (on the GPU: x and w
    zero-padded along K, w, bias and the output gradient along N, for cuBLASLt's aligned
    kernels; K, N >= 64 are not padded) against float64 math: output and every gradient in the
    parameters' shapes, with and without a bias, outputs poisoned."""
    from conftest import low_precision_dtype, poison_pool
    import cudrop.functional as F
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(k)
    x = xp.asarray(rng.standard_normal((3, 37, k)).astype(np.float32)).astype(dt)
    w = xp.asarray(rng.standard_normal((k, n)).astype(np.float32)).astype(dt)
    b = xp.asarray(rng.standard_normal(n).astype(np.float32)).astype(dt) if bias else None
    g = xp.asarray(rng.standard_normal((3, 37, n)).astype(np.float32)).astype(dt)
    h = [None if a is None else cd.backend.asnumpy(a).astype(np.float64) for a in (x, w, b, g)]
    poison_pool(xp)
    y, saved = F.linear(x, w, b)
    poison_pool(xp)
    gx, gw, gb = F.linear_backward(g, saved)
    want = [h[0] @ h[1] + (h[2] if bias else 0), h[3] @ h[1].T,
            h[0].reshape(-1, k).T @ h[3].reshape(-1, n), h[3].sum((0, 1)) if bias else None]
    for got, ref in zip((y, gx, gw, gb), want):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == dt and got.shape == ref.shape and got.flags.c_contiguous
        np.testing.assert_allclose(cd.backend.asnumpy(got).astype(np.float64), ref,
                                   rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("k, n", [(8, 8), (4, 8), (8, 10), (4, 10)])
def test_linear_weight_gradient_is_a_fresh_array(xp, k, n):
    """The weight and bias gradients are their own arrays, never views (the autograd copies
    gradients that are views: a copy of every weight gradient each step), K or N padded or
    not."""
    import cudrop.functional as F
    x = xp.ones((5, k), np.float16)
    y, saved = F.linear(x, xp.ones((k, n), np.float16), xp.zeros(n, np.float16))
    gx, gw, gb = F.linear_backward(xp.ones((5, n), np.float16), saved)
    assert y.shape == (5, n)
    assert gw.shape == (k, n) and gw.base is None and gx.shape == (5, k)
    assert gb.shape == (n,) and gb.base is None


def test_linear_rejects_wrong_width():
    with pytest.raises(ValueError, match="5 features"):
        nn.Linear(5, 3)(cd.Tensor(np.zeros((2, 4), np.float32)))


def test_parameters_registered_in_order_and_named():
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1, bias=False))
    names = [n for n, _ in m.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight"]
    assert m.num_parameters() == 2 * 3 + 3 + 3


def test_sequential_rejects_non_module():
    with pytest.raises(TypeError, match="argument 1"):
        nn.Sequential(nn.ReLU(), lambda x: x)


def test_state_dict_round_trip(tmp_path):
    a = models.ResNet(8, num_classes=3, in_channels=1, seed=0)
    b = models.ResNet(8, num_classes=3, in_channels=1, seed=1)
    x = cd.Tensor(np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32))
    a(x)  # moves the BN running statistics away from their initial values
    a.eval(); b.eval()
    path = tmp_path / "m.npz"
    a.save(path)
    b.load(path)
    assert set(a.state_dict()) == set(b.state_dict())
    assert any("running_mean" in k for k in a.state_dict())
    for k, v in a.state_dict().items():
        assert np.array_equal(v, b.state_dict()[k]), k
    assert np.array_equal(a(x).data, b(x).data)


def test_load_state_dict_errors():
    m = nn.Linear(2, 2)
    with pytest.raises(KeyError, match="missing"):
        m.load_state_dict({"weight": np.zeros((2, 2))})
    state = {"weight": np.zeros((2, 2)), "bias": np.zeros(2)}
    with pytest.raises(KeyError, match=r"unexpected \['drop.mean'\]"):
        m.load_state_dict(dict(state, **{"drop.mean": np.zeros(1)}))
    with pytest.raises(ValueError, match="shape"):
        m.load_state_dict({"weight": np.zeros((3, 2)), "bias": np.zeros(2)})


def test_strict_loading_skips_stochastic_counters_by_a_fixed_rule():
    """Keys ending in a stochastic layer's counter are skipped by every model, whichever layers
    the process has built (the rule once depended on that; checked in a fresh process)."""
    code = ("import numpy as np\nfrom cudrop import nn\nm = nn.Linear(2, 2)\n"
            "m.load_state_dict({'weight': np.zeros((2, 2)), 'bias': np.zeros(2), "
            "'drop.period': 5, 'drop.seed': 1, 'drop.layer': 2, 'drop.step': 3})\n"
            "print('loaded')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr


def test_train_eval_flags_and_global_switch():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    x = cd.Tensor(np.ones((64, 4), np.float32))
    assert m[1].is_training
    m.eval()
    assert not m[1].is_training and np.array_equal(m[1](x).data, x.data)
    m.train()
    with cd.eval_mode():
        assert not m[1].is_training
        assert np.array_equal(m[1](x).data, x.data)
    assert m[1].is_training


def test_make_dropout_validates():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        nn.make_dropout("dropout", 1.0)
    with pytest.raises(ValueError, match="dropout must be one of"):
        nn.make_dropout("nope", 0.1)
    assert isinstance(nn.make_dropout("dropout", 0.0), nn.Identity)


def _attention_reference(x, mha):
    """Dense NumPy attention written independently of the layer."""
    b, t, d = x.shape
    h = mha.num_heads
    hd = d // h
    qkv = x @ mha.qkv.weight.data + mha.qkv.bias.data
    q, k, v = [qkv[..., i * d:(i + 1) * d].reshape(b, t, h, hd).transpose(0, 2, 1, 3)
               for i in range(3)]
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    if mha.causal:
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return y @ mha.proj.weight.data + mha.proj.bias.data


@given(b=st.integers(1, 3), t=st.integers(1, 6), heads=st.sampled_from([1, 2]),
       causal=st.booleans())
def test_attention_matches_dense_reference(b, t, heads, causal):
    d = 4
    mha = _to64(nn.MultiHeadAttention(d, heads, causal=causal, rng=0))
    x = np.random.default_rng(t).standard_normal((b, t, d))
    y = mha(cd.Tensor(x)).data
    assert np.allclose(y, _attention_reference(x, mha), atol=1e-10)


def test_attention_causal_ignores_future():
    mha = _to64(nn.MultiHeadAttention(4, 2, causal=True, rng=0))
    x = np.random.default_rng(0).standard_normal((1, 5, 4))
    x2 = x.copy()
    x2[:, 3:] += 1.0
    y, y2 = mha(cd.Tensor(x)).data, mha(cd.Tensor(x2)).data
    assert np.allclose(y[:, :3], y2[:, :3]) and not np.allclose(y[:, 3:], y2[:, 3:])


def test_attention_gradients():
    mha = _to64(nn.MultiHeadAttention(4, 2, causal=True, rng=0))
    params = [mha.qkv.weight, mha.qkv.bias, mha.proj.weight, mha.proj.bias]
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    check_grad(lambda x_, *ps: _with_params(mha, params, ps, x_), x, *[p.data.copy() for p in params])


def _with_params(module, params, values, x):
    """Run ``module`` with its parameters replaced by the given tensors (for check_grad)."""
    old = {}
    for p, v in zip(params, values):
        owner = [m for m in module.modules() if any(q is p for q in m._params.values())][0]
        name = [k for k, q in owner._params.items() if q is p][0]
        old[(id(owner), name)] = (owner, name, p)
        object.__setattr__(owner, name, v)
    try:
        return module(x)
    finally:
        for owner, name, p in old.values():
            object.__setattr__(owner, name, p)


def test_residual_unit_gradients_and_shapes():
    unit = nn.basic_block(2, 4, stride=2, rng=0)
    unit.to(dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5))
    assert unit(cd.Tensor(x)).shape == (2, 4, 3, 3)
    assert unit.downsamples and not isinstance(unit.shortcut, nn.Identity)
    ident = nn.basic_block(3, 3, rng=0)
    assert isinstance(ident.shortcut, nn.Identity)
    with pytest.raises(ValueError, match="projection"):
        nn.basic_block(3, 4, projection=False)
    ws = [p for p in unit.parameters()]
    check_grad(lambda x_, *ps: _with_params(unit, ws, ps, x_), x, *[p.data.copy() for p in ws],
               rtol=1e-4)


@pytest.mark.parametrize("build, x_shape", [
    (lambda: models.mlp((1, 8, 8), 10, hidden=(16,), p=0.1), (3, 1, 8, 8)),
    (lambda: models.resnet20(num_classes=10, in_channels=1, p=0.1), (2, 1, 8, 8)),
    (lambda: models.ResNet(8, num_classes=5, in_channels=3), (2, 3, 7, 9)),
    (lambda: models.ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=16,
                        depth=1, heads=2, p=0.1), (2, 1, 8, 8)),
])
def test_image_models_forward_backward(build, x_shape):
    m = build()
    x = cd.Tensor(np.random.default_rng(0).random(x_shape, dtype=np.float32))
    y = m(x)
    assert y.shape[0] == x_shape[0] and y.dtype == np.float32
    loss = cd.cross_entropy(y, np.zeros(x_shape[0], np.int64))
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())


def test_resnet56_depth_and_builders_validate():
    m = models.resnet56(in_channels=3)
    assert len(m.units) == 27
    with pytest.raises(ValueError, match="6n"):
        models.ResNet(21)
    with pytest.raises(ValueError, match="multiple"):
        models.ViT(image_size=9, patch_size=2)


def test_gpt_forward_backward_and_causality():
    m = models.GPT(vocab_size=11, block_size=8, dim=16, depth=2, heads=2)
    m.to(dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    logits = m(idx)
    assert logits.shape == (2, 8, 11)
    idx2 = idx.copy()
    idx2[:, 5:] = (idx2[:, 5:] + 1) % 11
    assert np.allclose(m(idx2).data[:, :5], logits.data[:, :5])
    cd.cross_entropy(logits, idx).backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="block_size|time"):
        m(np.zeros((1, 9), np.int64))


def test_builders_number_stochastic_layers_deterministically():
    from cudrop.nn import Dropout, StochasticLayer
    Dropout(0.1)  # consumes a process-wide id: must not shift the model's ids
    a = models.resnet20(in_channels=1, p=0.1, depth_dropout=0.5, seed=3)
    b = models.resnet20(in_channels=1, p=0.1, depth_dropout=0.5, seed=3)
    ids = [(m.layer, m.seed) for m in a.modules() if isinstance(m, StochasticLayer)]
    assert ids == [(m.layer, m.seed) for m in b.modules() if isinstance(m, StochasticLayer)]
    assert [i for i, _ in ids] == list(range(len(ids))) and len(ids) == 10
    assert all(s == 3 for _, s in ids)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["gpt", "vit"])
def test_transformers_train_in_16_bit_like_float32(xp, name, dtype):
    """A 16-bit transformer (causal mask, softmax, attention products, layer norm) gives the
    float32 loss and gradients to 16-bit accuracy, every gradient in the parameters' dtype."""
    from conftest import low_precision_dtype
    dt = low_precision_dtype(xp, dtype)
    rng = np.random.default_rng(0)
    if name == "gpt":
        build = lambda: models.GPT(13, block_size=8, dim=32, depth=1, heads=4,  # noqa: E731
                                   dropout="none")
        x, y = rng.integers(0, 13, (2, 8)), rng.integers(0, 13, (2, 8))
    else:
        build = lambda: models.ViT(image_size=8, patch_size=2, in_channels=1,  # noqa: E731
                                   dim=32, depth=1, heads=4, dropout="none")
        x, y = rng.standard_normal((4, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 4)
    device = "cpu" if xp is np else "gpu"
    results = []
    for d in (np.float32, dt):
        m = build().to(device, dtype=d)
        inp = xp.asarray(x) if name == "gpt" else cd.Tensor(xp.asarray(x).astype(d))
        loss = cd.cross_entropy(m(inp), xp.asarray(y))
        loss.backward()
        assert all(p.grad.dtype == d for p in m.parameters())
        results.append((float(loss.data), [cd.backend.asnumpy(p.grad).astype(np.float64)
                                           for p in m.parameters()]))
    (l32, g32), (l16, g16) = results
    assert abs(l16 - l32) < 0.02 * abs(l32)
    for a, b in zip(g32, g16):
        assert np.all(np.isfinite(b))
        assert np.linalg.norm(b - a) <= 0.05 * np.linalg.norm(a) + 1e-3
