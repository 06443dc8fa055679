"""Layers and containers."""
from .attention import MultiHeadAttention
from .depth import (DepthDropout, StochasticDepth, conv_shortcut, linear_shortcut,
                    stochastic_depth_probs)
from .dropout import Dropout, Identity
from .gyro import BlockwiseDropout, BlockwiseLinear, GyroDropout
from .layers import (GELU, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Embedding, Flatten,
                     GlobalAvgPool2d, LayerNorm, Linear, MaxPool2d, ReLU, Tanh)
from .module import Module, ModuleList, Parameter, Sequential
from .residual import ConvBatchNorm, ResidualUnit, basic_block, bn_relu
from .sliceout import (SliceOut, SliceOutChain, SliceOutConv2d, SliceOutLinear,
                       SliceOutMultiHeadAttention)
from .sparsedrop import SparseDrop, SparseDropLinear
from .stochastic import Shard, StochasticLayer, number_layers, set_shard, set_step
from .variants import (DROPOUT_KINDS, dropped_linear, make_dropout,
                       set_total_steps)

__all__ = [n for n in dir() if not n.startswith("_") and n[0].isupper() or n in (
    "conv_shortcut", "linear_shortcut", "stochastic_depth_probs", "basic_block", "bn_relu",
    "number_layers", "set_step", "set_shard", "dropped_linear", "make_dropout", "set_total_steps",
    "DROPOUT_KINDS")]
