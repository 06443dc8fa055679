"""Fused attention (``functional.attention``, raw_kernels/attention.cu) against the composed
path it replaced (batched products + softmax kernel, the (B, H, T, T) probabilities kept) and
PyTorch's ``scaled_dot_product_attention`` (flash attention), forward and forward+backward, at
the transformer benchmarks' shapes, bf16. Time: CUDA events, median (benchmarks/common.py);
TFLOP/s count the four (forward) or ten (forward + backward, dQ/dK/dV and the recomputed
scores) products' FLOPs as PyTorch's FA2 papers do: 4 and 10 x B H T² hd (causal: half).

    python benchmarks/attention.py        (JSON: $OUT/attention.json; a table last)
"""
from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, ".")
from benchmarks.common import time_gpu, write_json  # noqa: E402
from cudrop.functional import _attention as A  # noqa: E402

CASES = [("gpt", 32, 256, 16, 64, True), ("vit", 128, 197, 16, 64, False),
         ("long", 4, 2048, 16, 64, True)]


def main():
    import cupy as cp
    import ml_dtypes
    try:
        import torch
        import torch.nn.functional as tF
    except ImportError:
        torch = None
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rows = []
    for name, b, t, h, hd, causal in CASES:
        d = h * hd
        rng = np.random.default_rng(0)
        sets = [(cp.asarray(rng.standard_normal((b, t, 3 * d), np.float32)).astype(bf16),
                 cp.asarray(rng.standard_normal((b, t, d), np.float32)).astype(bf16))
                for _ in range(3)]
        flop = b * h * t * t * hd * (0.5 if causal else 1.0)
        row = {"case": name, "B": b, "T": t, "H": h, "hd": hd, "causal": causal}

        def fused_fwd(q, g):
            return A.attention(q, h, causal=causal)

        def fused_step(q, g):
            A.attention_backward(g, A.attention(q, h, causal=causal)[1])

        def array_fwd(q, g):  # the batched-product path (what the layer ran before)
            return A._array_attention(q, h, causal)

        def array_step(q, g):
            A.attention_backward(g, A._array_attention(q, h, causal)[1])

        for label, fn in (("fused_fwd", fused_fwd), ("fused_fwd_bwd", fused_step),
                          ("composed_fwd", array_fwd), ("composed_fwd_bwd", array_step)):
            ms = time_gpu(fn, sets)
            row[label + "_ms"] = ms
            row[label + "_tflops"] = (10 if "bwd" in label else 4) * flop / ms / 1e9
        if torch is not None:
            tsets = []
            for q, g in sets:
                tq = torch.from_dlpack(q.view(np.uint16)).view(torch.bfloat16)
                tq = tq.reshape(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
                tg = torch.from_dlpack(g.view(np.uint16)).view(torch.bfloat16)
                tsets.append((tq[0].detach().requires_grad_(), tq[1].detach().requires_grad_(),
                              tq[2].detach().requires_grad_(),
                              tg.reshape(b, t, h, hd).permute(0, 2, 1, 3)))

            def torch_fwd(q, k, v, g):
                with torch.no_grad():
                    return tF.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def torch_step(q, k, v, g):
                tF.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(g)

            for label, fn in (("torch_fwd", torch_fwd), ("torch_fwd_bwd", torch_step)):
                ms = time_gpu(fn, tsets)
                row[label + "_ms"] = ms
                row[label + "_tflops"] = (10 if "bwd" in label else 4) * flop / ms / 1e9
        rows.append(row)
        print(row, flush=True)
    write_json("attention.json", rows)
    print("\n| case | fused fwd | fused fwd+bwd | composed fwd+bwd | PyTorch SDPA fwd | SDPA fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        def f(k):
            return (f"{r[k + '_ms']:.3f} ms ({r[k + '_tflops']:.0f} TF/s)"
                    if k + "_ms" in r else "–")
        print(f"| {r['case']} B{r['B']} T{r['T']} | {f('fused_fwd')} | {f('fused_fwd_bwd')} | "
              f"{f('composed_fwd_bwd')} | {f('torch_fwd')} | {f('torch_fwd_bwd')} |")


if __name__ == "__main__":
    main()
