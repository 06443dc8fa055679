"""The raw-array API: framework-agnostic ops on NumPy or CuPy arrays (or anything
``cudrop.backend.as_array`` imports), one flat namespace in the style of
``torch.nn.functional``.

Each differentiable op is a pair ``op(...) -> (out, saved)`` and
``op_backward(grad_out, saved) -> grads`` (one gradient per array input, in the forward's
order; ``saved`` a NamedTuple holding packed mask bits, never a float mask), so any framework
can wrap it. Every dropout variant takes its arrays first, then ``p``, then keywords: ``mask``
(apply a given mask) or ``seed``, ``layer``, ``step`` (the coordinates the mask is a pure
function of), then the variant's options. The variants' mask draws are
``cudrop.variants.<name>.draw_mask``; the same ops with gradients are the top-level
``cudrop.<op>``.
"""
from ._act import (add_relu, add_relu_backward, gelu, gelu_backward, gelu_tanh,
                   gelu_tanh_backward, linear, linear_backward, relu, relu_backward)
from ._attention import attention, attention_backward
from ._conv import conv2d, conv2d_backward
from ._conv_norm import conv_batch_norm, conv_batch_norm_backward
from ._embedding import embedding, embedding_backward
from ._loss import cross_entropy, cross_entropy_backward, mse_loss, mse_loss_backward
from ._matmul import matmul
from ._norm import batch_norm, batch_norm_backward, layer_norm, layer_norm_backward
from ._pool import (avg_pool2d, avg_pool2d_backward, global_avg_pool2d,
                    global_avg_pool2d_backward, max_pool2d, max_pool2d_backward)
from ._softmax import softmax, softmax_backward
from ._rows import gather_rows, gather_rows_backward, scatter_add_rows, scatter_add_rows_backward
from ._bsmm_pairs import dsd, dsd_backward, dsd_t, dsd_t_backward, sdd, sdd_backward
from ..variants.blockwise import (blockwise_dropout, blockwise_dropout_backward,
                                  blockwise_linear, blockwise_linear_backward,
                                  blockwise_linear_out, blockwise_linear_out_backward)
from ..variants.dropout import dropout, dropout_backward
from ..variants.gyro import gyro_dropout, gyro_dropout_backward
from ..variants.sliceout import (sliceout, sliceout_attention, sliceout_attention_backward,
                                 sliceout_backward, sliceout_conv2d, sliceout_conv2d_backward,
                                 sliceout_linear, sliceout_linear_backward, sliceout_linear_out,
                                 sliceout_linear_out_backward)
from ..variants.sparsedrop import (sparsedrop, sparsedrop_backward, sparsedrop_linear,
                                   sparsedrop_linear_backward)

__all__ = sorted(n for n in dir() if not n.startswith("_"))
