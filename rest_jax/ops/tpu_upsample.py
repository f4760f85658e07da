"""ResTv2's upsample branch, the LayerNorm after it and its sum with EMSA's attention output as one
Pallas kernel per pass on TPU.

The branch takes EMSA's reduced values v (B, h, w, C), a depthwise 3x3 conv to C r r channels,
PixelShuffle(r) and a LayerNorm over C: output pixel (y r + i, x r + j) of channel c is

    LN( sum over (dy, dx) of kernel[dy, dx, c r r + i r + j] v[y + dy - 1, x + dx - 1, c] + bias[c r r + i r + j] )

XLA writes the conv's C r r channels, copies them into the shuffled layout, then reads them for the
norm's statistics and again for the norm, and its backward pass makes as many copies the other way.
Here the forward kernel reads v (a few KB per image) and the array to add (EMSA's attention output,
proj's other input), and writes their sum with the normalised (B, h r, w r, C) branch once; the
backward kernel reads v and the output's gradient (which is also the added array's), recomputes the
branch, and gives v's gradient and the partial sums of the parameters' gradients. Nothing the size of
the output is kept or written but the output (XLA, given the branch alone, summed it with the
attention output in an op of its own). The arithmetic is the portable form's up to float rounding:
products and sums in float32, the norm's statistics from the float32 conv output and the sum rounded
once (the portable form rounds the conv's output and the branch to the compute dtype first), the
two-pass variance.

Layout: the values, the output and the gradients go tokens-major, (h w, B, C) and (h r w r, B, C) in
memory, XLA's own layout of a block's activations wherever the channels are minor (the attention
kernels take q, k and v the same way), so that no relayout copy surrounds the calls; where XLA puts
the batch in the lanes (the narrow stages at 128 images per chip) it picked this layout for the
branch's output too, in the programs compiled so far. Each grid step takes a block of I images
(`images_per_step`), one row phase i and one row y of v: the nine neighbours of each of v's w pixels
in that row (zero outside the grid) give the r output pixels (y r + i, x r + j), j < r, of each. The
batch is split over the mesh in context by `jax.shard_map` (as `tpu_attention`); the parameters'
partial gradients come back per block of images and XLA sums them (over the devices, an all-reduce).

XLA's estimates count a Pallas call's declared FLOPs and bytes; its model charges vector (VPU) work
at about the MXU's rate, for its own fusions and for these kernels alike, so the figures in
docs/tpu.md hold the kernels to the same standard as the XLA form they replace. The kernels do ~30
(forward) and ~90 (backward, the branch recomputed) float32 vector operations per output element.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rest_jax.ops import pallas_lowering

_IMAGES = (32, 16, 8)       # images per grid step: whole (8, 128) tiles of the batch axis
_TAPS = [(dy, dx) for dy in range(3) for dx in range(3)]


def images_per_step(b, h: int, w: int, c: int, r: int, itemsize: int) -> int | None:
    """Images per grid step for `b` images of h x w reduced values with C channels at ratio r: the most
    of 32, 16 and 8 that divide b (or all of a smaller batch) whose blocks, buffers and float32 scratch
    fit `pallas_lowering.vmem_budget()` in the backward pass; None where none does or the batch is
    symbolic."""
    if not isinstance(b, int):
        return None
    cp, budget = -(-c // 128) * 128, pallas_lowering.vmem_budget()
    for i in [n for n in _IMAGES if b % n == 0] or ([b] if b < _IMAGES[-1] else []):
        tile = i * cp
        need = (2 * h * w * tile * itemsize                 # the values, two buffers
                + 2 * 2 * w * r * tile * itemsize           # the output gradient's block, two buffers; dv's
                + 2 * h * w * tile * itemsize
                + 4 * tile * (3 * (w + 2) + (h + 2) * (w + 2) + 10 * r + 2))   # float32 scratch
        if need <= budget:
            return i
    return None


def upsample_norm(x: jax.Array, kernel: jax.Array, bias: jax.Array, ratio: int, norm: tuple,
                  add: jax.Array | None = None) -> jax.Array:
    """LayerNorm(PixelShuffle(depthwise 3x3 conv of x to C r r channels + bias)), x (B, h, w, C) ->
    (B, h r, w r, C) in x's dtype, plus `add` (B, h r, w r, C) if given (summed in float32, rounded
    once). kernel (3, 3, 1, C r r) and bias (C r r,) as `portable.upsample`; norm (scale, bias, eps)
    as `portable.layer_norm`. Callers check `images_per_step` first."""
    scale, shift, eps = norm
    return _upsample_norm(x, kernel, bias, scale, shift, add, ratio, eps)


def _params(kernel, bias, scale, shift, c, r):
    """The float32 weights as the kernels read them: (r, r 9, C) [i, j 9 + tap], (r, r, C) [i, j], (1, C) twice."""
    w = kernel.reshape(3, 3, c, r, r).transpose(3, 4, 0, 1, 2).reshape(r, r * 9, c)
    b = bias.reshape(c, r, r).transpose(1, 2, 0)
    return [a.astype(jnp.float32) for a in (w, b, scale.reshape(1, c), shift.reshape(1, c))]


def tokens(x):
    """x (B, h, w, C) -> (h w, B, C): tokens-major (XLA's own layout of EMSA's values: no copy there)."""
    return jnp.swapaxes(x.reshape(x.shape[0], -1, x.shape[-1]), 0, 1)


def _load_taps(v_ref, taps, y, h):
    """Rows y - 1, y and y + 1 of the values (v_ref: (h w, I, C)) in float32, zero-padded by one pixel
    (rows outside the grid, and the first and last columns, zero), into `taps` (3, w + 2, I, C)."""
    w = taps.shape[1] - 2
    taps[...] = jnp.zeros_like(taps)
    for dy in range(3):
        row = y + dy - 1

        @pl.when((row >= 0) & (row < h))
        def _():
            taps[dy, pl.ds(1, w)] = v_ref[pl.ds(row * w, w)].astype(jnp.float32)


def _conv(taps, w_ref, b_ref, x, j):
    """The conv's output for output column phase j of v's pixel x: (I, C) float32."""
    u = b_ref[0, pl.ds(j, 1), :]
    for t, (dy, dx) in enumerate(_TAPS):
        u = u + w_ref[0, pl.ds(j * 9 + t, 1), :] * taps[dy, x + dx]
    return u


def normalised(u, eps):
    """(u - mean) / std over the channels (the lanes) and 1 / std: the two-pass variance."""
    d = u - jnp.mean(u, axis=-1, keepdims=True)
    rstd = lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + eps)
    return d * rstd, rstd


def _forward_kernel(v_ref, w_ref, b_ref, s_ref, t_ref, *refs, r, eps):
    a_ref, o_ref, taps = refs if len(refs) == 3 else (None, *refs)   # the array to add, if any
    _load_taps(v_ref, taps, pl.program_id(2), pl.num_programs(2))
    scale, shift = s_ref[...], t_ref[...]

    def pixel(x, carry):
        for j in range(r):
            y_hat, _ = normalised(_conv(taps, w_ref, b_ref, x, j), eps)
            y = y_hat * scale + shift
            o_ref[x * r + j] = (y if a_ref is None else y + a_ref[x * r + j].astype(jnp.float32)).astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, taps.shape[1] - 2, pixel, 0)


def _backward_kernel(v_ref, w_ref, b_ref, s_ref, t_ref, g_ref, dv_ref, dw_ref, db_ref, dst_ref,
                     taps, dvp, dw, db, dst, *, r, eps):
    i, y = pl.program_id(1), pl.program_id(2)
    h, w = dvp.shape[0] - 2, dvp.shape[1] - 2

    @pl.when((i == 0) & (y == 0))
    def _():
        dvp[...] = jnp.zeros_like(dvp)
        dst[...] = jnp.zeros_like(dst)

    @pl.when(y == 0)
    def _():
        dw[...] = jnp.zeros_like(dw)
        db[...] = jnp.zeros_like(db)

    _load_taps(v_ref, taps, y, h)
    scale = s_ref[...]

    def pixel(x, carry):
        for j in range(r):
            y_hat, rstd = normalised(_conv(taps, w_ref, b_ref, x, j), eps)
            g = g_ref[x * r + j].astype(jnp.float32)
            dst[0] += g * y_hat
            dst[1] += g
            gs = g * scale
            du = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
                         - y_hat * jnp.mean(gs * y_hat, axis=-1, keepdims=True))
            db[j] += du
            for t, (dy, dx) in enumerate(_TAPS):
                dw[j * 9 + t] += du * taps[dy, x + dx]
                dvp[y + dy, x + dx] += w_ref[0, pl.ds(j * 9 + t, 1), :] * du
        return carry

    lax.fori_loop(0, w, pixel, 0)

    # The parameters' gradients, summed over the block's images (the sublanes) once per row phase.
    @pl.when(y == pl.num_programs(2) - 1)
    def _():
        for k in range(9 * r):
            dw_ref[0, 0, pl.ds(k, 1), :] = jnp.sum(dw[k], axis=0, keepdims=True)
        for j in range(r):
            db_ref[0, 0, pl.ds(j, 1), :] = jnp.sum(db[j], axis=0, keepdims=True)

    @pl.when((i == pl.num_programs(1) - 1) & (y == pl.num_programs(2) - 1))
    def _():
        for row in range(h):
            dv_ref[pl.ds(row * w, w)] = dvp[row + 1, 1:w + 1].astype(dv_ref.dtype)
        dst_ref[0] = jnp.sum(dst[...], axis=1)


def _specs(v, h, r, images):
    """The block specs shared by both passes (values, w, b, scale, shift, the output or its gradient)
    and the grid: v (h w, B, C) -> output (h r w r, B, C)."""
    m, b, c = v.shape
    w = m // h
    const = lambda n, i, y: (0, 0)  # noqa: E731
    return ([pl.BlockSpec((m, images, c), lambda n, i, y: (0, n, 0)),
             pl.BlockSpec((1, 9 * r, c), lambda n, i, y: (i, 0, 0)),
             pl.BlockSpec((1, r, c), lambda n, i, y: (i, 0, 0)),
             pl.BlockSpec((1, c), const), pl.BlockSpec((1, c), const)],
            pl.BlockSpec((w * r, images, c), lambda n, i, y: (y * r + i, n, 0)),
            (b // images, r, h))


def _forward_call(v, w, b, s, t, *add, h, r, eps, images, interpret):
    m, batch, c = v.shape
    ins, out, grid = _specs(v, h, r, images)
    n = batch * m * r * r * c
    cost = pallas_lowering.cost(batch, flops=(30 + len(add)) * n, transcendentals=batch * m * r * r,
                                bytes_accessed=v.dtype.itemsize * (v.size + (1 + len(add)) * n))
    return pl.pallas_call(
        functools.partial(_forward_kernel, r=r, eps=eps), grid=grid, in_specs=ins + [out] * len(add), out_specs=out,
        out_shape=jax.ShapeDtypeStruct((m * r * r, batch, c), v.dtype),
        scratch_shapes=[pltpu.VMEM((3, m // h + 2, images, c), jnp.float32)],
        compiler_params=pallas_lowering.compiler_params('parallel', 'parallel', 'parallel'),
        cost_estimate=cost, interpret=interpret, name='upsample_norm')(v, w, b, s, t, *add)


def _backward_call(v, w, b, s, t, g, *, h, r, eps, images, interpret):
    m, batch, c = v.shape
    wd = m // h
    ins, grads, grid = _specs(v, h, r, images)
    blocks = batch // images
    n = batch * m * r * r * c
    cost = pallas_lowering.cost(batch, flops=90 * n, transcendentals=batch * m * r * r,
                                bytes_accessed=v.dtype.itemsize * (2 * v.size + n))
    return pl.pallas_call(
        functools.partial(_backward_kernel, r=r, eps=eps), grid=grid, in_specs=[*ins, grads],
        out_specs=[pl.BlockSpec((m, images, c), lambda n, i, y: (0, n, 0)),
                   pl.BlockSpec((1, 1, 9 * r, c), lambda n, i, y: (n, i, 0, 0)),
                   pl.BlockSpec((1, 1, r, c), lambda n, i, y: (n, i, 0, 0)),
                   pl.BlockSpec((1, 2, c), lambda n, i, y: (n, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((blocks, r, 9 * r, c), jnp.float32),
                   jax.ShapeDtypeStruct((blocks, r, r, c), jnp.float32),
                   jax.ShapeDtypeStruct((blocks, 2, c), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((3, wd + 2, images, c), jnp.float32),
                        pltpu.VMEM((h + 2, wd + 2, images, c), jnp.float32),
                        pltpu.VMEM((9 * r, images, c), jnp.float32), pltpu.VMEM((r, images, c), jnp.float32),
                        pltpu.VMEM((2, images, c), jnp.float32)],
        compiler_params=pallas_lowering.compiler_params('parallel', 'arbitrary', 'arbitrary'),
        cost_estimate=cost, interpret=interpret, name='upsample_norm_backward')(v, w, b, s, t, g)


def _forward(x, kernel, bias, scale, shift, add, r, eps):
    b, h, w, c = x.shape
    params = _params(kernel, bias, scale, shift, c, r)
    add = [] if add is None else [add]

    def local(*args):
        (x, *add), params = args[4:], args[:4]
        call = functools.partial(_forward_call, h=h, r=r, eps=eps,
                                 images=images_per_step(x.shape[0], h, w, c, r, x.dtype.itemsize))
        out = pallas_lowering.on_platform(call, tokens(x), *params, *map(tokens, add))   # (h r w r, B, C)
        return jnp.swapaxes(out, 0, 1).reshape(-1, h * r, w * r, c)         # XLA's own layout: no copy

    return pallas_lowering.split_batch(local, b, 4, 1 + len(add))(*params, x, *add)


def _backward(x, kernel, bias, scale, shift, g, r, eps):
    b, h, w, c = x.shape
    params = _params(kernel, bias, scale, shift, c, r)

    def local(*params_x_g):
        *params, x, g = params_x_g
        call = functools.partial(_backward_call, h=h, r=r, eps=eps,
                                 images=images_per_step(x.shape[0], h, w, c, r, x.dtype.itemsize))
        g = jnp.swapaxes(g.reshape(g.shape[0], -1, c), 0, 1)
        dv, dw, db, dst = pallas_lowering.on_platform(call, tokens(x), *params, g)
        return jnp.swapaxes(dv, 0, 1).reshape(x.shape), dw, db, dst

    dx, dw, db, dst = pallas_lowering.split_batch(local, b, 4, 2)(*params, x, g)
    # [dy, dx, 0, c r r + i r + j]
    dw = dw.sum(0).reshape(r, r, 3, 3, c).transpose(2, 3, 4, 0, 1).reshape(kernel.shape)
    db = db.sum(0).transpose(2, 0, 1).reshape(bias.shape)
    dscale, dshift = dst.sum(0)
    return (dx, dw.astype(kernel.dtype), db.astype(bias.dtype), dscale.astype(scale.dtype).reshape(scale.shape),
            dshift.astype(shift.dtype).reshape(shift.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _upsample_norm(x, kernel, bias, scale, shift, add, r, eps):
    return _forward(x, kernel, bias, scale, shift, add, r, eps)


def _upsample_norm_fwd(x, kernel, bias, scale, shift, add, r, eps):
    out = _forward(x, kernel, bias, scale, shift, add, r, eps)
    return out, (x, kernel, bias, scale, shift, None if add is None else jnp.zeros((), add.dtype))


def _upsample_norm_bwd(r, eps, residuals, g):
    *residuals, added = residuals             # a scalar of the added array's dtype, or None
    grads = _backward(*residuals, g.astype(residuals[0].dtype), r, eps)
    return (*grads, None if added is None else g.astype(added.dtype))   # d add = the output's gradient


_upsample_norm.defvjp(_upsample_norm_fwd, _upsample_norm_bwd)
