"""EMSA's attention as one Pallas kernel per pass on TPU: the logits never leave the chip.

The keys and values of EMSA are a reduced token grid (M = 49 at 224 for every stage), so the whole
(M, C) key and value block of an image fits in a core's VMEM beside a block of queries: each grid step
computes a block of queries' logits, their softmax and the product with v in VMEM, and the backward
kernel recomputes the probabilities instead of keeping them. The portable form writes the float32
(B, heads, N, M) logits to HBM, with M = 49 padded to 128 lanes, and reads them back several times in
each pass. The arithmetic is the portable form's (`portable.attention`): float32 logits and softmax,
the probabilities in the input dtype for the product with v.

The kernels take the queries (and give the output and the queries' gradient) tokens-major, (N, B, C)
in memory, the order in which XLA keeps a block's (B, N, C) activations wherever the channels are
minor (every stage below 128 images per device, and stages wider than 192 channels at 128 or more):
each grid step takes a (T, I, C) block of I images (16 or 8, whole tiles of the batch axis) and
transposes it into VMEM, images major, so that no relayout copy surrounds the call there. Where XLA
puts the batch in the lanes instead (`pallas_lowering.fills_lanes`, at most 192 channels), it copies
q, the output and the output's gradient between its layout and the kernels' (three copies; the
kernels on rows, (B, N, C) one image per step, had four, and XLA estimated them slower). Rows remain
for a symbolic batch and where even 8 images do not fit VMEM. `plan` decides.

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
from rest_jax.ops.portable import add_bias

_BLOCK_ELEMENTS = 1 << 18   # queries x max(channels, keys) per grid step: ~1 MB of float32 logits
_IMAGE_BLOCKS = (16, 8)     # images per grid step in XLA's tokens-major layout: whole (8, 128) tiles


def query_block(n: int, c: int, m: int) -> int | None:
    """Queries per grid step of the kernels on rows (one image per step): all n where they fit in
    _BLOCK_ELEMENTS (queries times max(C, M)), else the largest divisor of n that is a multiple of 16 (a
    bfloat16 tile's rows) and fits, else the largest multiple of 16 that fits (the queries are then
    padded with zeros to a multiple of it: a zero query's row of probabilities meets a zero output
    gradient, so it adds nothing to dk or dv). None where not even 16 queries fit (then the portable
    form runs)."""
    limit = _BLOCK_ELEMENTS // max(c, m)
    if n <= limit:
        return n
    if limit < 16:
        return None
    blocks = [d for d in range(16, limit + 1, 16) if n % d == 0]
    return blocks[-1] if blocks else limit // 16 * 16


def image_block(b, n: int, c: int, m: int, itemsize: int) -> tuple[int, int] | None:
    """(images, queries) per grid step of the kernels in XLA's tokens-major layout, for `b` images per
    kernel call, or None where they take rows.

    XLA lays out a (B, N, C) activation tokens-major, (N, B, C) in memory, unless the batch fills the
    lanes and the channels are few (then batch-minor, (N, C, B)). Taking (N, B, C) blocks as they lie
    (and the keys and values as (M, B, C)) spares the relayout copies of q and of the output in each
    pass; from the batch-minor layout XLA copies q, the output and its gradient, one copy fewer than
    into rows (one ResTv2 block's training step at 128 images per v5p chip, XLA's estimate: stage 1
    2.78 -> 2.70 ms, stage 2 2.33 -> 2.27 ms). The images per step are 16 or 8 (whole tiles of the
    batch axis) or all of a smaller batch, with their keys and values (and, backward, their gradients)
    within `pallas_lowering.vmem_budget()`; the queries per step, a divisor of n within _BLOCK_ELEMENTS
    as for rows."""
    if not isinstance(b, int):
        return None
    ceil = lambda x, k: -(-x // k) * k  # noqa: E731
    cp, mp = ceil(c, 128), ceil(m, 16)
    budget = pallas_lowering.vmem_budget()
    for images in [i for i in _IMAGE_BLOCKS if b % i == 0] or ([b] if b < _IMAGE_BLOCKS[0] else []):
        keys = (2 * 2 * m * images * cp * 2 * itemsize              # k, v and their gradients, two buffers each
                + images * mp * cp * 2 * (itemsize + 4))            # image-major copies, the gradients in float32
        for t in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
            if images * t * max(c, m) > _BLOCK_ELEMENTS:
                continue
            # q, g, dq: two buffers and one image-major copy each
            queries = 9 * images * ceil(t, 16) * cp * itemsize
            logits = 4 * images * ceil(t, 16) * ceil(m, 128) * 4     # p, dp, ds and a product, float32
            if keys + queries + logits <= budget:
                return images, t
    return None


def plan(b, n: int, c: int, m: int, itemsize: int) -> tuple[int, int, bool] | None:
    """(images, queries, tokens-major?) per grid step for `b` images of n queries, C channels and m keys
    per kernel call (`pallas_lowering.local_batch`): `image_block` where a block of images fits VMEM,
    else one image and `query_block` queries on rows; None where neither fits (then the portable form
    runs)."""
    blocks = image_block(b, n, c, m, itemsize)
    if blocks:
        return (*blocks, True)
    t = query_block(n, c, m)
    return None if t is None else (1, t, False)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, scale: float,
              q_bias: jax.Array | None = None) -> jax.Array:
    """`portable.attention` as Pallas kernels (see the module docstring): q (B, N, C) or (B, H, W, C),
    the output in its shape; with `q_bias` (C,), of q + q_bias, whose gradient the backward kernel sums
    as it writes q's (XLA would read q's gradient again for it). Callers check `plan` (for the batch of
    one kernel call, N = H W) first."""
    biased = q_bias is not None
    fn = lambda q, k, v, *q_bias: _attention(*q_bias or [None], q, k, v, heads, scale)  # noqa: E731
    axes = pallas_lowering.batch_axes(q.shape[0])
    if axes:
        fn = jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(axes),) * 3 + (P(),) * biased,
                           out_specs=P(axes), check_vma=False)
    return fn(q, k, v, *[q_bias] * biased)


def _batched(contract):
    """dot_general's dimension numbers: `contract` ((lhs axes), (rhs axes)), batched over the images of
    a step (axis 0 of both)."""
    return contract, ((0,), (0,))


def _probabilities(q, k, scale):
    """softmax(q k^T scale) in float32 for one head: q (I, T, d), k (I, M, d) -> (I, T, M)."""
    logits = lax.dot_general(q, k, _batched(((2,), (2,))), preferred_element_type=jnp.float32) * scale
    logits = logits - jnp.max(logits, axis=2, keepdims=True)
    e = jnp.exp(logits)
    return e / jnp.sum(e, axis=2, keepdims=True)


def _image_major(refs, scratch):
    """The kernels compute on (I, T, C) and (I, M, C) blocks, images major. Blocks on rows are that
    already; blocks in the tokens-major layout, (T, I, C) and (M, I, C), are transposed into VMEM
    scratch (one per ref, in `scratch`)."""
    for ref, copy in zip(refs, scratch):
        copy[...] = jnp.swapaxes(ref[...], 0, 1)
    return scratch[:len(refs)] if scratch else refs


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *scratch, heads, scale):
    q, k, v = _image_major([q_ref, k_ref, v_ref], scratch)
    o = scratch[3] if scratch else o_ref
    hd = q.shape[-1] // heads
    for h in range(heads):
        cols = pl.ds(h * hd, hd)
        p = _probabilities(q[:, :, cols], k[:, :, cols], scale)
        o[:, :, cols] = lax.dot_general(p.astype(v.dtype), v[:, :, cols], _batched(((2,), (1,))),
                                        preferred_element_type=jnp.float32).astype(o.dtype)
    if scratch:
        o_ref[...] = jnp.swapaxes(o[...], 0, 1)


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, dq_ref, dk_ref, dv_ref, *scratch, heads, scale, q_sums):
    dqs_ref, scratch = (scratch[0], scratch[1:]) if q_sums else (None, scratch)
    q_all, k_all, v_all, g_all = _image_major([q_ref, k_ref, v_ref, g_ref], scratch)
    dq, dk, dv = scratch[4:] if scratch else (dq_ref, dk_ref, dv_ref)

    # dk and dv (and q_bias's gradient) are summed over the query blocks of the images: they stay in
    # VMEM along grid axis 1.
    @pl.when(pl.program_id(1) == 0)
    def _():
        dk[...] = jnp.zeros_like(dk)
        dv[...] = jnp.zeros_like(dv)
        if q_sums:
            dqs_ref[...] = jnp.zeros_like(dqs_ref)

    hd = q_all.shape[-1] // heads
    over_queries = _batched(((1,), (1,)))
    for h in range(heads):
        cols = pl.ds(h * hd, hd)
        q, k, v, g = q_all[:, :, cols], k_all[:, :, cols], v_all[:, :, cols], g_all[:, :, cols]
        p = _probabilities(q, k, scale)
        dp = lax.dot_general(g, v, _batched(((2,), (2,))), preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.sum(p * dp, axis=2, keepdims=True)) * scale       # d logits, the scale folded in
        dq[:, :, cols] = lax.dot_general(ds.astype(k.dtype), k, _batched(((2,), (1,))),
                                         preferred_element_type=jnp.float32).astype(dq.dtype)
        dk[:, :, cols] += lax.dot_general(ds.astype(q.dtype), q, over_queries, preferred_element_type=jnp.float32)
        dv[:, :, cols] += lax.dot_general(p.astype(g.dtype), g, over_queries, preferred_element_type=jnp.float32)
    if q_sums:      # q_bias's gradient: the sum of q's gradient as given, over the block's images and queries
        dqs_ref[...] += jnp.sum(dq[...].astype(jnp.float32), axis=(0, 1), keepdims=True)
    if scratch:
        dq_ref[...] = jnp.swapaxes(dq[...], 0, 1)

        @pl.when(pl.program_id(1) == pl.num_programs(1) - 1)
        def _():
            dk_ref[...] = jnp.swapaxes(dk[...], 0, 1).astype(dk_ref.dtype)
            dv_ref[...] = jnp.swapaxes(dv[...], 0, 1).astype(dv_ref.dtype)


def _specs(q, k, images, t, tokens):
    """The queries' and the keys' block specs and the grid of a call: one image and t queries per step
    on rows, (B, N, C) and (B, M, C); `images` images and t queries per step in the tokens-major
    layout, (N, B, C) and (M, B, C)."""
    b, n, c, m = _sizes(q, k, tokens)
    if tokens:
        return (pl.BlockSpec((t, images, c), lambda i, j: (j, i, 0)),
                pl.BlockSpec((m, images, c), lambda i, j: (0, i, 0)), (b // images, n // t))
    return (pl.BlockSpec((1, t, c), lambda i, j: (i, j, 0)),
            pl.BlockSpec((1, m, c), lambda i, j: (i, 0, 0)), (b, n // t))


def _scratch(q, m, images, t, tokens, backward):
    """Tokens-major: VMEM for the image-major copies of the blocks (q, k, v, and g) and of the kernel's
    results (o; or dq and the float32 sums dk, dv)."""
    if not tokens:
        return []
    c = q.shape[2]
    queries, keys = pltpu.VMEM((images, t, c), q.dtype), pltpu.VMEM((images, m, c), q.dtype)
    sums = pltpu.VMEM((images, m, c), jnp.float32)
    return [queries, keys, keys, queries, queries, sums, sums] if backward else [queries, keys, keys, queries]


def _sizes(q, k, tokens):
    """(B, N, C, M) of q and k in either layout."""
    (n, b, c), m = (q.shape, k.shape[0]) if tokens else ((q.shape[1], q.shape[0], q.shape[2]), k.shape[1])
    return b, n, c, m


def _forward_call(q, k, v, *, heads, scale, images, t, tokens, interpret):
    b, n, c, m = _sizes(q, k, tokens)
    queries, keys, grid = _specs(q, k, images, t, tokens)
    cost = pallas_lowering.cost(b, flops=4 * b * n * m * c, transcendentals=b * heads * n * m,
                                bytes_accessed=q.dtype.itemsize * (2 * b * n * c + 2 * b * m * c))
    return pl.pallas_call(
        functools.partial(_forward_kernel, heads=heads, scale=scale), grid=grid,
        in_specs=[queries, keys, keys], out_specs=queries, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=_scratch(q, m, images, t, tokens, backward=False),
        compiler_params=pallas_lowering.compiler_params('parallel', 'parallel'),
        cost_estimate=cost, interpret=interpret, name='emsa_attention')(q, k, v)


def _backward_call(q, k, v, g, *, heads, scale, images, t, tokens, interpret, q_sums=False):
    b, n, c, m = _sizes(q, k, tokens)
    queries, keys, grid = _specs(q, k, images, t, tokens)
    # dk, dv: float32 sums over the query blocks; tokens-major, summed in VMEM scratch and given rounded
    # to the input dtype (as the VJP returns them)
    summed = jax.ShapeDtypeStruct(k.shape, q.dtype if tokens else jnp.float32)
    cost = pallas_lowering.cost(b, flops=10 * b * n * m * c, transcendentals=b * heads * n * m,
                                bytes_accessed=q.dtype.itemsize * (3 * b * n * c + 2 * b * m * c)
                                + summed.dtype.itemsize * 2 * b * m * c)
    # q_bias's gradient: float32 sums over each grid row's images and queries, one row per image block
    q_sum = [pl.BlockSpec((1, 1, c), lambda i, j: (i, 0, 0))] if q_sums else []
    q_sum_shape = [jax.ShapeDtypeStruct((grid[0], 1, c), jnp.float32)] if q_sums else []
    return pl.pallas_call(
        functools.partial(_backward_kernel, heads=heads, scale=scale, q_sums=q_sums), grid=grid,
        in_specs=[queries, keys, keys, queries], out_specs=[queries, keys, keys, *q_sum],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), summed, summed, *q_sum_shape],
        scratch_shapes=_scratch(q, m, images, t, tokens, backward=True),
        compiler_params=pallas_lowering.compiler_params('parallel', 'arbitrary'),
        cost_estimate=cost, interpret=interpret, name='emsa_attention_backward')(q, k, v, g)


def _call(kernel_call, heads, scale, q, k, v, *g, **options):
    """kernel_call on q, k, v (and g) in `plan`'s layout: tokens-major, (N, B, C) and (M, B, C), or rows
    with q (and g) padded with zero queries to whole steps; its results back as (B, N, C) (and (B, M, C)),
    and after them, as they are, any further results (`options` ask for them)."""
    (b, n, c), m = q.shape, k.shape[1]
    images, t, tokens = plan(b, n, c, m, q.dtype.itemsize)
    padded = -(-n // t) * t
    if tokens:
        q, k, v, *g = [jnp.swapaxes(a, 0, 1) for a in (q, k, v, *g)]     # XLA's own layout: no copy
    else:
        q, *g = [jnp.pad(a, ((0, 0), (0, padded - n), (0, 0))) for a in (q, *g)]
    out = pallas_lowering.on_platform(
        functools.partial(kernel_call, heads=heads, scale=scale, images=images, t=t, tokens=tokens, **options),
        q, k, v, *g)
    out = list(out) if g else [out]
    out, more = out[:3], out[3:]
    out = [jnp.swapaxes(a, 0, 1) for a in out] if tokens else [out[0][:, :n], *out[1:]]
    return [*out, *more] if g else out[0]


def _tokens(q):
    """q (B, ..., C) as (B, N, C)."""
    return q.reshape(q.shape[0], -1, q.shape[-1])


def _forward(q, k, v, heads, scale):
    return _call(_forward_call, heads, scale, _tokens(q), k, v).reshape(q.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q_bias, q, k, v, heads, scale):
    # The bias is added to q as the projection gave it ((B, H, W, C)), where XLA fuses the add into
    # the projection; added to q flattened first, it took a pass of its own.
    return _forward(add_bias(q, q_bias), k, v, heads, scale)


def _attention_fwd(q_bias, q, k, v, heads, scale):
    q = add_bias(q, q_bias)
    return _forward(q, k, v, heads, scale), (q, k, v, q_bias)


def _attention_bwd(heads, scale, residuals, g):
    q, k, v, q_bias = residuals
    dq, dk, dv, *dqs = _call(_backward_call, heads, scale, _tokens(q), k, v, _tokens(g).astype(q.dtype),
                             q_sums=q_bias is not None)
    dq_bias = None if q_bias is None else dqs[0].sum((0, 1)).astype(q_bias.dtype)
    return dq_bias, dq.reshape(q.shape), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)
