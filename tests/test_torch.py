"""cudrop inside PyTorch: the ops' gradients equal PyTorch's dense math on the materialised
mask, gradcheck in float64 through the NumPy path, clear errors, layers that learn. CPU tensors
run everywhere PyTorch is installed; the CUDA half is marked gpu."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cudrop import backend, masks  # noqa: E402
import cudrop.torch as ct  # noqa: E402
from cudrop.variants import sliceout  # noqa: E402

_cuda = pytest.mark.skipif(not (backend.gpu_available() and torch.cuda.is_available()),
                           reason="no usable CUDA GPU for both CuPy and PyTorch")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _cuda])]


def _t(shape, seed, device, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)


def _dense_mask(mask):
    return torch.from_numpy(np.asarray(backend.asnumpy(mask.to_dense()), dtype=np.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_sparsedrop_linear_grads_equal_dense_math(device):
    x, w, b = _t((37, 48), 0, device), _t((48, 20), 1, device), _t((20,), 2, device)
    xp = np if device == "cpu" else backend.cupy
    mask = masks.block_mask((37, 48), (16, 16), 0.5, seed=1, layer=2, step=3, xp=xp)
    y = ct.sparsedrop_linear(x, w, b, mask=mask)
    m = _dense_mask(mask).to(device)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    want = (x2 * m) @ w2 / 0.5 + b2
    torch.testing.assert_close(y, want)
    gy = _t((37, 20), 4, device, grad=False)
    y.backward(gy)
    want.backward(gy)
    for got, ref in ((x, x2), (w, w2), (b, b2)):
        torch.testing.assert_close(got.grad, ref.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_and_sliceout_match_dense_math(device):
    x = _t((64, 32), 5, device)
    y = ct.dropout(x, 0.5, seed=0, layer=1, step=2)
    keep = (y.detach() != 0).to(torch.float64)
    torch.testing.assert_close(y, x.detach() * keep * 2)
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep * 2)
    w = _t((32, 8), 6, device)
    mask = sliceout.draw_mask(32, 0.5, seed=0, layer=0, step=1, align=8)
    m = torch.from_numpy(mask.to_dense(np, np.float64)).to(device)
    x.grad = None
    y = ct.sliceout_linear(x, w, None, mask=mask)
    torch.testing.assert_close(y, (x.detach() * m * 2) @ w.detach())


def test_gradcheck_float64_cpu():
    x, w, b = _t((9, 16), 0, "cpu"), _t((16, 5), 1, "cpu"), _t((5,), 2, "cpu")
    mask = masks.block_mask((9, 16), (4, 8), 0.5, seed=0, layer=0, step=1)
    assert torch.autograd.gradcheck(lambda *t: ct.sparsedrop_linear(*t, mask=mask), (x, w, b))
    bm = masks.block_mask((9, 5), (4, 2), 0.5, seed=0, layer=0, step=2)
    assert torch.autograd.gradcheck(
        lambda *t: ct.blockwise_linear_out(*t, mask=bm, act=None), (x, w, b))
    assert torch.autograd.gradcheck(lambda a, c: ct.dsd(a, c, mask, 2.0), (x, w))


def test_bad_tensors_get_clear_errors():
    x, w = _t((4, 8), 0, "cpu"), _t((8, 3), 1, "cpu", dtype=torch.float32)
    with pytest.raises(TypeError, match="w is torch.float32 but x is torch.float64"):
        ct.sparsedrop_linear(x, w, p=0.5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ct.dropout(np.ones(3), 0.5)
    with pytest.raises(ValueError, match="expects inputs with 8 features"):
        ct.SparseDropLinear(8, 3, 0.5)(torch.ones(2, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_layers_advance_steps_and_mlp_learns_digits(device):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(d.target, device=device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        ct.SparseDropLinear(64, 256, 0.3, block=(32, 16), layer=0, device=device), torch.nn.ReLU(),
        ct.BlockwiseLinear(256, 256, 0.3, mode="input", layer=1, device=device,
                           block=(32, 32), co_scheduled=2), torch.nn.ReLU(),
        ct.SliceOutLinear(256, 10, 0.3, layer=2, device=device))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(15):
        for i in range(0, 1500, 100):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert int(model[0].step) == 15 * 15
    model.eval()
    with torch.no_grad():
        acc = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    # a plain torch.nn MLP of the same shape reaches 0.92 on this split (chance: 0.1)
    assert int(model[0].step) == 15 * 15 and acc > 0.85, acc


@pytest.mark.gpu
@_cuda
def test_cudrop_temporaries_inside_torch_ops_come_from_torch_allocator():
    """Inside a cudrop.torch op CuPy allocates from PyTorch's caching allocator (so a
    torch.cuda.graph capture keeps them in its pool), and the memory goes back when freed."""
    cp = backend.cupy
    x = torch.randn(256, 1024, device="cuda")
    pool_before = cp.get_default_memory_pool().used_bytes()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with ct._on_torch_stream(x):
        tmp = cp.empty((1 << 20,), dtype=cp.float32)
        assert torch.cuda.memory_allocated() - before >= tmp.nbytes
    assert cp.get_default_memory_pool().used_bytes() == pool_before
    del tmp
    assert torch.cuda.memory_allocated() == before
    y = ct.dropout(x.requires_grad_(), 0.5, seed=0, layer=0, step=0)
    y.sum().backward()
    assert cp.get_default_memory_pool().used_bytes() == pool_before


@pytest.mark.gpu
@_cuda
def test_a_pytorch_step_with_cudrop_layers_is_captured_by_torch_cuda_graph():
    """Dropout, SparseDropLinear and BlockwiseLinear keep their step on the device: a step
    captured with torch.cuda.graph and replayed equals the same steps run eagerly (new masks
    every replay; block-wise's schedule moves to a new set of sub-networks every step)."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                   ct.Dropout(0.3, seed=1, layer=0),
                                   ct.BlockwiseLinear(256, 192, 0.3, mode="output", act="relu",
                                                      block=(32, 32), num_subnets=12,
                                                      co_scheduled=3, seed=1, layer=2),
                                   ct.BlockwiseLinear(192, 96, 0.4, block=(32, 32),
                                                      num_subnets=8, co_scheduled=8,
                                                      schedule="random", seed=1, layer=3),
                                   ct.SparseDropLinear(96, 10, p=0.3, block=(32, 32), seed=1,
                                                       layer=1)).cuda()

    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(128, 64, device="cuda", generator=g),
                torch.randint(0, 10, (128,), device="cuda", generator=g)) for _ in range(8)]

    def run(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    eager = build()
    opt_e = torch.optim.SGD(eager.parameters(), 0.1, momentum=0.9)
    want = [float(run(eager, opt_e, x, y)) for x, y in batches]

    model = build()
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    got = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, y in batches[:3]:  # warm-up steps are real steps
            got.append(float(run(model, opt, x, y)))
    torch.cuda.current_stream().wait_stream(s)
    sx, sy = batches[3][0].clone(), batches[3][1].clone()
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = torch.nn.functional.cross_entropy(model(sx), sy)
        loss.backward()
        opt.step()
    # The capture recorded step 3 without running it: the device counters did not move.
    assert [int(model[i].step) for i in (2, 3, 4, 5)] == [3] * 4
    for x, y in batches[3:]:
        sx.copy_(x)
        sy.copy_(y)
        graph.replay()
        got.append(float(loss))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert [int(m.step) for m in (*model[2:6], *eager[2:6])] == [len(batches)] * 8
    for (n, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        np.testing.assert_allclose(b.detach().cpu().numpy(), a.detach().cpu().numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=n)
