"""float32 matmul throughput of XLA:CPU (jax) beside torch's, on this host: `python docs/gemm.py`.

The shapes are a large square and the MLP matmuls of rest_lite/restv2_tiny stage 1-2 at batch 8
(tokens x in x out): the forward product (tokens, in) @ (in, out) and, for the MLP shapes, the weight
gradient (tokens, in)^T @ (tokens, out), contracted over the tokens, as autodiff forms it. Each round
times one call of each side in turn; the median of 7 rounds is printed.
Needs torch (`pip install torch==2.13.0`); the figures behind docs/performance.md's CPU notes.
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = [(4096, 4096, 4096), (25088, 64, 256), (6272, 128, 512),                       # rest_lite
          (25088, 96, 384), (25088, 384, 96), (6272, 192, 768), (6272, 768, 192)]      # restv2_tiny
ROUNDS = 7


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        rate('', 2 * m * k * n, jnp.matmul, torch.matmul, a, b)
        if m != k:   # the weight gradient of the same layer: sum over tokens of a[t, i] g[t, j]
            g = rng.random((m, n), np.float32)
            rate(' weight gradient', 2 * m * k * n, lambda x, y: jax.lax.dot_general(x, y, (((0,), (0,)), ((), ()))),
                 lambda x, y: x.T @ y, a, g)


def rate(label: str, flops: int, jax_fn, torch_fn, a: np.ndarray, b: np.ndarray) -> None:
    """Print jax's and torch's GFLOP/s for fn(a, b), timed in alternating rounds."""
    fn = jax.jit(jax_fn)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    fn(ja, jb).block_until_ready()  # compile and warm up both sides
    torch_fn(ta, tb)
    times: dict[str, list[float]] = {'jax': [], 'torch': []}
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn(ja, jb).block_until_ready()
        times['jax'].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_fn(ta, tb)
        times['torch'].append(time.perf_counter() - start)
    rates = {side: flops / statistics.median(t) / 1e9 for side, t in times.items()}
    shape = 'x'.join(map(str, (a.shape[0], a.shape[1], b.shape[1])))
    print(f"{shape}{label}: jax {rates['jax']:.0f} GFLOP/s, torch {rates['torch']:.0f} GFLOP/s", flush=True)

if __name__ == '__main__':
    main()
