"""Framework-agnostic ops on raw NumPy/CuPy arrays: each differentiable op is a pair
``op(...) -> (out, saved)`` and ``op_backward(grad_out, saved) -> grads``."""
