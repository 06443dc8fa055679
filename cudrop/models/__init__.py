"""Model builders. Each takes ``dropout=`` (a kind from ``cudrop.nn.DROPOUT_KINDS``) and ``p``."""
from .mlp import mlp
from .resnet import ResNet, resnet20, resnet56
from .transformer import GPT, TransformerBlock, ViT
