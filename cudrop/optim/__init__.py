"""Optimizers and learning-rate schedules."""
from .optimizer import Optimizer
from .sgd import SGD
from .adam import Adam, AdamW
from .rmsprop import RMSprop
from .schedule import LRSchedule, StepLR, CosineLR, LinearWarmup
from .clip import clip_grad_norm
from .scaler import LossScaler

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "LRSchedule", "StepLR", "CosineLR",
           "LinearWarmup", "clip_grad_norm", "LossScaler"]
