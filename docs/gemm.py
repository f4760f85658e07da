"""float32 matmul throughput of XLA:CPU (jax) beside torch's, on this host: `python docs/gemm.py`.

The shapes are a large square and the MLP matmuls of rest_lite/restv2_tiny stage 1-2 at batch 8
(tokens x in x out). Each round times one call of each side in turn; the median of 7 rounds is printed.
Needs torch (`pip install torch==2.13.0`); the figures behind docs/performance.md's CPU notes.
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = [(4096, 4096, 4096), (25088, 96, 384), (25088, 384, 96), (6272, 192, 768), (6272, 768, 192)]
ROUNDS = 7


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    matmul = jax.jit(jnp.matmul)
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        matmul(ja, jb).block_until_ready()  # compile and warm up both sides
        torch.matmul(ta, tb)
        times: dict[str, list[float]] = {'jax': [], 'torch': []}
        for _ in range(ROUNDS):
            start = time.perf_counter()
            matmul(ja, jb).block_until_ready()
            times['jax'].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.matmul(ta, tb)
            times['torch'].append(time.perf_counter() - start)
        rates = {side: 2 * m * k * n / statistics.median(t) / 1e9 for side, t in times.items()}
        print(f"{m}x{k}x{n}: jax {rates['jax']:.0f} GFLOP/s, torch {rates['torch']:.0f} GFLOP/s", flush=True)


if __name__ == '__main__':
    main()
