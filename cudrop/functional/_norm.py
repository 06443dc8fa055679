"""Batch and layer normalisation on raw arrays.

Statistics are computed in float32 at least: float16 sums over a batch lose the mean's low bits
and its variance can underflow, so half inputs are upcast for the reductions and the output is
cast back.

Batch norm on CuPy (float16/bfloat16/float32/float64) runs fused kernels (raw_kernels/norm.cu)
instead of ~15 small array ops per direction: training forward is one per-channel reduction
(two-pass mean and variance, the running-statistics update folded in) and one elementwise pass;
eval forward is one elementwise pass; backward is one reduction (both per-channel sums and the
coefficients of the input gradient) and one elementwise pass. A reduction spreads each channel
over several CTAs when there are too few channels to fill the GPU (``_bn_split``); every CTA
of the elementwise pass that follows merges their partials in a fixed order in shared memory
(``_split`` keeps C and C * S within it), so the results stay deterministic.
Backward recomputes ``xhat`` from the saved input and per-channel mean / inverse std, so forward
writes no ``xhat`` array.
``act='relu'`` fuses a ReLU into batch norm: the kernels' elementwise pass stores
``max(y, 0)``, and backward masks the gradient inside its two kernels. The mask is recomputed
there from ``x`` and the per-channel statistics (bit for bit the forward's value), not read from
a saved output: ``x`` is saved anyway, so no output array is kept alive for backward, and each
backward kernel reads two arrays (g, x), not three (ResNet-56's step kernels 12.91 -> 12.31 ms
with this and add + ReLU fused, H200; not measured apart). The array path composes the
same math (a maximum, then the mask ``y > 0`` of its saved output).
``_batch_norm_arrays`` runs the array-op path on either device (tests and benchmarks compare the
kernels with it); ``batch_norm_backward`` follows the path its ``saved`` came from.

Backward convention: ``*_backward(grad_out, saved)`` returns ``(gx, ggamma, gbeta)``, one
gradient per array input in order, None for an absent gamma/beta (running statistics are state,
not inputs).
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np

from .. import backend
from ..raw_kernels import cuda_type, device_facts, launch, launch_rows
from ._reduce import compute_dtype, sum_leading

Array = Any  # a NumPy or CuPy array


class BatchNormSaved(NamedTuple):
    """What :func:`batch_norm_backward` needs; the kernel path keeps ``x``, the array path
    ``xhat``."""
    training: bool
    inv_std: Array  # (C,), the compute dtype
    gamma: Array | None
    beta_dtype: np.dtype | None
    x_dtype: np.dtype
    # the array path (None on the kernel path)
    xhat: Array | None = None
    axes: tuple[int, ...] | None = None
    bshape: tuple[int, ...] | None = None
    n: int = 0
    # the kernel path (None on the array path)
    x: Array | None = None  # the contiguous input
    mean: Array | None = None
    gamma_c: Array | None = None  # gamma as a contiguous accumulation-dtype array
    beta_c: Array | None = None  # beta likewise (read by backward's ReLU mask)
    # the fused activation: None or 'relu'; the array path keeps its output y for the mask
    act: str | None = None
    y: Array | None = None


class LayerNormSaved(NamedTuple):
    """What :func:`layer_norm_backward` needs: ``xhat`` and the inverse std (compute dtype)."""
    xhat: Array
    inv_std: Array  # x.shape[:-1] + (1,)
    gamma: Array | None
    beta_dtype: np.dtype | None
    x_dtype: np.dtype


def widen(a):
    """A floating array in its compute dtype (:func:`compute_dtype`); anything else as is (an
    int input keeps NumPy's own promotion, e.g. ``exp(int64)`` -> float64)."""
    return a.astype(compute_dtype(a.dtype), copy=False) if backend.is_floating(a.dtype) else a


def narrow(y, dtype):
    """A result of :func:`widen`'s computation back in the input's ``dtype`` when that is
    floating (never cast to an int input's dtype)."""
    return y.astype(dtype, copy=False) if backend.is_floating(dtype) else y


def _check_float(name, a):
    if not backend.is_floating(a.dtype):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")


def _check_param(name, a, c):
    if a is None:
        return
    if tuple(a.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},) to match the {c} channels of x, "
                         f"got {tuple(a.shape)}")


def _check_eps(eps):
    if not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def _check_momentum(momentum):
    if not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


def batch_norm(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5, *,
               act=None):
    """Batch normalisation over every axis but the channel axis 1.

    ``x`` has shape (N, C) or (N, C, ...). ``gamma``/``beta`` (shape (C,)) may be None for no
    affine map. In training the batch statistics normalise ``x`` and ``running_mean`` /
    ``running_var`` (when given) are updated in place with the unbiased batch variance, as
    PyTorch does; in eval the running statistics normalise ``x``. ``act``: None, or 'relu' for
    ``max(batch_norm(x), 0)`` in the same op (on the GPU in the same kernels).
    Returns ``(y, saved)`` (a :class:`BatchNormSaved`) for :func:`batch_norm_backward`.
    """
    return _batch_norm(x, gamma, beta, running_mean, running_var, training, momentum, eps, act,
                       kernels=True)


def _batch_norm_arrays(x, gamma, beta, running_mean, running_var, training, momentum=0.1,
                       eps=1e-5, *, act=None):
    """:func:`batch_norm` on the array-op path (the NumPy reference's code, on NumPy or CuPy),
    never the GPU kernels: what tests and benchmarks compare the kernels with."""
    return _batch_norm(x, gamma, beta, running_mean, running_var, training, momentum, eps, act,
                       kernels=False)


ACTS = (None, "relu")  # what batch_norm's ``act`` may be


def _batch_norm(x, gamma, beta, running_mean, running_var, training, momentum, eps, act,
                kernels):
    xp = backend.get_array_module(x, gamma, beta, running_mean, running_var)
    _check_float("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C) or (N, C, ...) with channels on axis 1, "
                         f"got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_param(name, a, c)
    _check_eps(eps)
    _check_momentum(momentum)
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    axes = (0,) + tuple(range(2, x.ndim))
    n = x.size // c if c else 0
    bshape = (1, c) + (1,) * (x.ndim - 2)
    if training and n < 2:
        raise ValueError(f"batch_norm in training needs more than one value per channel; "
                         f"x has shape {tuple(x.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm in eval mode needs running_mean and running_var")
    if kernels and _gpu_path(xp, x):
        return _batch_norm_gpu(x, gamma, beta, running_mean, running_var, training, momentum,
                               eps, act)
    cdt = compute_dtype(x.dtype)
    xc = x.astype(cdt, copy=False)

    if training:
        mean = xc.mean(axis=axes)
        centered = xc - mean.reshape(bshape)
        var = (centered * centered).mean(axis=axes)
        inv_std = 1.0 / xp.sqrt(var + eps)
        xhat = centered * inv_std.reshape(bshape)
        for run, stat in ((running_mean, mean), (running_var, var * (n / (n - 1)))):
            if run is not None:
                run *= 1 - momentum
                run += (momentum * stat).astype(run.dtype, copy=False)
    else:
        inv_std = 1.0 / xp.sqrt(running_var.astype(cdt, copy=False) + eps)
        xhat = (xc - running_mean.astype(cdt, copy=False).reshape(bshape)) * inv_std.reshape(bshape)

    y = xhat
    if gamma is not None:
        y = y * gamma.astype(cdt, copy=False).reshape(bshape)
    if beta is not None:
        y = y + beta.astype(cdt, copy=False).reshape(bshape)
    y = y.astype(x.dtype, copy=False)
    if act == "relu":
        y = xp.maximum(y, y.dtype.type(0))
    saved = BatchNormSaved(bool(training), inv_std, gamma,
                           None if beta is None else beta.dtype, x.dtype,
                           xhat=xhat, axes=axes, bshape=bshape, n=n, act=act,
                           y=y if act else None)
    return y, saved


def batch_norm_backward(grad_out, saved: BatchNormSaved):
    """Gradients ``(gx, ggamma, gbeta)``; ``ggamma``/``gbeta`` are None where the forward had
    no gamma/beta. Runs the kernels for a kernel forward's ``saved``, array ops otherwise."""
    if saved.x is not None:
        return _batch_norm_backward_gpu(grad_out, saved)
    xhat, inv_std, gamma = saved.xhat, saved.inv_std, saved.gamma
    axes, bshape, n = saved.axes, saved.bshape, saved.n
    if saved.act == "relu":  # the ReLU's gradient first: zero where its output was not positive
        xp = backend.get_array_module(grad_out)
        grad_out = xp.where(saved.y > 0, grad_out, grad_out.dtype.type(0))
    g = grad_out.astype(xhat.dtype, copy=False)
    gbeta_c = g.sum(axis=axes)
    ggamma_c = (g * xhat).sum(axis=axes)
    scale = inv_std if gamma is None else inv_std * gamma.astype(xhat.dtype, copy=False)
    if saved.training:
        # d xhat / d x through the batch mean and variance:
        # gx = gamma * inv_std / n * (n g - sum(g) - xhat * sum(g xhat))
        gx = (scale / n).reshape(bshape) * (
            n * g - gbeta_c.reshape(bshape) - xhat * ggamma_c.reshape(bshape))
    else:
        gx = g * scale.reshape(bshape)
    gx = gx.astype(saved.x_dtype, copy=False)
    ggamma = None if gamma is None else ggamma_c.astype(gamma.dtype, copy=False)
    gbeta = None
    if saved.beta_dtype is not None:
        gbeta = gbeta_c.astype(saved.beta_dtype, copy=False)
    return gx, ggamma, gbeta


# ---- batch norm, GPU path ---------------------------------------------------------------------
def _gpu_path(xp, x) -> bool:
    if xp is np or x.size == 0 or cuda_type(x.dtype) is None:
        return False
    return x.size // x.shape[1] < 2**31  # per-channel counts are 32-bit in the kernels


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def _launch(fn, dtype, grid, block, args):
    launch("norm.cu", fn, dtype, grid, block, args)


def _bn_split(nb: int, c: int) -> int:
    """How many CTAs share one channel in the reductions (``bn_stats``, ``bn_bwd_sums``), each
    owning a run of whole samples: enough for ``c * S`` to reach twice the SM count, at most
    ``nb``; 1 when the channels alone fill the GPU. One CTA per channel was why batch norm was
    slow on small-channel layers: an H200 profile of a ResNet-56 CIFAR step (C = 16..64 on 132
    SMs) showed ~33 us per reduction call where reading its 8 MB takes ~3-4 us."""
    target = 2 * device_facts()[0]
    if c >= target:
        return 1
    return max(1, min(nb, -(-target // c)))


def _bn_threads(count: int, split: int) -> int:
    """Threads of a reduction CTA that walks ``count`` values of one channel. With ``split`` >
    1 at most 512: the grid then has C * S < 4x the SM count CTAs (S = ceil(2 SMs / C)), and at
    1024 threads only two fit on an SM, so the CTAs past the first two per SM would run as a
    second wave as long as the first."""
    if count >= 16384 and split == 1:
        return 1024
    return 512 if count >= 4096 else (256 if count >= 1024 else 64)


def _elementwise_grid(x, split):
    """Blocks of 256 threads for ``bn_fwd`` / ``bn_bwd_apply``: one 16-byte access a thread
    (their vector walk), at most 4096 blocks (the kernels loop over the rest); at most 4 a
    multiprocessor (one wave) when each block first merges a split reduction's partials."""
    cap = 4 * device_facts()[0] if split > 1 else 4096
    return (max(1, min(-(-x.size * x.itemsize // (16 * 256)), cap)),)


# norm.cu's CD_BN_MERGE_MAX and CD_BN_PART_MAX: the most channels and partials (C * S) that
# bn_fwd and bn_bwd_apply merge in shared memory
_MERGE_MAX, _PART_MAX = 512, 1024


def _split(nb: int, c: int) -> int:
    """:func:`_bn_split` within what the elementwise kernels merge in shared memory."""
    split = min(_bn_split(nb, c), _PART_MAX // c) if c <= _MERGE_MAX else 1
    return max(split, 1)


def _as_acc(cp, a, acc):
    """A per-channel array as a contiguous ``acc`` array (no copy when it already is one)."""
    if a is None or (a.dtype == acc and a.flags.c_contiguous):
        return a
    return cp.ascontiguousarray(a, dtype=acc)


def _batch_norm_gpu(x, gamma, beta, running_mean, running_var, training, momentum, eps, act):
    cp = backend.cupy
    acc = _F64 if x.dtype == _F64 else _F32
    if not x.flags.c_contiguous:
        x = cp.ascontiguousarray(x)
    nb, c = x.shape[0], x.shape[1]
    p = x.size // (nb * c)
    n = nb * p
    gamma_c, beta_c = _as_acc(cp, gamma, acc), _as_acc(cp, beta, acc)
    y = cp.empty_like(x)
    split = 1  # the reductions' CTAs a channel (eval: no reduction)
    if training:
        stats = cp.empty((3, c), dtype=acc)  # mean, biased variance, inverse std
        # In-kernel update where the running statistics are contiguous ``acc`` arrays (the
        # layers keep float32 ones); any other dtype is updated here, as the reference does.
        update = (running_mean is not None and running_var is not None
                  and running_mean.dtype == acc and running_var.dtype == acc
                  and running_mean.flags.c_contiguous and running_var.flags.c_contiguous)
        rm, rv = (running_mean, running_var) if update else (stats, stats)
        dims = (np.int32(nb), np.int32(c), np.int32(p))
        tail = (np.float64(eps), np.float64(momentum), np.float64(n / (n - 1)), np.int32(update))
        split = _split(nb, c)
        # the (2, C, S) partials (mean, M2) of the CTAs, merged by bn_fwd; a fresh workspace
        # per call (no persistent buffer, so a captured graph owns its own)
        part = cp.empty((2, c, split), dtype=acc) if split > 1 else stats  # unread for S = 1
        _launch("bn_stats", x.dtype, (c, split), (_bn_threads(-(-nb // split) * p, split),),
                (x, part, stats, rm, rv) + dims + tail)
        # bn_fwd merges the partials: + momentum, unbias, update (tail without eps)
        merge = (part, np.int32(nb), np.int32(split), stats, rm, rv) + tail[1:]
        mean, s, saved_stats = stats[0], stats[2], stats
    else:
        mean, s = _as_acc(cp, running_mean, acc), _as_acc(cp, running_var, acc)
        saved_stats = cp.empty((2, c), dtype=acc)  # mean, inverse std (written by bn_fwd)
        merge = (mean, np.int32(nb), np.int32(split), mean, mean, mean, np.float64(0),
                 np.float64(1), np.int32(0))  # nothing to merge
    _launch("bn_fwd", x.dtype, _elementwise_grid(x, split), (256,),
            (x, y, mean, s, x if gamma_c is None else gamma_c, x if beta_c is None else beta_c,
             saved_stats, np.int64(x.size), np.int32(c), np.int32(p), np.float64(eps),
             np.int32(not training), np.int32(gamma_c is not None),
             np.int32(beta_c is not None), np.int32(act == "relu")) + merge)
    if training and not update:  # after bn_fwd, which writes the statistics when S > 1
        for run, stat in ((running_mean, stats[0]), (running_var, stats[1] * (n / (n - 1)))):
            if run is not None:
                run *= 1 - momentum
                run += (momentum * stat).astype(run.dtype, copy=False)
    saved = BatchNormSaved(bool(training), saved_stats[-1], gamma,
                           None if beta is None else beta.dtype, x.dtype,
                           x=x, mean=saved_stats[0], gamma_c=gamma_c, beta_c=beta_c, act=act)
    return y, saved


def _batch_norm_backward_gpu(grad_out, saved):
    cp = backend.cupy
    x, gamma, gamma_c = saved.x, saved.gamma, saved.gamma_c
    backend.get_array_module(grad_out, x)  # a NumPy gradient for a GPU forward: TypeError
    g = grad_out
    if g.shape != x.shape:
        g = cp.broadcast_to(g, x.shape)
    if g.dtype != x.dtype or not g.flags.c_contiguous:
        g = cp.ascontiguousarray(g, dtype=x.dtype)
    nb, c = x.shape[0], x.shape[1]
    p = x.size // (nb * c)
    mean = saved.mean
    # sum g and sum g * xhat: beta's and gamma's gradients, each its own array (a view of one
    # (2, C) array made autograd copy both, 114 copies in a ResNet-56 step)
    sg, sgx = cp.empty(c, dtype=mean.dtype), cp.empty(c, dtype=mean.dtype)
    coef = cp.empty((3, c), dtype=mean.dtype)
    gam = x if gamma_c is None else gamma_c
    bet = x if saved.beta_c is None else saved.beta_c
    dims = (np.int32(nb), np.int32(c), np.int32(p))
    flags = (np.int32(gamma_c is not None), np.int32(saved.training))
    mask = (np.int32(saved.beta_c is not None), np.int32(saved.act == "relu"))  # the ReLU's
    split = _split(nb, c)
    # the (2, C, S) partials (sum g, sum g * (x - mean)), summed by bn_bwd_apply
    part = cp.empty((2, c, split), dtype=mean.dtype) if split > 1 else coef  # unread for S = 1
    _launch("bn_bwd_sums", x.dtype, (c, split), (_bn_threads(-(-nb // split) * p, split),),
            (g, x, mean, saved.inv_std, gam, bet, part, sg, sgx, coef) + dims + flags + mask)
    gx = cp.empty_like(x)
    _launch("bn_bwd_apply", x.dtype, _elementwise_grid(x, split), (256,),
            (g, x, gx, mean, coef, bet, np.int64(x.size), np.int32(c), np.int32(p)) + mask
            + (part, np.int32(nb), np.int32(split), saved.inv_std, gam, sg, sgx) + flags)
    ggamma = None if gamma is None else sgx.astype(gamma.dtype, copy=False)
    gbeta = None
    if saved.beta_dtype is not None:
        gbeta = sg.astype(saved.beta_dtype, copy=False)
    return gx, ggamma, gbeta


def layer_norm(x, gamma, beta, eps=1e-5):
    """Layer normalisation over the last axis; ``gamma``/``beta`` of shape ``x.shape[-1:]``
    (either may be None). Returns ``(y, saved)`` (a :class:`LayerNormSaved`) for
    :func:`layer_norm_backward`."""
    xp = backend.get_array_module(x, gamma, beta)
    _check_float("x", x)
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (the normalised last axis)")
    d = x.shape[-1]
    for name, a in (("gamma", gamma), ("beta", beta)):
        if a is not None and tuple(a.shape) != (d,):
            raise ValueError(f"{name} must have shape ({d},) to match the last axis of x, got "
                             f"{tuple(a.shape)}")
    _check_eps(eps)
    cdt = compute_dtype(x.dtype)
    if _ln_gpu(xp, x):
        return _layer_norm_gpu(x, gamma, beta, eps, cdt)
    xc = x.astype(cdt, copy=False)
    centered = xc - xc.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
    xhat = centered * inv_std
    y = xhat
    if gamma is not None:
        y = y * gamma.astype(cdt, copy=False)
    if beta is not None:
        y = y + beta.astype(cdt, copy=False)
    saved = LayerNormSaved(xhat, inv_std, gamma, None if beta is None else beta.dtype, x.dtype)
    return y.astype(x.dtype, copy=False), saved


def _ln_gpu(xp, x) -> bool:
    """lastaxis.cu's warp-per-row kernels: CuPy, a kernel dtype, rows of 32-bit length."""
    return xp is not np and x.size > 0 and cuda_type(x.dtype) is not None and x.shape[-1] < 2**31


def _ln_rows(x):
    d = x.shape[-1]
    return x.size // d, d


def _layer_norm_gpu(x, gamma, beta, eps, cdt):
    cp = backend.cupy
    x = cp.ascontiguousarray(x)
    rows, d = _ln_rows(x)
    y = cp.empty_like(x)
    xhat = cp.empty(x.shape, cdt)
    inv_std = cp.empty(x.shape[:-1] + (1,), cdt)
    g = xhat if gamma is None else cp.ascontiguousarray(gamma, dtype=cdt)
    b = xhat if beta is None else cp.ascontiguousarray(beta, dtype=cdt)
    launch_rows("lastaxis.cu", "ln_fwd", x.dtype, rows,
                (x, g, b, y, xhat, inv_std, np.int64(rows), np.int32(d), np.float64(eps),
                 np.int32(gamma is not None), np.int32(beta is not None)))
    return y, LayerNormSaved(xhat, inv_std, gamma, None if beta is None else beta.dtype, x.dtype)


def _layer_norm_backward_gpu(go, saved):
    """lastaxis.cu's ln_bwd on the contiguous gradient ``go``."""
    cp = backend.cupy
    xhat, gamma = saved.xhat, saved.gamma
    gx = cp.empty_like(go)
    rows, d = _ln_rows(go)
    gam = xhat if gamma is None else cp.ascontiguousarray(gamma, dtype=xhat.dtype)
    launch_rows("lastaxis.cu", "ln_bwd", go.dtype, rows,
                (go, xhat, saved.inv_std, gam, gx, np.int64(rows), np.int32(d),
                 np.int32(gamma is not None)))
    return gx


def layer_norm_backward(grad_out, saved: LayerNormSaved):
    """Gradients ``(gx, ggamma, gbeta)`` (None for an absent gamma/beta)."""
    xhat, inv_std, gamma = saved.xhat, saved.inv_std, saved.gamma
    xp = backend.get_array_module(grad_out)
    g = grad_out
    if _ln_gpu(xp, g) and g.dtype == saved.x_dtype:
        g = backend.cupy.ascontiguousarray(g)
        gx = _layer_norm_backward_gpu(g, saved)
    else:
        gc = g.astype(xhat.dtype, copy=False)
        gxhat = gc if gamma is None else gc * gamma.astype(xhat.dtype, copy=False)
        gx = inv_std * (gxhat - gxhat.mean(axis=-1, keepdims=True)
                        - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
        gx = gx.astype(saved.x_dtype, copy=False)
    return (gx,) + _layer_norm_affine_grads(g, saved)


def _layer_norm_affine_grads(g, saved):
    """``(ggamma, gbeta)``: the sums of ``g * xhat`` and of ``g`` over the leading axes, both
    from one pass over ``g`` when both are wanted (None for an absent gamma/beta)."""
    gamma, beta_dtype, lead = saved.gamma, saved.beta_dtype, g.ndim - 1
    if gamma is None:
        return None, (None if beta_dtype is None else sum_leading(g, lead, dtype=beta_dtype))
    if beta_dtype is None:
        return sum_leading(g, lead, saved.xhat, dtype=gamma.dtype), None
    ggamma, gbeta = sum_leading(g, lead, saved.xhat, with_plain=True, dtype=gamma.dtype)
    return ggamma, gbeta.astype(beta_dtype, copy=False)
