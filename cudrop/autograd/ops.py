"""Every op that has a functional pair, as a Tensor op made by the one generic wrapper
(``pair.differentiable``): the same name, arguments and docstring as the raw-array pair in
``cudrop.functional``, with gradients. Ops apply what they are given (a mask, or the
(p, seed, layer, step) it is drawn from); only layers decide train versus eval."""
from __future__ import annotations

from ..functional import (_act, _attention, _bsmm_pairs, _conv, _conv_norm, _embedding, _gate,
                          _loss, _norm, _pool, _rows)
from ..variants import blockwise, dropout as _dropout, gyro, sliceout, sparsedrop
from .pair import differentiable

_PAIRS = [  # (module, name, the array inputs: names, or the first n)
    (_conv, "conv2d", 3), (_pool, "max_pool2d", 1), (_pool, "avg_pool2d", 1),
    (_pool, "global_avg_pool2d", 1), (_norm, "batch_norm", 3), (_norm, "layer_norm", 3),
    (_conv_norm, "conv_batch_norm", 4),
    (_embedding, "embedding", 2), (_loss, "cross_entropy", 2), (_loss, "mse_loss", 2),
    (_rows, "gather_rows", 2), (_rows, "scatter_add_rows", 3),
    (_gate, "gate_in", 1), (_gate, "gate_out", 2),
    (_act, "linear", 3), (_act, "add_relu", 2), (_attention, "attention", 1),
    (_bsmm_pairs, "dsd", ("a", "b", "bias")),
    (_bsmm_pairs, "dsd_t", ("a", "b")), (_bsmm_pairs, "sdd", ("a", "b", "bias")),
    (_dropout, "dropout", 1),
    (sliceout, "sliceout", 1), (sliceout, "sliceout_linear", 3),
    (sliceout, "sliceout_linear_out", 3), (sliceout, "sliceout_linear_compact", 3),
    (sliceout, "sliceout_conv2d", 3),
    (sliceout, "sliceout_attention", 5),
    (gyro, "gyro_dropout", 1),
    (blockwise, "blockwise_dropout", 1), (blockwise, "blockwise_linear", 3),
    (blockwise, "blockwise_linear_out", 3),
    (sparsedrop, "sparsedrop", 1), (sparsedrop, "sparsedrop_linear", 3),
]

__all__ = []
for _mod, _name, _n in _PAIRS:
    globals()[_name] = differentiable(getattr(_mod, _name), getattr(_mod, _name + "_backward"), _n)
    __all__.append(_name)
del _mod, _name, _n
