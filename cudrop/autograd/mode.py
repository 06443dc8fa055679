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
    """Whether operations record the graph now (False inside ``no_grad()``); per thread."""
    return _state.grad_enabled


def is_training() -> bool:
    """The global training flag (False inside ``eval_mode()``); per thread. A layer trains only
    when this and its own ``Module.training`` are both True."""
    return _state.training


def set_training(flag: bool) -> None:
    """Set the global training flag for this thread until changed again (not a context
    manager: see ``eval_mode()`` / ``train_mode()``)."""
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
    """Context manager: operations inside record the graph again, e.g. within ``no_grad()``."""
    return _using("grad_enabled", True)


def eval_mode():
    """Context manager: every dropout-like op behaves as at test time."""
    return _using("training", False)


def train_mode():
    """Context manager: sets the global training flag inside (e.g. within ``eval_mode()``);
    a layer whose own ``training`` is False still behaves as at test time."""
    return _using("training", True)
