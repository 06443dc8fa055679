"""cudrop.flops counts the matrix products' work; with it, each structured variant's training
step (forward + backward) is shown to run less work as its drop probability rises -- the
skipping is in the products, not only in the masks -- while plain dropout and gyro dropout
(which mask elements of dense products) run the dense step's work at every p."""
import numpy as np
import pytest

import cudrop as cd
from cudrop import flops, models
from cudrop.functional import _matmul


def test_products_are_counted_twice_their_multiply_adds():
    a, b = np.ones((2, 3)), np.ones((3, 4))
    _matmul.matmul(a, b)  # no counter: nothing to count into
    with flops.count() as outer:
        _matmul.matmul(a, b)
        with flops.count() as inner:
            _matmul.matmul(np.ones((5, 2, 3)), b)  # a batch of 5 against one matrix
        assert inner.total == 5 * 48 and inner.by_op == {"matmul": 240}
    assert outer.total == 48 + 240
    assert not flops.active()


def _mlp_step_flops(kind, p, steps=3):
    rng = np.random.default_rng(0)
    model = models.mlp((512,), 10, hidden=(512, 512), dropout=kind, p=p, seed=0)
    x = cd.Tensor(rng.standard_normal((512, 512)).astype(np.float32))
    y = rng.integers(0, 10, 512)
    with flops.count() as c:
        for _ in range(steps):  # several steps: masks differ per step
            loss = cd.cross_entropy(model(x), y)
            model.zero_grad()
            loss.backward()
    return c.total


# The MLP 512 -> 512 -> 512 -> 10 on a batch of 512, per step: the first layer's forward and
# weight-gradient products (its input needs no gradient), three products in each later layer.
_DENSE = 2 * 512 ** 3 + 3 * 512 ** 3 + 3 * 512 ** 2 * 10
_DROPPED_SHARE = (3 * 512 ** 3 + 3 * 512 ** 2 * 10) / _DENSE  # the layers whose inputs drop


def test_the_dense_step_counts_its_products():
    assert _mlp_step_flops("none", 0.0, steps=1) == 2 * _DENSE


@pytest.mark.parametrize("kind", ["sparsedrop", "blockwise"])
def test_structured_variants_skip_work_in_proportion_to_p(kind):
    """The dropped layers' products shrink with the kept fraction: the step runs 1 - p x their
    share of the dense step's work (within a few percent for the random block counts of
    SparseDrop and block-wise dropout)."""
    dense = _mlp_step_flops("none", 0.0)
    ratios = [_mlp_step_flops(kind, p) / dense for p in (0.25, 0.5, 0.75)]
    assert ratios[0] > ratios[1] > ratios[2]
    for p, r in zip((0.25, 0.5, 0.75), ratios):
        assert abs(r - (1 - p * _DROPPED_SHARE)) < 0.04, (p, r)


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_sliceout_mlp_runs_each_layer_on_its_kept_block(p):
    """SliceOut's MLP (nn.SliceOutChain) keeps a fraction q = 1 - p of every hidden layer's
    units (exactly: 512 units, 32-unit aligned slices) and computes only those: the first
    layer's products shrink by q, the hidden one's by q^2 (both its inputs and its outputs
    are sliced), the last one's by q."""
    q = 1 - p
    macs = 2 * 512 ** 3 * q + 3 * 512 ** 3 * q * q + 3 * 512 ** 2 * 10 * q  # a step's
    assert _mlp_step_flops("sliceout", p) == 3 * 2 * macs  # 3 steps, 2 FLOPs a multiply-add


@pytest.mark.parametrize("kind", ["dropout", "gyro"])
def test_element_masks_run_the_dense_work(kind):
    assert _mlp_step_flops(kind, 0.5) == _mlp_step_flops("none", 0.0)


def _resnet_step_flops(steps=4, **kw):
    rng = np.random.default_rng(0)
    model = models.resnet20(in_channels=1, **kw)
    x = cd.Tensor(rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    y = rng.integers(0, 10, 4)
    with flops.count() as c:
        for _ in range(steps):
            loss = cd.cross_entropy(model(x), y)
            model.zero_grad()
            loss.backward()
    return c.total


def test_depth_dropout_and_stochastic_depth_skip_their_branches():
    """A dropped unit's branch runs neither forward nor backward: the step's work falls with p
    (depth dropout pays for its trainable 1x1 shortcuts, so p = 0.25 saves less than a
    quarter of the droppable units' work)."""
    plain = _resnet_step_flops()
    dd = [_resnet_step_flops(depth_dropout=p) / plain for p in (0.25, 0.5, 0.75)]
    assert dd[0] > dd[1] > dd[2] and dd[2] < 0.6, dd
    assert _resnet_step_flops(stochastic_depth=0.5) < plain
