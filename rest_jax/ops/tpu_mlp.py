"""A block's MLP (fc1, exact GELU, fc2) as one Pallas kernel per pass on TPU, in XLA's own layout
for these activations: the hidden activations (4 C per token) never reach HBM.

A Pallas call takes its operands row-major, so the kernels take the activations in the order XLA
keeps them in memory, and the transpose or reshape that gives that order leaves every byte where it
is (XLA emits no copy for it). With a batch per device that fills the 128 lanes (a multiple of 128),
XLA lays out a block's (B, H, W, C) activations batch-minor: tokens major, then channels, the batch in
the lanes ((H, W, C, B) in memory). The kernels then take the tokens as (N, C, B): one token's (C, B)
tile is what fc1's weights multiply, W1^T (F, C) @ x_t (C, B) -> (F, B), GELU, then W2^T (C, F) @
that -> (C, B), and a grid step puts a few tokens side by side in the lanes, (C, T B), so that each
product is one wide matmul. With fewer images XLA keeps the channels minor, and the kernels take rows
of C, (B N, C).

They run only where the MLP is differentiated: in inference XLA fuses its own form (fc1, GELU and fc2,
with the LayerNorm before them) into one op, the hidden activations never in HBM either, while for
the backward pass it writes fc1's output and GELU's to HBM and reads them back. The forward kernel
keeps only its input; the backward kernel recomputes fc1 and GELU from it (one matmul more) and sums
the weight gradients over the grid in VMEM, one partial sum per TensorCore half. Used where the
channels are few (at most 128: ResT's first stage, and v1's second), so that fc1 and fc2 are bound by
HBM in XLA's form. The arithmetic is the portable form's (`portable.mlp`): products accumulated in
float32, the hidden activations rounded to the input dtype before GELU and after it; the bias
gradients are summed in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from rest_jax.ops import pallas_lowering, portable
from rest_jax.ops.portable import gelu_float32, gelu_slope

# Widths whose MLP runs as the kernels. One block's training step, 128 images per chip on v5p:2x2x1,
# XLA's estimate, portable MLP -> kernels: C = 64 (ResT v1 stage 1): 2.10 -> 1.74 ms; 96: 3.55 -> 3.22 ms;
# 128 (ResT v1 stage 2, 28 x 28): 1.34 -> 1.32 ms; 128 (restv2_large stage 1): 4.84 -> 4.63 ms; but
# 192: 2.53 -> 2.62 ms and 256: 2.57 -> 3.09 ms. Above 128 channels fc1 and fc2 are near the chip's ratio
# of FLOPs to HBM bandwidth in XLA's own form, and the recomputed fc1 costs more than the bytes it saves.
# 128 is the margin: restv2_large's whole step (v5p:2x2x2, 128 per chip) peaks 15.10 -> 13.67 GB with
# 2 % fewer bytes, but XLA's estimate goes 68.75 -> 69.08 ms.
_MAX_CHANNELS = 128
_WEIGHT_ELEMENTS = 1 << 18   # C x F of fc1 (and fc2): 0.5 MB per bfloat16 matrix, 1 MB per float32 gradient
_HIDDEN_ELEMENTS = 1 << 19   # F x tokens x lanes per grid step: 2 MB per float32 hidden block
_ROW_HIDDEN_ELEMENTS = 1 << 18   # F x rows per grid step of the row-major kernels
_LANES = 128                 # images per grid step: a vector register's lanes
_SPLIT = 2                   # the backward grid's parallel halves (a v4/v5p chip's two TensorCores)
_over_lanes = (((1,), (1,)), ((), ()))


def fits(c: int, f: int) -> bool:
    """Whether an MLP of C inputs and F hidden units runs as the kernels."""
    return c <= _MAX_CHANNELS and c * f <= _WEIGHT_ELEMENTS


def rows_per_step(f: int, r: int) -> int:
    """Rows (tokens of any image) per grid step of the row-major kernels, for F hidden units and R rows:
    a multiple of 16 (a bfloat16 tile's rows) with at most _ROW_HIDDEN_ELEMENTS hidden values, dividing
    R / _SPLIT where one does (else the rows are padded with zeros)."""
    limit = max(_ROW_HIDDEN_ELEMENTS // f // 16 * 16, 16)
    half = r // _SPLIT
    blocks = [d for d in range(16, min(limit, half) + 1, 16) if r % (_SPLIT * d) == 0]
    return blocks[-1] if blocks else min(limit, -(-half // 16) * 16)


def tokens_per_step(f: int, n: int) -> int:
    """Tokens side by side in a grid step, for F hidden units and N tokens: the largest power of two with
    at most _HIDDEN_ELEMENTS hidden values whose grid (_SPLIT steps at a time) pads N by at most N / 8
    zero tokens; one token per step where none does."""
    t = 1
    while 2 * t * f * _LANES <= _HIDDEN_ELEMENTS:
        t *= 2
    while t > 1 and -n % (_SPLIT * t) > n // 8:
        t //= 2
    return t


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    """`portable.mlp` on x (B, ..., C) in its dtype, as Pallas kernels where it is differentiated (see
    the module docstring). Callers check `fits` first."""
    dt = x.dtype
    with jax.named_scope('fc1'):
        w1, b1 = w1.astype(dt), b1.astype(dt)
    with jax.named_scope('fc2'):
        w2, b2 = w2.astype(dt), b2.astype(dt)
    return _mlp(x, w1, b1, w2, b2)


@jax.custom_vjp
def _mlp(x, w1, b1, w2, b2):
    # Not differentiated (inference, evaluation): XLA's own form, which it fuses into one op (fc1, GELU
    # and fc2 with the LayerNorm before it), the hidden activations never in HBM either.
    return portable.mlp(x, w1, b1, w2, b2, x.dtype)


def _mlp_fwd(x, w1, b1, w2, b2):
    fn, axes = _forward_local, pallas_lowering.batch_axes(x.shape[0])
    if axes:
        fn = jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(axes), P(), P(), P(), P()),
                           out_specs=P(axes), check_vma=False)
    return fn(x, w1, b1, w2, b2), (x, w1, b1, w2)


def _mlp_bwd(residuals, g):
    x, w1, b1, w2 = residuals
    axes = pallas_lowering.batch_axes(x.shape[0])
    fn = functools.partial(_backward_local, axes=axes)
    if axes:
        fn = jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(axes), P(axes), P(), P(), P()),
                           out_specs=(P(axes), P(), P(), P(), P()), check_vma=False)
    return fn(x, g.astype(x.dtype), w1, b1, w2)


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def _tokens(x, t):
    """x (B, ..., C) as (N, C, B), XLA's own layout, padded with zero tokens to whole grid steps of t
    tokens (they are sliced off the output, and their zero output gradient adds nothing to the weight
    gradients)."""
    tokens = jnp.transpose(x.reshape(x.shape[0], -1, x.shape[-1]), (1, 2, 0))
    return jnp.pad(tokens, ((0, -tokens.shape[0] % (_SPLIT * t)), (0, 0), (0, 0)))


def _images(tokens, shape):
    """(N', C, B) back to x's shape (B, ..., C), the padding tokens dropped."""
    n = int(np.prod(shape[1:-1]))
    return jnp.transpose(tokens[:n], (2, 0, 1)).reshape(shape)


def _rows(x, block):
    """x (B, ..., C) as rows (B N, C), padded with zero rows to whole grid steps (as `_tokens`)."""
    rows = x.reshape(-1, x.shape[-1])
    return jnp.pad(rows, ((0, -rows.shape[0] % (_SPLIT * block)), (0, 0)))


def _in_lanes(x) -> bool:
    """Whether x's batch fills the lanes (XLA's batch-minor layout), else rows of C."""
    return x.shape[0] % _LANES == 0


def _step(x, w1) -> int:
    """Tokens (batch in the lanes) or rows per grid step for x."""
    tokens = int(np.prod(x.shape[1:-1]))
    f = w1.shape[1]
    return tokens_per_step(f, tokens) if _in_lanes(x) else rows_per_step(f, tokens * x.shape[0])


def _forward_local(x, w1, b1, w2, b2):
    step = _step(x, w1)
    if _in_lanes(x):
        out = pallas_lowering.on_platform(functools.partial(_forward_call, t=step), _tokens(x, step), w1.T,
                                          b1.reshape(-1, 1), w2.T, b2.reshape(-1, 1))
        return _images(out, x.shape)
    out = pallas_lowering.on_platform(functools.partial(_rows_forward_call, block=step), _rows(x, step), w1,
                                      b1.reshape(1, -1), w2, b2.reshape(1, -1))
    return out[:x.size // x.shape[-1]].reshape(x.shape)


def _backward_local(x, g, w1, b1, w2, axes):
    step = _step(x, w1)
    if _in_lanes(x):
        dx, dw1, db1, dw2t, db2 = pallas_lowering.on_platform(
            functools.partial(_backward_call, t=step), _tokens(x, step), _tokens(g, step), w1.T,
            b1.reshape(-1, 1), w2, w1)
        dx, sums = _images(dx, x.shape), (dw1, db1[..., 0], jnp.swapaxes(dw2t, 1, 2), db2[..., 0])
    else:
        dx, dw1, db1, dw2, db2 = pallas_lowering.on_platform(
            functools.partial(_rows_backward_call, block=step), _rows(x, step), _rows(g, step), w1,
            b1.reshape(1, -1), w2)
        dx, sums = dx[:x.size // x.shape[-1]].reshape(x.shape), (dw1, db1[:, 0], dw2, db2[:, 0])
    sums = tuple(s.sum(0) for s in sums)            # float32, over the grid's halves
    if axes:
        sums = lax.psum(sums, axes)                 # and over the devices
    return (dx, *(s.astype(w1.dtype) for s in sums))


def _rounded(h, dtype):
    """fc1's float32 output rounded to the input dtype, as Flax's Dense gives it, in float32 again."""
    return h.astype(dtype).astype(jnp.float32)


# --- the batch in the lanes: 128 images per device, or a multiple --------------------------------

def _side_by_side(ref):
    """A (T, C, L) block as (C, T L): the tokens' tiles side by side in the lanes."""
    return jnp.concatenate([ref[t] for t in range(ref.shape[0])], axis=1)


def _store(ref, value):
    lanes = ref.shape[2]
    for t in range(ref.shape[0]):
        ref[t] = value[:, t * lanes:(t + 1) * lanes].astype(ref.dtype)


def _hidden(w1t, x, b1):
    """fc1's output (F, T L), rounded (`_rounded`)."""
    return _rounded(jnp.dot(w1t, x, preferred_element_type=jnp.float32) + b1.astype(jnp.float32), x.dtype)


def _forward_kernel(x_ref, w1t_ref, b1_ref, w2t_ref, b2_ref, o_ref):
    a = gelu_float32(_hidden(w1t_ref[...], _side_by_side(x_ref), b1_ref[...])).astype(o_ref.dtype)
    _store(o_ref, jnp.dot(w2t_ref[...], a, preferred_element_type=jnp.float32) + b2_ref[...].astype(jnp.float32))


def _backward_kernel(x_ref, g_ref, w1t_ref, b1_ref, w2_ref, w1_ref, dx_ref, dw1_ref, db1_ref, dw2t_ref, db2_ref):
    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
        for ref in (dw1_ref, db1_ref, dw2t_ref, db2_ref):
            ref[...] = jnp.zeros_like(ref)

    x, g = _side_by_side(x_ref), _side_by_side(g_ref)
    h = _hidden(w1t_ref[...], x, b1_ref[...])
    dw2t_ref[0] += lax.dot_general(g, gelu_float32(h).astype(g.dtype), _over_lanes, preferred_element_type=jnp.float32)
    db2_ref[0] += jnp.sum(g.astype(jnp.float32), axis=1, keepdims=True)
    da = jnp.dot(w2_ref[...], g, preferred_element_type=jnp.float32).astype(g.dtype)
    dh = (da.astype(jnp.float32) * gelu_slope(h)).astype(x.dtype)
    dw1_ref[0] += lax.dot_general(x, dh, _over_lanes, preferred_element_type=jnp.float32)
    db1_ref[0] += jnp.sum(dh.astype(jnp.float32), axis=1, keepdims=True)
    _store(dx_ref, jnp.dot(w1_ref[...], dh, preferred_element_type=jnp.float32))


def _whole(a):
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _forward_call(x, w1t, b1, w2t, b2, *, t, interpret):
    (n, c, b), f = x.shape, w1t.shape[0]
    tokens = pl.BlockSpec((t, c, _LANES), lambda i, j: (i, 0, j))
    cost = pallas_lowering.cost(b, flops=4 * n * b * c * f, transcendentals=n * b * f,
                                bytes_accessed=x.dtype.itemsize * (2 * n * b * c + 2 * c * f + c + f))
    return pl.pallas_call(
        _forward_kernel, grid=(n // t, b // _LANES), in_specs=[tokens] + [_whole(a) for a in (w1t, b1, w2t, b2)],
        out_specs=tokens, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel')),
        cost_estimate=cost, interpret=interpret, name='mlp')(x, w1t, b1, w2t, b2)


def _backward_call(x, g, w1t, b1, w2, w1, *, t, interpret):
    (n, c, b), f = x.shape, w1t.shape[0]
    steps = n // (_SPLIT * t)
    tokens = pl.BlockSpec((t, c, _LANES), lambda i, j, k: (i * steps + j, 0, k))
    partial = lambda *s: pl.BlockSpec((1, *s), lambda i, j, k: (i, 0, 0))   # noqa: E731
    sums = [jax.ShapeDtypeStruct((_SPLIT, *s), jnp.float32) for s in ((c, f), (f, 1), (c, f), (c, 1))]
    cost = pallas_lowering.cost(b, flops=10 * n * b * c * f, transcendentals=2 * n * b * f,
                                bytes_accessed=x.dtype.itemsize * (3 * n * b * c + 3 * c * f + f)
                                + 4 * _SPLIT * (2 * c * f + c + f))
    return pl.pallas_call(
        _backward_kernel, grid=(_SPLIT, steps, b // _LANES),
        in_specs=[tokens, tokens] + [_whole(a) for a in (w1t, b1, w2, w1)],
        out_specs=[tokens, partial(c, f), partial(f, 1), partial(c, f), partial(c, 1)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] + sums,
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary', 'arbitrary')),
        cost_estimate=cost, interpret=interpret, name='mlp_backward')(x, g, w1t, b1, w2, w1)


# --- row-major: a batch per device that does not fill the lanes -----------------------------------
# XLA lays such activations out channels-minor, (B, H, W, C) in memory, or tokens-major (H, W, B, C):
# rows of C either way, which the kernels take as (B N, C). One block's training step on v5p:2x2x1, XLA's
# estimate, portable MLP -> kernels: restv2_tiny stage 1, 32 per chip 1.36 -> 1.29 ms, 64 per chip 2.26 ->
# 2.09 ms; restv2_large stage 1, 32 per chip 1.50 -> 1.49 ms.

_over_rows = (((0,), (0,)), ((), ()))


def _rows_forward_kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, o_ref):
    h = _rounded(jnp.dot(x_ref[...], w1_ref[...], preferred_element_type=jnp.float32)
                 + b1_ref[...].astype(jnp.float32), x_ref.dtype)
    a = gelu_float32(h).astype(o_ref.dtype)
    o_ref[...] = (jnp.dot(a, w2_ref[...], preferred_element_type=jnp.float32)
                  + b2_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def _rows_backward_kernel(x_ref, g_ref, w1_ref, b1_ref, w2_ref, dx_ref, dw1_ref, db1_ref, dw2_ref, db2_ref):
    @pl.when(pl.program_id(1) == 0)
    def _():
        for ref in (dw1_ref, db1_ref, dw2_ref, db2_ref):
            ref[...] = jnp.zeros_like(ref)

    x, g, w1 = x_ref[...], g_ref[...], w1_ref[...]
    h = _rounded(jnp.dot(x, w1, preferred_element_type=jnp.float32) + b1_ref[...].astype(jnp.float32), x.dtype)
    dw2_ref[0] += lax.dot_general(gelu_float32(h).astype(g.dtype), g, _over_rows, preferred_element_type=jnp.float32)
    db2_ref[0] += jnp.sum(g.astype(jnp.float32), axis=0, keepdims=True)
    da = lax.dot_general(g, w2_ref[...], _over_lanes, preferred_element_type=jnp.float32).astype(g.dtype)
    dh = (da.astype(jnp.float32) * gelu_slope(h)).astype(x.dtype)
    dw1_ref[0] += lax.dot_general(x, dh, _over_rows, preferred_element_type=jnp.float32)
    db1_ref[0] += jnp.sum(dh.astype(jnp.float32), axis=0, keepdims=True)
    dx_ref[...] = lax.dot_general(dh, w1, _over_lanes, preferred_element_type=jnp.float32).astype(dx_ref.dtype)


def _rows_forward_call(x, w1, b1, w2, b2, *, block, interpret):
    (r, c), f = x.shape, w1.shape[1]
    rows = pl.BlockSpec((block, c), lambda i: (i, 0))
    cost = pallas_lowering.cost(r, flops=4 * r * c * f, transcendentals=r * f,
                                bytes_accessed=x.dtype.itemsize * (2 * r * c + 2 * c * f + c + f))
    return pl.pallas_call(
        _rows_forward_kernel, grid=(r // block,), in_specs=[rows] + [_whole(a) for a in (w1, b1, w2, b2)],
        out_specs=rows, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',)),
        cost_estimate=cost, interpret=interpret, name='mlp')(x, w1, b1, w2, b2)


def _rows_backward_call(x, g, w1, b1, w2, *, block, interpret):
    (r, c), f = x.shape, w1.shape[1]
    steps = r // (_SPLIT * block)
    rows = pl.BlockSpec((block, c), lambda i, j: (i * steps + j, 0))
    partial = lambda *s: pl.BlockSpec((1, *s), lambda i, j: (i, 0, 0))   # noqa: E731
    sums = [jax.ShapeDtypeStruct((_SPLIT, *s), jnp.float32) for s in ((c, f), (1, f), (f, c), (1, c))]
    cost = pallas_lowering.cost(r, flops=10 * r * c * f, transcendentals=2 * r * f,
                                bytes_accessed=x.dtype.itemsize * (3 * r * c + 2 * c * f + f)
                                + 4 * _SPLIT * (2 * c * f + c + f))
    return pl.pallas_call(
        _rows_backward_kernel, grid=(_SPLIT, steps), in_specs=[rows, rows] + [_whole(a) for a in (w1, b1, w2)],
        out_specs=[rows, partial(c, f), partial(1, f), partial(f, c), partial(1, c)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] + sums,
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary')),
        cost_estimate=cost, interpret=interpret, name='mlp_backward')(x, g, w1, b1, w2)
