"""EMSA's attention as one Pallas kernel per pass on TPU: the logits never leave the chip.

The keys and values of EMSA are a reduced token grid (M = 49 at 224 for every stage), so the whole
(M, C) key and value block of an image fits in a core's VMEM beside a block of queries: each grid step
computes a block of queries' logits, their softmax and the product with v in VMEM, and the backward
kernel recomputes the probabilities instead of keeping them. The portable form writes the float32
(B, heads, N, M) logits to HBM, with M = 49 padded to 128 lanes, and reads them back several times in
each pass. The arithmetic is the portable form's (`portable.attention`): float32 logits and softmax,
the probabilities in the input dtype for the product with v.

The batch axis is split over the devices of the mesh in context (`jax.set_mesh`, or the abstract mesh
rest_jax's train and eval steps trace under): XLA's partitioner cannot split a Pallas call itself
(`rest_jax.ops.tpu` runs the portable form where a batch may be split with no mesh in context). How the
kernels are lowered (Mosaic on TPU, Pallas's interpreter elsewhere): `pallas_lowering`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from rest_jax.ops import pallas_lowering

_BLOCK_ELEMENTS = 1 << 18   # queries x max(channels, keys) per grid step: ~1 MB of float32 logits


def query_block(n: int, c: int, m: int) -> int | None:
    """Queries per grid step: all n where they fit in _BLOCK_ELEMENTS (queries times max(C, M)), else
    the largest divisor of n that is a multiple of 16 (a bfloat16 tile's rows) and fits, else the
    largest multiple of 16 that fits (the queries are then padded with zeros to a multiple of it: a
    zero query's row of probabilities meets a zero output gradient, so it adds nothing to dk or dv).
    None where not even 16 queries fit (then the portable form runs)."""
    limit = _BLOCK_ELEMENTS // max(c, m)
    if n <= limit:
        return n
    if limit < 16:
        return None
    blocks = [d for d in range(16, limit + 1, 16) if n % d == 0]
    return blocks[-1] if blocks else limit // 16 * 16


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, scale: float) -> jax.Array:
    """`portable.attention` as Pallas kernels (see the module docstring): q (B, N, C) here, the tokens
    flattened (a (H, W) grid costs relayout copies: XLA lays out C = 96 activations batch-minor).
    Callers check `query_block` first."""
    b, n, c = q.shape
    block = query_block(n, c, k.shape[1])
    padded = -(-n // block) * block
    fn = functools.partial(_attention, heads=heads, scale=scale, block=block)
    axes = pallas_lowering.batch_axes(b)
    if axes:
        fn = jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(axes),) * 3, out_specs=P(axes),
                           check_vma=False)
    if padded == n:
        return fn(q, k, v)
    return fn(jnp.pad(q, ((0, 0), (0, padded - n), (0, 0))), k, v)[:, :n]


def _probabilities(q, k, scale):
    """softmax(q k^T scale) in float32 for one head: q (T, d), k (M, d) -> (T, M)."""
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    logits = logits - jnp.max(logits, axis=1, keepdims=True)
    e = jnp.exp(logits)
    return e / jnp.sum(e, axis=1, keepdims=True)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *, heads, scale):
    hd = q_ref.shape[-1] // heads
    for h in range(heads):
        cols = pl.ds(h * hd, hd)
        p = _probabilities(q_ref[0, :, cols], k_ref[0, :, cols], scale)
        o_ref[0, :, cols] = jnp.dot(p.astype(v_ref.dtype), v_ref[0, :, cols],
                                    preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, dq_ref, dk_ref, dv_ref, *, heads, scale):
    # dk and dv are summed over the query blocks of an image: their block stays in VMEM along grid axis 1.
    @pl.when(pl.program_id(1) == 0)
    def _():
        dk_ref[...] = jnp.zeros_like(dk_ref)
        dv_ref[...] = jnp.zeros_like(dv_ref)

    hd = q_ref.shape[-1] // heads
    over_queries = (((0,), (0,)), ((), ()))
    for h in range(heads):
        cols = pl.ds(h * hd, hd)
        q, k, v, g = q_ref[0, :, cols], k_ref[0, :, cols], v_ref[0, :, cols], g_ref[0, :, cols]
        p = _probabilities(q, k, scale)
        dp = lax.dot_general(g, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True)) * scale       # d logits, the scale folded in
        dq_ref[0, :, cols] = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32).astype(dq_ref.dtype)
        dk_ref[0, :, cols] += lax.dot_general(ds.astype(q.dtype), q, over_queries, preferred_element_type=jnp.float32)
        dv_ref[0, :, cols] += lax.dot_general(p.astype(g.dtype), g, over_queries, preferred_element_type=jnp.float32)


def _specs(c, m, block):
    queries = pl.BlockSpec((1, block, c), lambda i, j: (i, j, 0))
    keys = pl.BlockSpec((1, m, c), lambda i, j: (i, 0, 0))
    return queries, keys


def _forward_call(q, k, v, *, heads, scale, block, interpret):
    (b, n, c), m = q.shape, k.shape[1]
    queries, keys = _specs(c, m, block)
    cost = pallas_lowering.cost(b, flops=4 * b * n * m * c, transcendentals=b * heads * n * m,
                                bytes_accessed=q.dtype.itemsize * (2 * b * n * c + 2 * b * m * c))
    return pl.pallas_call(
        functools.partial(_forward_kernel, heads=heads, scale=scale), grid=(b, n // block),
        in_specs=[queries, keys, keys], out_specs=queries, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel')),
        cost_estimate=cost, interpret=interpret, name='emsa_attention')(q, k, v)


def _backward_call(q, k, v, g, *, heads, scale, block, interpret):
    (b, n, c), m = q.shape, k.shape[1]
    queries, keys = _specs(c, m, block)
    cost = pallas_lowering.cost(b, flops=10 * b * n * m * c, transcendentals=b * heads * n * m,
                                bytes_accessed=q.dtype.itemsize * (3 * b * n * c + 2 * b * m * c) + 4 * 2 * b * m * c)
    summed = jax.ShapeDtypeStruct(k.shape, jnp.float32)   # dk, dv: float32 sums over the query blocks
    return pl.pallas_call(
        functools.partial(_backward_kernel, heads=heads, scale=scale), grid=(b, n // block),
        in_specs=[queries, keys, keys, queries], out_specs=[queries, keys, keys],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), summed, summed],
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary')),
        cost_estimate=cost, interpret=interpret, name='emsa_attention_backward')(q, k, v, g)


def _forward(q, k, v, heads, scale, block):
    return pallas_lowering.on_platform(functools.partial(_forward_call, heads=heads, scale=scale, block=block),
                                       q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, heads, scale, block):
    return _forward(q, k, v, heads, scale, block)


def _attention_fwd(q, k, v, heads, scale, block):
    return _forward(q, k, v, heads, scale, block), (q, k, v)


def _attention_bwd(heads, scale, block, residuals, g):
    q, k, v = residuals
    dq, dk, dv = pallas_lowering.on_platform(
        functools.partial(_backward_call, heads=heads, scale=scale, block=block), q, k, v, g.astype(q.dtype))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
