"""Every dropout kind in every model builder: training forward/backward runs and reaches every
parameter, eval is deterministic and dense, masks advance per step; the registry and the CLI."""
import numpy as np
import pytest

import cudrop as cd
from cudrop import cli, models, nn

KINDS = [k for k in nn.DROPOUT_KINDS if k != "none"]

BUILDERS = {
    "mlp": (lambda kind: models.mlp((1, 8, 8), 10, hidden=(256, 256), dropout=kind, p=0.3),
            (16, 1, 8, 8)),
    "resnet": (lambda kind: models.ResNet(8, num_classes=10, in_channels=1, dropout=kind, p=0.3),
               (16, 1, 6, 6)),
    "vit": (lambda kind: models.ViT(image_size=8, patch_size=4, in_channels=1, dim=32, depth=1,
                                    heads=4, dropout=kind, p=0.3), (16, 1, 8, 8)),
    "gpt": (lambda kind: models.GPT(12, block_size=8, dim=32, depth=1, heads=4, dropout=kind,
                                    p=0.3), (16, 8)),
}


def _input(name, shape):
    rng = np.random.default_rng(0)
    if name == "gpt":
        return rng.integers(0, 12, shape)
    return cd.Tensor(rng.random(shape, dtype=np.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_kind_trains_in_every_builder(name, kind):
    build, shape = BUILDERS[name]
    m = build(kind)
    x = _input(name, shape)
    targets = np.zeros(shape if name == "gpt" else shape[0], np.int64)
    y1 = m(x)
    cd.cross_entropy(y1, targets).backward()
    assert all(p.grad is not None for p in m.parameters())
    stochastic = [s for s in m.modules() if isinstance(s, nn.StochasticLayer)]
    assert stochastic and all(s.step == 1 for s in stochastic)
    assert not np.array_equal(m(x).data, y1.data)  # the next step draws another mask
    m.eval()
    with cd.no_grad():
        a, b = m(x).data, m(x).data
    assert np.array_equal(a, b) and all(s.step == 2 for s in stochastic)


def test_fused_kinds_use_fused_layers():
    m = models.mlp((1, 8, 8), 10, hidden=(256, 256), dropout="sparsedrop", p=0.5)
    assert sum(isinstance(l, nn.SparseDropLinear) for l in m.modules()) == 2
    m = models.mlp((1, 8, 8), 10, hidden=(256, 256), dropout="sliceout", p=0.5)
    assert sum(isinstance(l, nn.SliceOutLinear) for l in m.modules()) == 2
    g = models.GPT(12, block_size=8, dim=32, depth=1, heads=4, dropout="sliceout", p=0.5)
    assert any(isinstance(l, nn.SliceOutMultiHeadAttention) for l in g.modules())
    plain = models.mlp((1, 8, 8), 10, hidden=(256, 256), dropout="dropout", p=0.0)
    assert not any(isinstance(l, nn.StochasticLayer) for l in plain.modules())


def test_set_total_steps_sets_gyro_period():
    m = models.mlp((1, 8, 8), 10, hidden=(64, 64), dropout="gyro", p=0.3)
    nn.set_total_steps(m, 4096)
    gy = [l for l in m.modules() if isinstance(l, nn.GyroDropout)]
    assert gy and all(l.period == 4096 * l.co_scheduled // l.num_subnets for l in gy)


def test_registry_rejects_unknown_kind_and_bad_p():
    with pytest.raises(ValueError, match="dropout must be one of"):
        nn.dropped_linear("bogus", 4, 4, 0.1)
    with pytest.raises(ValueError, match="p"):
        nn.make_dropout("gyro", 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_trains_each_kind(kind, tmp_path):
    out = tmp_path / "r.json"
    assert cli.main(["train", "--dropout", kind, "--p", "0.3", "--epochs", "2", "--no-progress",
                     "--json", str(out)]) == 0


def test_cli_depth_options(tmp_path, capsys):
    assert cli.main(["train", "--model", "resnet20", "--epochs", "1", "--depth-dropout", "0.5",
                     "--no-progress"]) == 0
    assert "depth dropout 0.5" in capsys.readouterr().out
    assert cli.main(["train", "--model", "mlp", "--depth-dropout", "0.5"]) == 2
    assert "--depth-dropout applies to" in capsys.readouterr().err
    assert cli.main(["train", "--model", "resnet20", "--depth-dropout", "0.5",
                     "--stochastic-depth", "0.5"]) == 2
    assert "alternatives" in capsys.readouterr().err


def test_gyro_period_follows_latest_total_steps_and_is_saved():
    layer = nn.GyroDropout(0.3, num_subnets=64, co_scheduled=8)
    layer.set_total_steps(800)
    assert layer.period == 100
    layer.set_total_steps(80)
    assert layer.period == 10
    fixed = nn.GyroDropout(0.3, num_subnets=64, co_scheduled=8, period=3)
    fixed.set_total_steps(800)
    assert fixed.period == 3
    state = layer.state_dict()
    assert int(state["period"]) == 10 and "seed" in state and "layer" in state
    other = nn.GyroDropout(0.3, num_subnets=64, co_scheduled=8, seed=9, layer=99)
    other.load_state_dict(state)
    assert (other.period, other.seed, other.layer) == (10, layer.seed, layer.layer)


def test_checkpoint_moves_between_variants():
    a = models.mlp((1, 8, 8), 10, hidden=(64, 64), dropout="gyro", p=0.3)
    b = models.mlp((1, 8, 8), 10, hidden=(64, 64), dropout="none")
    b.load_state_dict(a.state_dict())  # counters of a's dropout layers are skipped, not errors
    x = cd.Tensor(np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32))
    a.eval()
    assert np.array_equal(a(x).data, b(x).data)


def test_small_validations():
    from cudrop.data import num_batches
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(10, 0)
    with pytest.raises(ValueError, match="block"):
        nn.SparseDrop(0.5, block=(0, 3))
    with pytest.raises(ValueError, match="block"):
        nn.SparseDropLinear(8, 8, 0.5, block=(True, 4))
    assert cli.main(["train", "--seed", "-1"]) == 2


@pytest.mark.parametrize("xp_name", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_blockwise_linear_prunes_its_gemms_and_equals_drop_then_linear(xp_name):
    """dropped_linear('blockwise') runs the block-sparse GEMMs on the gyro mask (input
    pruning); it equals BlockwiseDropout followed by the Linear, forward and gradients."""
    from cudrop import backend
    if xp_name == "cupy" and not backend.gpu_available():
        pytest.skip("no usable CUDA GPU")
    xp = np if xp_name == "numpy" else backend.cupy
    fused = nn.dropped_linear("blockwise", 96, 40, 0.5, rng=np.random.default_rng(0),
                              dtype=np.float64)
    plain = nn.Linear(96, 40, rng=np.random.default_rng(0), dtype=np.float64)
    drop = nn.BlockwiseDropout(0.5, block=(16, 32), seed=fused.drop.seed,
                               layer=fused.drop.layer)
    fused.drop.block = (16, 32)
    for layer in (fused, plain, drop):
        layer.to("gpu" if xp_name == "cupy" else "cpu")
    x = cd.Tensor(xp.asarray(np.random.default_rng(1).standard_normal((50, 96))),
                  requires_grad=True)
    x2 = cd.Tensor(x.data.copy(), requires_grad=True)
    y1 = fused(x)
    y2 = plain(drop(x2))
    (y1 * y1).sum().backward()
    (y2 * y2).sum().backward()
    assert fused.drop.last_mask is not None and drop.last_mask is not None
    np.testing.assert_allclose(backend.asnumpy(y1.data), backend.asnumpy(y2.data), rtol=1e-10,
                               atol=1e-12)
    for a, b in ((x.grad, x2.grad), (fused.weight.grad, plain.weight.grad),
                 (fused.bias.grad, plain.bias.grad)):
        np.testing.assert_allclose(backend.asnumpy(a), backend.asnumpy(b), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("xp_name", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_blockwise_linear_prunes_its_output_and_equals_linear_act_drop(xp_name, act):
    """nn.BlockwiseLinear (output pruning: only kept output blocks are computed) equals Linear
    -> act -> BlockwiseDropout, forward and gradients, edge blocks partial."""
    from cudrop import backend
    if xp_name == "cupy" and not backend.gpu_available():
        pytest.skip("no usable CUDA GPU")
    xp = np if xp_name == "numpy" else backend.cupy
    kw = dict(block=(16, 32), seed=3, layer=7, co_scheduled=2)
    fused = nn.BlockwiseLinear(48, 72, 0.5, mode="output", act=act, rng=np.random.default_rng(0),
                               dtype=np.float64, **kw)
    plain = nn.Linear(48, 72, rng=np.random.default_rng(0), dtype=np.float64)
    drop = nn.BlockwiseDropout(0.5, **kw)
    dev = "gpu" if xp_name == "cupy" else "cpu"
    for layer in (fused, plain, drop):
        layer.to(dev)
    x = cd.Tensor(xp.asarray(np.random.default_rng(1).standard_normal((40, 48))),
                  requires_grad=True)
    x2 = cd.Tensor(x.data.copy(), requires_grad=True)
    y1 = fused(x)
    h = plain(x2)
    y2 = drop(cd.relu(h) if act == "relu" else h)
    g = xp.asarray(np.random.default_rng(2).standard_normal((40, 72)))
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    keep = backend.asnumpy(fused.drop.last_mask.to_dense())
    assert 0 < keep.mean() < 1
    assert (backend.asnumpy(y1.data)[~keep] == 0).all()
    for a, b in ((y1.data, y2.data), (x.grad, x2.grad), (fused.weight.grad, plain.weight.grad),
                 (fused.bias.grad, plain.bias.grad)):
        np.testing.assert_allclose(backend.asnumpy(a), backend.asnumpy(b), rtol=1e-10,
                                   atol=1e-12)
    fused.eval()
    with cd.no_grad():
        ye = fused(x).data
    ref = plain(x).data
    np.testing.assert_allclose(backend.asnumpy(ye), backend.asnumpy(
        xp.maximum(ref, 0) if act == "relu" else ref), rtol=1e-12)


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_blockwise_dense_paths_equal_the_block_sparse_ones(monkeypatch, act, bias):
    """Where ``bsmm.runs_dense`` says a product runs densely (on the GPU: 128 x 32 blocks on
    Hopper), input pruning keeps one masked copy of x for dW and output pruning masks g once
    for its backward, each then running the Linear's pair; forced here on NumPy, both equal
    the block-sparse reference path, forward and gradients, ragged edge blocks."""
    from cudrop import bsmm
    from cudrop.variants import blockwise
    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, 72))
    w, wo = rng.standard_normal((72, 40)), rng.standard_normal((72, 56))
    b, bo = (rng.standard_normal(40), rng.standard_normal(56)) if bias else (None, None)
    g, go = rng.standard_normal((50, 40)), rng.standard_normal((50, 56))
    kw = dict(seed=3, layer=1, step=4, block=(16, 32), co_scheduled=2)

    def run():
        y, s = blockwise.blockwise_linear(x, w, b, 0.5, **kw)
        yo, so = blockwise.blockwise_linear_out(x, wo, bo, 0.5, act=act, **kw)
        grads = blockwise.blockwise_linear_backward(g, s)
        grads_o = blockwise.blockwise_linear_out_backward(go, so)
        return s, [y, yo, *grads, *grads_o]

    sparse_saved, want = run()
    assert sparse_saved.dense is None
    monkeypatch.setattr(bsmm, "runs_dense", lambda *a, **k: True)
    dense_saved, got = run()
    assert dense_saved.dense is not None and dense_saved.x is None
    for i, (a, e) in enumerate(zip(got, want)):
        if e is None:
            assert a is None, i
        else:
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12, err_msg=str(i))
