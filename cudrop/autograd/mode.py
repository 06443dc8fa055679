"""Global switches: gradient recording and train/eval.

``no_grad()`` stops graph recording (inference, optimizer updates). ``eval_mode()`` /
``train_mode()`` flip the global training flag that dropout-like layers read together with their
own ``Module.training`` flag: a layer is in training iff both say so.
"""
import contextlib
import threading


class _State(threading.local):
    def __init__(self):
        self.grad_enabled = True
        self.training = True


_state = _State()


def is_grad_enabled() -> bool:
    return _state.grad_enabled


def is_training() -> bool:
    return _state.training


def set_training(flag: bool) -> None:
    _state.training = bool(flag)


@contextlib.contextmanager
def _using(attr, value):
    old = getattr(_state, attr)
    setattr(_state, attr, value)
    try:
        yield
    finally:
        setattr(_state, attr, old)


def no_grad():
    """Context manager: operations inside build no graph."""
    return _using("grad_enabled", False)


def enable_grad():
    return _using("grad_enabled", True)


def eval_mode():
    """Context manager: every dropout-like op behaves as at test time."""
    return _using("training", False)


def train_mode():
    return _using("training", True)
