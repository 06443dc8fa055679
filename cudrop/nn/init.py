"""Weight initialisation. Layers are built on the CPU from a NumPy Generator (so a seed gives
the same model on every device) and moved with ``Module.to``."""
import numpy as np


def rng_of(rng):
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")
    return rng


def uniform_fan_in(rng, shape, fan_in, dtype, gain=1.0):
    """PyTorch's default for Linear/Conv (Kaiming-uniform with a = sqrt(5)): U(-b, b),
    b = gain / sqrt(fan_in)."""
    bound = gain / np.sqrt(max(fan_in, 1))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def normal(rng, shape, std, dtype):
    return (rng.standard_normal(shape) * std).astype(dtype)
