"""Whole training steps captured as CUDA graphs (cudrop.graph): replays equal eager steps
(losses, weights, optimizer state, layer counters) for the capturable variants, schedules keep
working, and what cannot be captured falls back to eager with one warning, never a wrong
result."""
import warnings

import numpy as np
import pytest

import cudrop
from cudrop import backend, graph, models, optim
from cudrop.functional import _gemm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU"),
              pytest.mark.skipif(not _gemm.available(),
                                 reason="nvmath-python (capturable GEMMs) not installed")]


def _batches(steps, batch=128, features=64, classes=10, seed=0, shape=None):
    cp = backend.cupy
    rng = np.random.default_rng(seed)
    shape = shape or (features,)
    return [(cp.asarray(rng.standard_normal((batch,) + shape, dtype=np.float32)),
             cp.asarray(rng.integers(0, classes, batch))) for _ in range(steps)]


def _run(build, make_opt, batches, captured, if_nodes=None):
    model = build().to("gpu")
    opt = make_opt(model.parameters())
    sched = optim.LinearWarmup(opt, 3, after=optim.CosineLR(opt, total_steps=len(batches)))

    def step(x, y):
        loss = cudrop.cross_entropy(model(cudrop.Tensor(x)), y)
        model.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return loss

    run = graph.capture(step, model=model, optimizer=opt, schedule=sched,
                        if_nodes=if_nodes) if captured else step
    losses = [float(run(x, y).data) for x, y in batches]
    return run, losses, model, opt


def _same(a, b):
    run_a, losses_a, model_a, opt_a = a
    run_b, losses_b, model_b, opt_b = b
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-6, atol=1e-7)
    sa, sb = model_a.state_dict(), model_b.state_dict()  # weights and every layer counter
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert opt_b.steps == opt_a.steps and opt_b.lr == opt_a.lr


def _captured_equals_eager(build, make_opt, batches):
    """The same run eagerly and captured (no fallback to eager allowed) gives the same losses,
    weights, counters and optimizer state."""
    eager = _run(build, make_opt, batches, captured=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn: fail instead
        captured = _run(build, make_opt, batches, captured=True)
    run = captured[0]
    assert run.graph is not None and run.failed is None
    _same(eager, captured)


@pytest.mark.parametrize("kind", ["none", "dropout", "sparsedrop", "sliceout", "blockwise"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_captured_mlp_steps_equal_eager(kind, opt):
    def build():
        return models.mlp((64,), 10, hidden=(256, 256), dropout=kind, p=0.3, seed=0)

    make_opt = {"sgd": lambda p: optim.SGD(p, 0.05, momentum=0.9, nesterov=True,
                                           weight_decay=1e-4),
                "adam": lambda p: optim.AdamW(p, 1e-3)}[opt]
    _captured_equals_eager(build, make_opt, _batches(12))


@pytest.mark.parametrize("kind", ["dropout", "sliceout", "gyro", "blockwise", "sparsedrop"])
def test_100_captured_steps_draw_the_eager_masks(kind):
    """Over 100 steps (issue 10's bar), for every variant of the MLP, the replays draw the
    masks of the eager steps: every loss agrees, and the layers' step counters and weights end
    equal."""
    def build():
        return models.mlp((64,), 10, hidden=(128, 128), dropout=kind, p=0.5, seed=3)

    make_opt = lambda p: optim.SGD(p, 0.02, momentum=0.9)  # noqa: E731
    batches = _batches(100, batch=64)
    _captured_equals_eager(build, make_opt, batches)


def _loss_scaled_fp16_runs(build, steps, overflow_at, strict=False):
    """An eager and a captured run of ``steps`` float16 steps with LossScaler (SGD, momentum)
    on ``build()``'s model, the inputs of step ``overflow_at`` scaled to overflow; ``strict``:
    any warning (a fallback to eager) fails. Each run: (losses, scales, state_dict, step)."""
    def run(captured):
        model = build()
        opt = optim.SGD(model.parameters(), 0.05, momentum=0.9)
        scaler = optim.LossScaler(init_scale=2.0 ** 15, growth_interval=3)

        def step(x, y):
            loss = cudrop.cross_entropy(model(cudrop.Tensor(x)), y)
            model.zero_grad()
            scaler.backward(loss)
            scaler.step(opt)
            return loss

        fn = graph.capture(step, model=model, optimizer=opt) if captured else step
        losses, scales = [], []
        with warnings.catch_warnings():
            if strict:
                warnings.simplefilter("error")
            for i, (x, y) in enumerate(_batches(steps, batch=64)):
                x = x.astype(np.float16) * np.float16(6e4 if i == overflow_at else 1)
                losses.append(float(fn(x, y).data))
                scales.append(float(scaler.scale))
        return losses, scales, model.state_dict(), fn
    return run(False), run(True)


def _assert_fp16_runs_agree(eager, captured, overflow_at):
    """The captured run replayed graphs, halved its scale at the overflow as the eager run did,
    and ends with the same losses and weights to float16 tolerance."""
    cp = backend.cupy
    l_e, s_e, w_e, _ = eager
    l_c, s_c, w_c, fn = captured
    assert fn.graph is not None and fn.failed is None
    assert s_c == s_e and s_e[overflow_at] == s_e[overflow_at - 1] / 2
    np.testing.assert_allclose(l_c, l_e, rtol=1e-3)
    for k in w_e:
        np.testing.assert_allclose(cp.asnumpy(cp.asarray(w_c[k])).astype(np.float64),
                                   cp.asnumpy(cp.asarray(w_e[k])).astype(np.float64),
                                   rtol=1e-3, atol=1e-3, err_msg=k)


def test_captured_fp16_step_with_loss_scaling_equals_eager():
    """float16 with LossScaler: the scale, the overflow flag and the skip live on the device, so
    the step is captured; replays match eager steps, an overflowing step included."""
    def build():
        model = models.mlp((64,), 10, hidden=(128,), dropout="dropout", p=0.3, seed=0)
        return model.to("gpu", dtype=np.float16)

    _assert_fp16_runs_agree(*_loss_scaled_fp16_runs(build, 10, overflow_at=5), overflow_at=5)


def test_captured_resnet_step_equals_eager():
    def build():
        return models.ResNet(8, num_classes=10, in_channels=1, widths=(8, 16, 16), seed=0)

    make_opt = lambda p: optim.SGD(p, 0.05, momentum=0.9)  # noqa: E731
    batches = _batches(8, batch=32, shape=(1, 8, 8))
    _captured_equals_eager(build, make_opt, batches)


_GATED = [(dict(depth_dropout=0.5), "sgd", False), (dict(depth_dropout=0.5), "adam", False),
          (dict(stochastic_depth=0.5), "sgd", False), (dict(stochastic_depth=0.5), "adam", False),
          (dict(depth_dropout=0.75, keep_downsampling=False), "sgd", False),
          (dict(depth_dropout=0.75, keep_downsampling=False), "adam", False),
          (dict(depth_dropout=0.5), "sgd", True), (dict(stochastic_depth=0.5), "adam", True)]


@pytest.mark.parametrize("variant,opt,if_nodes", _GATED)
def test_captured_gated_resnet_steps_equal_eager(variant, opt, if_nodes):
    """Depth dropout and stochastic depth (batch gates) replay one graph whose dropped bodies
    are skipped per replay (graph.gate), over 100 steps: losses, weights, BatchNorm
    running statistics, unit steps and the optimizers' per-parameter step counts equal eager
    mode's, where a dropped body is not run and its parameters are not updated. The capture
    waits in eager steps until every unit has been kept once. Gated parts are pieces of their
    own (the default) or IF nodes of one graph (``capture(if_nodes=True)``)."""
    def build():
        return models.ResNet(14, num_classes=10, in_channels=1, widths=(8, 16, 16), seed=0,
                             **variant)

    make_opt = {"sgd": lambda p: optim.SGD(p, 0.05, momentum=0.9, weight_decay=1e-4),
                "adam": lambda p: optim.AdamW(p, 1e-3)}[opt]
    batches = _batches(100, batch=32, shape=(1, 8, 8))
    eager = _run(build, make_opt, batches, captured=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn: fail instead
        captured = _run(build, make_opt, batches, captured=True, if_nodes=if_nodes)
    run = captured[0]
    assert run.graph is not None and run.failed is None and run.recorder.gates
    assert run.conditional_error is None
    # IF nodes: one graph, every gated part a node; pieces: no node
    assert bool(run.recorder.conds) == if_nodes
    if if_nodes:  # per unit: forward, backward, and Adam's updates (SGD's read the flag)
        assert len(run.recorder.conds) == (2 if opt == "sgd" else 3) * len(run.recorder.gates)
    assert isinstance(run.graph, graph._PiecedGraph) != if_nodes
    assert run.calls - run.waited > 50  # most steps were replays
    _same(eager, captured)
    for se, sc in zip(eager[3].state, captured[3].state):
        assert se.get("step") == sc.get("step")
    gates = run.recorder.gates
    assert any(not g.on for g in gates) and any(g.on for g in gates)  # both kinds replayed


def test_captured_gated_fp16_step_with_loss_scaling_equals_eager():
    """float16 with LossScaler and depth-dropout units (an identity and a trainable shortcut)
    in an MLP: a gated parameter's overflow check is part of its gate, so a skipped unit's
    stale gradient never decides whether a step is skipped; replays match eager steps, an
    overflowing step included (the fp16 test above's tolerances)."""
    from cudrop import nn

    def build():
        rng = np.random.default_rng(0)
        body = lambda: nn.Sequential(nn.Linear(128, 128, rng=rng), nn.ReLU())  # noqa: E731
        return nn.number_layers(nn.Sequential(
            nn.Linear(64, 128, rng=rng), nn.ReLU(),
            nn.DepthDropout(body(), p=0.5),
            nn.DepthDropout(body(), nn.linear_shortcut(128, 128, rng=rng), p=0.5),
            nn.StochasticDepth(body(), p=0.3),
            nn.Linear(128, 10, rng=rng)), seed=5).to("gpu", dtype=np.float16)

    eager, captured = _loss_scaled_fp16_runs(build, 30, overflow_at=25, strict=True)
    _assert_fp16_runs_agree(eager, captured, overflow_at=25)
    fn = captured[3]
    assert fn.calls - fn.waited > 10  # most steps replayed the graph


def test_per_sample_stochastic_depth_falls_back_to_eager():
    def build():
        return models.ResNet(8, num_classes=10, in_channels=1, widths=(8, 16, 16), seed=0,
                             stochastic_depth=0.5, stochastic_depth_mode="sample")

    make_opt = lambda p: optim.SGD(p, 0.05)  # noqa: E731
    batches = _batches(5, batch=16, shape=(1, 8, 8))
    eager = _run(build, make_opt, batches, captured=False)
    with pytest.warns(RuntimeWarning, match=r"StochasticDepth\(layer \d+\) decides"):
        captured = _run(build, make_opt, batches, captured=True)
    _same(eager, captured)


@pytest.mark.parametrize("kind", ["dropout", "sparsedrop"])
def test_captured_vit_step_equals_eager(kind):
    """A transformer (attention products, softmax, layer norm, the MLP's dropped units) with
    AdamW: replays equal eager steps."""
    def build():
        return models.ViT(image_size=8, patch_size=2, in_channels=1, dim=32, depth=1, heads=4,
                          mlp_ratio=4, dropout=kind, p=0.3, seed=0)

    make_opt = lambda p: optim.AdamW(p, 1e-3)  # noqa: E731
    _captured_equals_eager(build, make_opt, _batches(6, batch=16, shape=(1, 8, 8)))


def test_captured_sliceout_linear_steps_equal_eager_in_both_modes_and_wrap_mode():
    """SliceOutLinear's slice decided on the device at every replay: output-unit and input-unit
    SliceOut, wrap mode over 100 units (ragged, slices that wrap past the last unit), aligned
    mode over 96; replays equal eager steps (losses, weights, layer steps)."""
    from cudrop import nn

    def build():
        rng = np.random.default_rng(0)
        return nn.number_layers(nn.Sequential(
            nn.SliceOutLinear(64, 100, 0.3, mode="output", align=None, rng=rng), nn.ReLU(),
            nn.SliceOutLinear(100, 96, 0.5, mode="input", align=None, rng=rng), nn.ReLU(),
            nn.SliceOutLinear(96, 10, 0.25, mode="input", align=16, rng=rng)), seed=3)

    make_opt = lambda p: optim.SGD(p, 0.05, momentum=0.9)  # noqa: E731
    _captured_equals_eager(build, make_opt, _batches(8, batch=48))


def test_captured_gyro_steps_equal_eager_across_set_changes():
    """Element gyro dropout decided on the device at every replay, over 60 steps: the
    consecutive schedule with period 3 (a new set of sub-networks every 3 steps; the cycle of 8
    sets runs 2.5 times) on ragged row groups (50 rows, τ = 4), and the random schedule (new
    sub-networks every step) on 5 groups of 10 rows. Replays equal eager steps (which take
    the same device path with int steps; test_gyro_device.py checks that against the host
    path): losses, weights, layer steps, and the last step's masks."""
    from cudrop import nn

    def build():
        rng = np.random.default_rng(0)
        return nn.number_layers(nn.Sequential(
            nn.Linear(64, 96, rng=rng), nn.ReLU(),
            nn.GyroDropout(0.3, num_subnets=32, co_scheduled=4, period=3, ragged=True),
            nn.Linear(96, 80, rng=rng), nn.ReLU(),
            nn.GyroDropout(0.5, num_subnets=40, co_scheduled=5, schedule="random"),
            nn.Linear(80, 10, rng=rng)), seed=3)

    make_opt = lambda p: optim.SGD(p, 0.05, momentum=0.9)  # noqa: E731
    batches = _batches(60, batch=50)
    eager = _run(build, make_opt, batches, captured=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn: fail instead
        captured = _run(build, make_opt, batches, captured=True)
    assert captured[0].graph is not None and captured[0].failed is None
    _same(eager, captured)
    drops = [[m for m in run[2].modules() if isinstance(m, nn.GyroDropout)]
             for run in (eager, captured)]
    for e, c in zip(*drops):
        assert e.step == c.step == 60 and c.last_mask.on_device  # the captured mask
        assert e.last_mask.on_device and e.last_mask.draw.step == 59  # eager: an int step
        back = c.last_mask.host()  # read at the last replay's step: the last eager mask
        want = e.last_mask.host()
        assert back.subnets == want.subnets
        np.testing.assert_array_equal(backend.asnumpy(back.keep), backend.asnumpy(want.keep))


def test_captured_blockwise_output_pruning_and_schedules_equal_eager():
    """Block-wise gyro decided on the device at every replay, both of BlockwiseLinear's modes:
    output pruning with ReLU (sdd forward) on the consecutive schedule with period 2 and fewer
    row blocks than τ (the co-scheduled sub-networks span steps), input pruning on the random
    schedule with a ragged last row block, over 30 steps."""
    from cudrop import nn

    def build():
        rng = np.random.default_rng(0)
        return nn.number_layers(nn.Sequential(
            nn.BlockwiseLinear(64, 96, 0.3, mode="output", act="relu", block=(32, 32),
                               num_subnets=24, co_scheduled=6, period=2, rng=rng),
            nn.BlockwiseLinear(96, 80, 0.5, block=(32, 16), num_subnets=40, co_scheduled=5,
                               schedule="random", rng=rng), nn.ReLU(),
            nn.Linear(80, 10, rng=rng)), seed=3)

    make_opt = lambda p: optim.SGD(p, 0.05, momentum=0.9)  # noqa: E731
    _captured_equals_eager(build, make_opt, _batches(30, batch=100))


def test_host_decided_layers_fall_back_to_eager_with_one_warning():
    from cudrop import nn

    def build():
        rng = np.random.default_rng(0)
        return nn.number_layers(nn.Sequential(
            nn.Linear(64, 96, rng=rng), nn.ReLU(), nn.SliceOut(0.3),
            nn.Linear(96, 10, rng=rng)), seed=0)

    make_opt = lambda p: optim.SGD(p, 0.05)  # noqa: E731
    batches = _batches(6)
    eager = _run(build, make_opt, batches, captured=False)
    with pytest.warns(RuntimeWarning, match=r"SliceOut\(layer \d+\) decides its mask "
                                            r"on the host") as rec:
        captured = _run(build, make_opt, batches, captured=True)
    assert len(rec) == 1 and captured[0].failed is not None
    _same(eager, captured)


def test_a_batch_of_another_shape_runs_eagerly_between_replays():
    def build():
        return models.mlp((64,), 10, hidden=(128,), dropout="dropout", p=0.3, seed=0)

    make_opt = lambda p: optim.Adam(p, 1e-3)  # noqa: E731
    batches = _batches(6)
    batches.insert(4, _batches(1, batch=40, seed=9)[0])  # a short batch mid-run
    batches += _batches(3, seed=4)
    _same(_run(build, make_opt, batches, captured=False),
          _run(build, make_opt, batches, captured=True))


@pytest.mark.parametrize("kind", ["dropout", "gyro", "blockwise"])
def test_trainer_with_capture_equals_eager_trainer(kind):
    """Trainer(capture=True): the same history (losses, validation metrics) and weights as
    eager training over 2 epochs with a short last batch (run eagerly) and a schedule; gyro
    (ragged row groups: τ = 8 does not divide the batch of 100) and block-wise gyro (a ragged
    row block) are captured."""
    from cudrop import data
    from cudrop.train import ClassifierTask, Trainer

    ds = data.load_digits()

    def fit(capture):
        model = models.mlp(ds.input_shape, 10, hidden=(64, 64), dropout=kind, p=0.3, seed=1)
        model = model.to("gpu")
        task = ClassifierTask(ds, 100, "gpu")  # 1,257 images: 12 full batches and one of 57
        opt = optim.SGD(model.parameters(), 0.05, momentum=0.9)
        sched = optim.CosineLR(opt, total_steps=2 * task.steps_per_epoch)
        trainer = Trainer(model, opt, task, schedule=sched, seed=0, progress=False,
                          log=lambda line: None, capture=capture)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hist, final = trainer.fit(2)
        return hist.epochs, final, model.state_dict(), trainer, caught

    h_e, f_e, w_e, _, _ = fit(False)
    h_c, f_c, w_c, trainer, caught = fit(True)
    step = trainer.captured_step
    assert step.graph is not None and step.failed is None
    assert not any("cannot be captured" in str(w.message) for w in caught)
    for a, b in zip(h_e, h_c):
        for k in ("train_loss", "val_loss", "val_acc"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    assert f_c == pytest.approx(f_e, rel=1e-5, abs=1e-6)
    for k in w_e:
        np.testing.assert_allclose(w_c[k], w_e[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_trainer_capture_refuses_a_model_on_the_cpu():
    from cudrop import data
    from cudrop.train import ClassifierTask, Trainer
    ds = data.load_digits()
    model = models.mlp(ds.input_shape, 10, hidden=(8,), seed=0)
    with pytest.raises(ValueError, match="capture=True needs the model on the GPU"):
        Trainer(model, optim.SGD(model.parameters(), 0.1), ClassifierTask(ds, 32, "cpu"),
                capture=True)
