"""conv_batch_norm: a convolution then batch norm (and its ReLU) as one op. Forward, running
statistics and all four gradients against the two ops in float64 on the same (rounded) inputs;
on CuPy the fused kernels (1x1, stride 1, <= 64 channels) on ragged tiles, channel counts from 1
to 64 and several CTAs' partials; where the fused path runs and where the two ops do; the
ConvBatchNorm layer against the Sequential it replaces."""
import numpy as np
import pytest

import cudrop
from cudrop import backend, nn
from cudrop.functional import _conv_norm as Fcn
from cudrop.functional import conv2d, conv2d_backward, batch_norm, batch_norm_backward
from conftest import low_precision_dtype, poison_pool


def _np(a):
    return backend.asnumpy(a.data if isinstance(a, cudrop.Tensor) else a)


def _relerr(got, want):
    got = _np(got).astype(np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def _reference(x, w, gamma, beta, rm, rv, g, momentum, relu_mask=None):
    """The two ops in float64 NumPy: (z, gx, gw, ggamma, gbeta, running_mean, running_var).
    ``relu_mask``: a ReLU after them, whose gradient passes where the mask is True (the tested
    output's ``z > 0``: a value within rounding of 0 may fall either way)."""
    f64 = lambda a: a.astype(np.float64)  # noqa: E731
    rm, rv, g = f64(rm), f64(rv), f64(g)
    y, cs = conv2d(f64(x), f64(w))
    z, ns = batch_norm(y, f64(gamma), f64(beta), rm, rv, True, momentum)
    if relu_mask is not None:
        z, g = np.maximum(z, 0.0), np.where(relu_mask, g, 0.0)
    gy, ggamma, gbeta = batch_norm_backward(g, ns)
    gx, gw, _ = conv2d_backward(gy, cs)
    return z, gx, gw, ggamma, gbeta, rm, rv


# (N, C, H, W, O): a ragged last tile (35 pixels), the most channels, many tiles a sample,
# fewer pixels than a pixel group, more samples than the reductions' CTAs
SHAPES = [(5, 3, 7, 5, 4), (3, 64, 6, 6, 64), (2, 16, 32, 32, 16), (7, 2, 1, 3, 3),
          (130, 16, 4, 4, 33), (4, 40, 9, 9, 24)]


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 3e-3),
                                        ("bfloat16", 2e-2)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", [None, "relu"])
def test_conv_batch_norm_matches_float64(xp, dtype, tol, shape, act):
    dt = low_precision_dtype(xp, dtype)
    n, c, h, wd, o = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(0.7, 1.5, (n, c, h, wd)).astype(dt)
    w = rng.normal(0.0, 1.0 / np.sqrt(c), (o, c, 1, 1)).astype(dt)
    gamma, beta = rng.normal(1.0, 0.5, o).astype(dt), rng.normal(0.2, 1.0, o).astype(dt)
    g = rng.standard_normal((n, o, h, wd)).astype(dt)
    rm, rv = rng.standard_normal(o).astype(np.float32), rng.uniform(0.5, 2, o).astype(np.float32)
    rm_d, rv_d = xp.array(rm), xp.array(rv)  # copies: rm and rv feed the reference
    poison_pool(xp)
    z, saved = Fcn.conv_batch_norm(xp.asarray(x), xp.asarray(w), xp.asarray(gamma),
                                   xp.asarray(beta), rm_d, rv_d, True, momentum=0.2, act=act)
    assert (saved.conv is None) == (xp is not np and dtype != "float64")  # the fused kernels
    poison_pool(xp)
    got = (z,) + Fcn.conv_batch_norm_backward(xp.asarray(g), saved)
    want = _reference(x, w, gamma, beta, rm, rv, g, 0.2, _np(z) > 0 if act else None)
    for name, a, ref in zip(("z", "gx", "gw", "ggamma", "gbeta"), got, want):
        assert a.dtype == dt and a.shape == ref.shape, name
        assert _relerr(a, ref) < tol, (name, _relerr(a, ref))
    for a, ref in ((rm_d, want[5]), (rv_d, want[6])):
        assert a.dtype == np.float32
        np.testing.assert_allclose(_np(a), ref, rtol=max(tol, 1e-5), atol=max(tol, 1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("case, fused", [
    (dict(), True), (dict(c=65), False), (dict(o=65), False), (dict(stride=2), False),
    (dict(padding=1, k=3), False), (dict(training=False), False), (dict(dtype=np.float64), False),
    (dict(affine=False), False), (dict(running="float64"), False), (dict(running=None), True)])
def test_gpu_conv_batch_norm_runs_fused_where_documented(case, fused):
    """The fused kernels take 1x1, stride-1, unpadded training calls of <= 64 channels in
    float32 / 16-bit with gamma, beta and float32 (or no) running statistics; every other call
    runs the two ops, and both give the two ops' values."""
    cp = backend.cupy
    rng = np.random.default_rng(0)
    c, o, k = case.get("c", 8), case.get("o", 8), case.get("k", 1)
    dt = case.get("dtype", np.float32)
    x = cp.asarray(rng.standard_normal((3, c, 6, 5)).astype(dt))
    w = cp.asarray(rng.standard_normal((o, c, k, k)).astype(dt))
    affine = case.get("affine", True)
    gamma = cp.asarray(rng.uniform(0.5, 1.5, o).astype(dt)) if affine else None
    beta = cp.asarray(rng.standard_normal(o).astype(dt)) if affine else None
    running = case.get("running", "float32")
    rm = rv = None
    if running:
        rm, rv = cp.zeros(o, dtype=running), cp.ones(o, dtype=running)
    kw = dict(stride=case.get("stride", 1), padding=case.get("padding", 0), act="relu")
    training = case.get("training", True)
    z, saved = Fcn.conv_batch_norm(x, w, gamma, beta, rm, rv, training, **kw)
    assert (saved.conv is None) == fused
    f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    y, _ = conv2d(f64(x), f64(w), None, kw["stride"], kw["padding"])
    ref, _ = batch_norm(y, f64(gamma), f64(beta), cp.zeros(o), cp.ones(o), training, act="relu")
    assert _relerr(z, _np(ref)) < 1e-5


@pytest.mark.gpu
def test_gpu_conv_batch_norm_is_deterministic():
    """Two calls give the same bits (no atomics; every partial merged in a fixed order)."""
    cp = backend.cupy
    rng = np.random.default_rng(1)
    x = cp.asarray(rng.standard_normal((64, 32, 16, 16)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((32, 32, 1, 1)).astype(np.float32))
    gamma, beta = cp.ones(32, np.float32), cp.zeros(32, np.float32)
    g = cp.asarray(rng.standard_normal((64, 32, 16, 16)).astype(np.float32))
    runs = []
    for _ in range(2):
        z, saved = Fcn.conv_batch_norm(x, w, gamma, beta, None, None, True, act="relu")
        runs.append([_np(a) for a in (z,) + Fcn.conv_batch_norm_backward(g, saved)])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_conv_batch_norm_checks_its_options(xp):
    x, w = xp.ones((2, 3, 4, 4), np.float32), xp.ones((5, 3, 1, 1), np.float32)
    gamma, beta = xp.ones(5, np.float32), xp.zeros(5, np.float32)
    with pytest.raises(ValueError, match="momentum"):
        Fcn.conv_batch_norm(x, w, gamma, beta, None, None, True, momentum=2.0)
    with pytest.raises(ValueError, match="eps"):
        Fcn.conv_batch_norm(x, w, gamma, beta, None, None, True, eps=0.0)
    with pytest.raises(ValueError, match="gamma must have shape"):
        Fcn.conv_batch_norm(x, w, xp.ones(4, np.float32), beta, None, None, True)
    with pytest.raises(ValueError, match="channels"):
        Fcn.conv_batch_norm(x, xp.ones((5, 2, 1, 1), np.float32), gamma, beta, None, None, True)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_batch_norm_layer_equals_the_sequential(xp, stride):
    """ConvBatchNorm has the state_dict keys of Sequential(conv, bn, Identity) and gives its
    values (training: outputs, running statistics, gradients; eval: outputs)."""
    rng = np.random.default_rng(stride)
    layers = lambda: (nn.Conv2d(6, 10, 1, stride, 0, bias=False, rng=3),  # noqa: E731
                      *nn.bn_relu(10))
    fused, plain = nn.ConvBatchNorm(*layers()), nn.Sequential(*layers())
    for m in (fused, plain):
        m.to("cpu" if xp is np else "gpu")
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = xp.asarray(rng.normal(0.5, 2.0, (4, 6, 9, 7)).astype(np.float32))
    g = xp.asarray(rng.standard_normal((4, 10) + ((9, 7) if stride == 1 else (5, 4)))
                   .astype(np.float32))
    outs = []
    for m in (fused, plain):
        xt = cudrop.Tensor(x, requires_grad=True)
        z = m(xt)
        (z * cudrop.Tensor(g)).sum().backward()
        outs.append([_np(z), _np(xt.grad)] + [_np(p.grad) for p in m.parameters()]
                    + [_np(getattr(mod, b)) for _, mod, b in m.named_buffers()])
        m.eval()
        outs[-1].append(_np(m(cudrop.Tensor(x))))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_conv_batch_norm_layer_needs_a_biasless_conv_and_its_norm():
    with pytest.raises(TypeError, match="without bias"):
        nn.ConvBatchNorm(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="BatchNorm2d of 4"):
        nn.ConvBatchNorm(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(5))
