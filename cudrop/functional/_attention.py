"""What attention layers share: the causal mask, built once per (device, length, dtype)."""
from __future__ import annotations

import numpy as np

from .._memo import memoize


@memoize
def _causal_bias(xp, dev, t, dtype):
    if dtype.kind == "V":  # ml_dtypes' bfloat16, which NumPy's finfo refuses
        import ml_dtypes
        lowest = ml_dtypes.finfo(dtype).min
    else:
        lowest = np.finfo(dtype).min
    return xp.asarray(np.triu(np.full((t, t), lowest / 2, dtype=dtype), k=1))


def causal_bias(xp, t, dtype):
    """The (t, t) additive causal mask: 0 on and below the diagonal, a large finite negative
    above it (the diagonal is always kept, and fp16 softmax stays free of inf - inf). Built and
    uploaded once per (device, t, dtype), in a cache ``cudrop.clear_caches()`` empties: an
    upload per step would wait on the stream."""
    dev = -1 if xp is np else xp.cuda.runtime.getDevice()
    return _causal_bias(xp, dev, t, np.dtype(dtype))
