"""Pixel attention (ResT's position encoding) and the LayerNorm after it as one Pallas kernel per pass
on TPU.

PA(x) = x * sigmoid(depthwise 3x3 conv(x) + bias), per channel; ResTv2's stem and patch embeddings
follow it with a LayerNorm over C (`norm`), ResT v1's use it alone. XLA runs the conv, the gate, the
product and the norm's statistics as separate passes over the (B, H, W, C) array, forward and backward,
and keeps their intermediates for the backward pass. Here the forward kernel reads x once and writes
the output once; the backward kernel reads x and the output's gradient, recomputes the gate and the
norm, and writes x's gradient and per-image-block partial sums of the parameters' gradients. The
arithmetic is the portable form's up to float rounding: products and sums in float32, the norm's
statistics from the float32 product (the portable form rounds the gate and the product to the compute
dtype first), the two-pass variance.

Layout: x, the output and the gradients go tokens-major, (H W, B, C) in memory, as `tpu_upsample`'s
arrays and the attention kernels' q (channels in the lanes, images in the sublanes), so that a row of
pixels is a leading-axis slice and the conv's shifts are address offsets. Each grid step takes a block
of I images and R rows (`plan`); the conv needs one row above and below the block (the forward pass)
and the backward pass two (its gradient reaches one row further), read as one-row blocks of their own
(zero outside the image). The batch is split over the mesh in context by `jax.shard_map`
(`pallas_lowering.split_batch`); the parameters' partial gradients come back per block of images and
XLA sums them. Not differentiated, where XLA keeps the batch in the lanes (the stem and patch_2 at a
multiple of 128 images per device), the portable form runs: its fused forward pass beats the kernel
with the relayout copies around it there (docs/tpu.md).

XLA's estimates count a Pallas call's declared FLOPs and bytes (halo rows included); its model charges
vector (VPU) work at about the MXU's rate, for its own fusions and for these kernels alike. The kernels
do ~35 (forward) and ~100 (backward) float32 vector operations per element.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rest_jax.ops import pallas_lowering, portable
from rest_jax.ops.tpu_upsample import normalised, tokens

_IMAGES = (32, 16, 8)       # images per grid step: whole (8, 128) tiles of the batch axis
_TAPS = [(dy, dx) for dy in range(3) for dx in range(3)]
_PIECE = 8                  # pixels of a row per vector step
_TEMPORARIES = 1 << 19      # VMEM bytes for Mosaic's own temporaries (values of a few pixels)


def _vmem(h, w, c, images, rows, itemsize, backward):
    """VMEM bytes of a grid step: blocks with their second buffers, halo rows, scratch, temporaries."""
    lanes = -(-c // 128) * 128
    block = w * (-(-images // 8) * 8) * lanes * itemsize      # one row of pixels, one buffer
    row, padded = w * images * lanes * 4, (w + 2) * images * lanes * 4
    halo = rows < h
    if backward:   # x, g, dx; 4 + 2 halo rows; x (R + 4 rows), du (R + 2) and dz s (R) in float32
        return (2 * 3 * rows + 2 * 6 * halo) * block + (2 * rows + 6) * padded + rows * row + _TEMPORARIES
    return (2 * 2 * rows + 2 * 2 * halo) * block + (rows + 2) * padded + _TEMPORARIES


def plan(b, h: int, w: int, c: int, itemsize: int) -> tuple[int, int, int] | None:
    """(images, forward rows, backward rows) per grid step for `b` images of h x w pixels with C
    channels: the most rows (the fewest halo rows read twice), then the most images, dividing b and h,
    whose step fits `pallas_lowering.vmem_budget()` in both passes; None where none does or the batch
    is symbolic."""
    if not isinstance(b, int):
        return None
    budget = pallas_lowering.vmem_budget()
    divisors = [d for d in range(h, 0, -1) if h % d == 0]
    plans = []
    for i in [n for n in _IMAGES if b % n == 0] or ([b] if b < _IMAGES[-1] else []):
        forward, backward = ([d for d in divisors if _vmem(h, w, c, i, d, itemsize, bwd) <= budget]
                             for bwd in (False, True))
        if forward and backward:
            plans.append((i, forward[0], backward[0]))
    # halo rows read per row of the image: 2 / forward rows + 6 / backward rows (none for whole images)
    reread = lambda p: 2 * (p[1] < h) / p[1] + 6 * (p[2] < h) / p[2]  # noqa: E731
    return min(plans, key=lambda p: (reread(p), -p[0])) if plans else None


def pixel_attention(x: jax.Array, kernel: jax.Array, bias: jax.Array, norm: tuple | None = None,
                    x_bias: jax.Array | None = None) -> jax.Array:
    """x * sigmoid(depthwise 3x3 conv of x + bias), x (B, H, W, C), kernel (3, 3, 1, C), bias (C,); with
    `norm` (scale, bias, eps), then a LayerNorm over C (`portable.layer_norm`); with `x_bias` (C,), of
    x + x_bias, whose gradient the backward kernel sums as it writes x's (XLA would read x's gradient
    again for it). Output in x's dtype. Callers check `plan` first."""
    c = x.shape[-1]
    scale, shift, eps = norm if norm is not None else (jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32), 0.0)
    return _pixel_attention(x_bias, x, kernel, bias, scale, shift, norm is not None, eps)


def _params(kernel, bias, scale, shift):
    """The float32 parameters as the kernels read them: (9, C) [tap], (1, C) three times."""
    c = bias.shape[0]
    return [a.astype(jnp.float32).reshape(-1, c) for a in (kernel, bias, scale, shift)]


def _pixels_per_piece(w: int) -> int:
    """Pixels of a row taken at a time: the most, up to 8, that divide W (values of a few vector
    registers per image block, not whole rows that Mosaic would have to keep in VMEM)."""
    return max(d for d in range(1, min(w, _PIECE) + 1) if w % d == 0)


def _pieces(lo, hi, w, body):
    """body(j, x0) for rows j in [lo, hi) and the pieces of each, starting at pixel x0."""
    p = _pixels_per_piece(w)

    def row(j, carry):
        return lax.fori_loop(0, w // p, lambda q, c: (body(j, q * p), c)[1], carry)

    lax.fori_loop(lo, hi, row, 0)


def _load(taps, main_ref, tops, bottoms, y, rows, h):
    """Image rows y R - d .. y R + R + d - 1 of x in float32 into `taps` (R + 2 d, W + 2, I, C), d =
    len(tops): the block's rows, the halo rows (zero outside the image) and zero columns either side."""
    depth, w = len(tops), taps.shape[1] - 2
    p = _pixels_per_piece(w)
    edge = jnp.zeros((taps.shape[0], 1, *taps.shape[2:]), jnp.float32)
    taps[:, pl.ds(0, 1)] = edge
    taps[:, pl.ds(w + 1, 1)] = edge

    def main(r, x0):
        taps[depth + r, pl.ds(x0 + 1, p)] = main_ref[pl.ds(r * w + x0, p)].astype(jnp.float32)

    _pieces(0, rows, w, main)
    for j in range(depth):
        inside = (y * rows - depth + j >= 0, y * rows + rows + j < h)
        for at, ref, ok in ((j, tops[j], inside[0]), (depth + rows + j, bottoms[j], inside[1])):
            def halo(_, x0, at=at, ref=ref, ok=ok):
                taps[at, pl.ds(x0 + 1, p)] = (jnp.zeros((p, *taps.shape[2:]), jnp.float32) if ref is None
                                              else jnp.where(ok, ref[pl.ds(x0, p)].astype(jnp.float32), 0.0))
            _pieces(0, 1, w, halo)


def _gate(taps, w_ref, b_ref, j, x0, p):
    """The conv + bias for pixels x0 .. x0 + p - 1 of the row whose neighbours are taps rows j .. j + 2:
    (p, I, C) in float32."""
    u = b_ref[...]
    for t, (dy, dx) in enumerate(_TAPS):
        u = u + w_ref[pl.ds(t, 1), :] * taps[j + dy, pl.ds(x0 + dx, p)]
    return u


def _forward_kernel(w_ref, b_ref, s_ref, t_ref, x_ref, *refs, h, rows, norm, eps):
    halo = len(refs) == 4
    top, bottom, o_ref, taps = refs if halo else (None, None, *refs)
    w = taps.shape[1] - 2
    p = _pixels_per_piece(w)
    _load(taps, x_ref, [top], [bottom], pl.program_id(1), rows, h)

    def piece(r, x0):
        z = taps[r + 1, pl.ds(x0 + 1, p)] * jax.nn.sigmoid(_gate(taps, w_ref, b_ref, r, x0, p))
        if norm:
            z = normalised(z, eps)[0] * s_ref[...] + t_ref[...]
        o_ref[pl.ds(r * w + x0, p)] = z.astype(o_ref.dtype)

    _pieces(0, rows, w, piece)


def _backward_kernel(w_ref, b_ref, s_ref, x_ref, *refs, h, rows, norm, eps, x_sums):
    halo = len(refs) == 17 + 2 * x_sums
    if halo:
        x_halo, (g_ref, g_top, g_bottom), refs = refs[:4], refs[4:7], refs[7:]
    else:
        x_halo, (g_ref, g_top, g_bottom), refs = [None] * 4, (refs[0], None, None), refs[1:]
    if x_sums:
        dx_ref, dw_ref, db_ref, dst_ref, dxs_ref, xt, du, dzs, dw, db, dst, dxs = refs
    else:
        (dx_ref, dw_ref, db_ref, dst_ref, xt, du, dzs, dw, db, dst), dxs_ref, dxs = refs, None, None
    y, w = pl.program_id(1), xt.shape[1] - 2
    p = _pixels_per_piece(w)

    @pl.when(y == 0)
    def _():
        dw[...] = jnp.zeros_like(dw)
        db[...] = jnp.zeros_like(db)
        dst[...] = jnp.zeros_like(dst)
        if x_sums:
            dxs[...] = jnp.zeros_like(dxs)

    _load(xt, x_ref, x_halo[:2], x_halo[2:], y, rows, h)
    edge = jnp.zeros((du.shape[0], 1, *du.shape[2:]), jnp.float32)
    du[:, pl.ds(0, 1)] = edge
    du[:, pl.ds(w + 1, 1)] = edge

    def gate_gradient(j, x0, g, own):
        """The gate's gradient at pixels x0 .. x0 + p - 1 of image row y R - 1 + j (xt rows j .. j + 2);
        for the block's own rows, also dz s (x's direct gradient) and the parameters' gradients."""
        s = jax.nn.sigmoid(_gate(xt, w_ref, b_ref, j, x0, p))
        xc = xt[j + 1, pl.ds(x0 + 1, p)]
        dz = g
        if norm:
            z_hat, rstd = normalised(xc * s, eps)
            gs = g * s_ref[...]
            dz = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
                         - z_hat * jnp.mean(gs * z_hat, axis=-1, keepdims=True))
        d = dz * xc * s * (1.0 - s)
        if own:
            dzs[j - 1, pl.ds(x0, p)] = dz * s
            if norm:
                dst[0] += jnp.sum(g * z_hat, axis=0)
                dst[1] += jnp.sum(g, axis=0)
            db[0] += jnp.sum(d, axis=0)
            for t, (dy, dx) in enumerate(_TAPS):
                dw[t] += jnp.sum(d * xt[j + dy, pl.ds(x0 + dx, p)], axis=0)
        return d

    for j, ref, ok in ((0, g_top, y * rows - 1 >= 0), (rows + 1, g_bottom, y * rows + rows < h)):
        def outer(_, x0, j=j, ref=ref, ok=ok):   # the halo rows' gate gradient: zero outside the image
            du[j, pl.ds(x0 + 1, p)] = (jnp.zeros((p, *du.shape[2:]), jnp.float32) if ref is None else jnp.where(
                ok, gate_gradient(j, x0, ref[pl.ds(x0, p)].astype(jnp.float32), own=False), 0.0))
        _pieces(0, 1, w, outer)

    def own(j, x0):
        du[j, pl.ds(x0 + 1, p)] = gate_gradient(j, x0, g_ref[pl.ds((j - 1) * w + x0, p)].astype(jnp.float32), own=True)

    _pieces(1, rows + 1, w, own)

    def dx_piece(r, x0):
        acc = dzs[r, pl.ds(x0, p)]
        for t, (dy, dx) in enumerate(_TAPS):
            acc = acc + w_ref[pl.ds(t, 1), :] * du[r + 2 - dy, pl.ds(x0 + 2 - dx, p)]
        dx = acc.astype(dx_ref.dtype)
        dx_ref[pl.ds(r * w + x0, p)] = dx
        if x_sums:      # x_bias's gradient: the sum of x's gradient as given, over pixels and images
            dxs[0] += jnp.sum(dx.astype(jnp.float32), axis=0)

    _pieces(0, rows, w, dx_piece)

    # The parameters' gradients, summed over the block's images (the sublanes) once per image block.
    @pl.when(y == pl.num_programs(1) - 1)
    def _():
        for t in range(9):
            dw_ref[0, pl.ds(t, 1), :] = jnp.sum(dw[t], axis=0, keepdims=True)
        db_ref[0] = jnp.sum(db[0], axis=0, keepdims=True)
        for k in range(2):
            dst_ref[0, pl.ds(k, 1), :] = jnp.sum(dst[k], axis=0, keepdims=True)
        if x_sums:
            dxs_ref[0] = jnp.sum(dxs[0], axis=0, keepdims=True)


def _row_specs(w, c, images, rows, h, depth):
    """The block spec of a block's rows, and those of the `depth` halo rows above it (farthest first)
    and below it (nearest first), one-row blocks clamped to the image (the kernels zero rows outside)."""
    main = pl.BlockSpec((rows * w, images, c), lambda n, y: (y, n, 0))
    if rows == h:
        return main, []

    def row(offset):
        return pl.BlockSpec((w, images, c), lambda n, y: (jnp.clip(y * rows + offset, 0, h - 1), n, 0))
    return main, [row(-k) for k in range(depth, 0, -1)] + [row(rows + k) for k in range(depth)]


def _forward_call(w, b, s, t, x, *, h, plan_, norm, eps, interpret):
    m, batch, c = x.shape
    wd, (images, rows, _) = m // h, plan_
    main, halo = _row_specs(wd, c, images, rows, h, 1)
    params = [pl.BlockSpec((9, c), lambda n, y: (0, 0))] + [pl.BlockSpec((1, c), lambda n, y: (0, 0))] * 3
    n = x.size
    cost = pallas_lowering.cost(batch, flops=35 * n, transcendentals=n + (n // c if norm else 0),
                                bytes_accessed=x.dtype.itemsize * (n * (rows + len(halo)) // rows + n))
    return pl.pallas_call(
        functools.partial(_forward_kernel, h=h, rows=rows, norm=norm, eps=eps),
        grid=(batch // images, h // rows), in_specs=[*params, main, *halo], out_specs=main,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_shapes=[pltpu.VMEM((rows + 2, wd + 2, images, c), jnp.float32)],
        compiler_params=pallas_lowering.compiler_params('parallel', 'parallel'),
        cost_estimate=cost, interpret=interpret, name='pixel_attention')(w, b, s, t, x, *[x] * len(halo))


def _backward_call(w, b, s, x, g, *, h, plan_, norm, eps, x_sums, interpret):
    m, batch, c = x.shape
    wd, (images, _, rows) = m // h, plan_
    main, x_halo = _row_specs(wd, c, images, rows, h, 2)
    _, g_halo = _row_specs(wd, c, images, rows, h, 1)
    params = [pl.BlockSpec((9, c), lambda n, y: (0, 0))] + [pl.BlockSpec((1, c), lambda n, y: (0, 0))] * 2
    blocks, n = batch // images, x.size
    per_block = lambda k: pl.BlockSpec((1, k, c), lambda n, y: (n, 0, 0))  # noqa: E731
    reads = n * (2 * rows + len(x_halo) + len(g_halo)) // rows          # x and g with their halo rows
    cost = pallas_lowering.cost(batch, flops=100 * n, transcendentals=n + (n // c if norm else 0),
                                bytes_accessed=x.dtype.itemsize * (reads + n))
    sums = (9, 1, 2, 1) if x_sums else (9, 1, 2)      # per image block: dw, db, d(scale, shift), d x_bias
    return pl.pallas_call(
        functools.partial(_backward_kernel, h=h, rows=rows, norm=norm, eps=eps, x_sums=x_sums),
        grid=(blocks, h // rows), in_specs=[*params, main, *x_halo, main, *g_halo],
        out_specs=[main, *[per_block(k) for k in sums]],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   *[jax.ShapeDtypeStruct((blocks, k, c), jnp.float32) for k in sums]],
        scratch_shapes=[pltpu.VMEM((rows + 4, wd + 2, images, c), jnp.float32),
                        pltpu.VMEM((rows + 2, wd + 2, images, c), jnp.float32),
                        pltpu.VMEM((rows, wd, images, c), jnp.float32),
                        *[pltpu.VMEM((k, images, c), jnp.float32) for k in sums]],
        compiler_params=pallas_lowering.compiler_params('parallel', 'arbitrary'),
        cost_estimate=cost, interpret=interpret, name='pixel_attention_backward')(
            w, b, s, x, *[x] * len(x_halo), g, *[g] * len(g_halo))


def _plan(x):
    b, h, w, c = x.shape
    return plan(b, h, w, c, x.dtype.itemsize)


def _forward(x, kernel, bias, scale, shift, norm, eps):
    b, h, w, c = x.shape
    params = _params(kernel, bias, scale, shift)

    def local(*args):
        *params, x = args
        call = functools.partial(_forward_call, h=h, plan_=_plan(x), norm=norm, eps=eps)
        out = pallas_lowering.on_platform(call, *params, tokens(x))        # (H W, B, C)
        return jnp.swapaxes(out, 0, 1).reshape(x.shape)

    return pallas_lowering.split_batch(local, b, 4, 1)(*params, x)


def _backward(x, kernel, bias, scale, shift, g, norm, eps, x_sums=False):
    """The gradients of x, kernel, bias, scale and shift; with `x_sums`, then the sum of x's over the
    batch and the pixels (C,) in float32."""
    b, h, w, c = x.shape
    wt, bt, st, _ = _params(kernel, bias, scale, shift)

    def local(*args):
        *params, x, g = args
        call = functools.partial(_backward_call, h=h, plan_=_plan(x), norm=norm, eps=eps, x_sums=x_sums)
        dx, *sums = pallas_lowering.on_platform(call, *params, tokens(x), tokens(g))
        return jnp.swapaxes(dx, 0, 1).reshape(x.shape), *sums

    dx, dw, db, dst, *dxs = pallas_lowering.split_batch(local, b, 3, 2)(wt, bt, st, x, g)
    dscale, dshift = dst.sum(0)
    return (dx, dw.sum(0).reshape(kernel.shape).astype(kernel.dtype), db.sum(0).reshape(bias.shape).astype(bias.dtype),
            dscale.astype(scale.dtype), dshift.astype(shift.dtype), *[d.sum((0, 1)) for d in dxs])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pixel_attention(x_bias, x, kernel, bias, scale, shift, norm, eps):
    x = portable.add_bias(x, x_bias)
    # Not differentiated (inference, evaluation), where XLA keeps the batch in the lanes (the narrow
    # stages at a multiple of 128 images per device): XLA's own form, which fuses the forward pass
    # without the relayout copies into and out of the kernel's layout (restv2_tiny's inference at 256
    # per chip on v5p, XLA's estimates: 66.6 MB per image, 10.37 ms with the kernel there; 65.2 MB,
    # 10.21 ms without).
    if (pallas_lowering.fills_lanes(pallas_lowering.local_batch(x.shape[0]))
            and x.shape[-1] <= pallas_lowering.NARROW_CHANNELS):
        return portable.pixel_attention(x, kernel, bias, (scale, shift, eps) if norm else None)
    return _forward(x, kernel, bias, scale, shift, norm, eps)


def _pixel_attention_fwd(x_bias, x, kernel, bias, scale, shift, norm, eps):
    x = portable.add_bias(x, x_bias)
    return _forward(x, kernel, bias, scale, shift, norm, eps), (x, kernel, bias, scale, shift, x_bias)


def _pixel_attention_bwd(norm, eps, residuals, g):
    *residuals, x_bias = residuals
    dx, *grads = _backward(*residuals, g.astype(residuals[0].dtype), norm, eps, x_sums=x_bias is not None)
    dx_bias = None if x_bias is None else grads.pop().astype(x_bias.dtype)
    return (dx_bias, dx, *grads)


_pixel_attention.defvjp(_pixel_attention_fwd, _pixel_attention_bwd)
