"""The kernel forms (rest_jax.ops): their resolution for a target platform, and every CPU and TPU form
against the portable reference, values and gradients."""

from __future__ import annotations

import functools
import itertools
import math
import re
from unittest import mock

import jax
import jax.extend
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import rest_jax
from rest_jax import ops
from rest_jax.ops import cpu, cpu_isa, portable, tpu, tpu_attention, tpu_mlp, tpu_pa, tpu_upsample

FORMS = {'cpu': cpu, 'xla': portable, 'tpu': tpu}


def test_cpu_forms_equal_xla_convolutions():
    """The 'shift' forms against XLA's grouped convolutions, values and gradients: EMSA's reduction
    (slices forward, block form under differentiation, a custom VJP) at strides 8, 4, 2, stride-1
    convs (a custom VJP), and v2's upsample branch (taps written into the pixel-shuffled layout,
    computed by phase under differentiation, a custom VJP)."""
    def dw(x, w, stride, pad, impl):
        return FORMS[impl].depthwise_conv(x, w, stride, pad)
    for stride, size in [(8, (19, 23)), (4, (13, 17)), (2, (9, 8))]:
        x = jax.random.normal(jax.random.key(0), (2, *size, 6))
        w = jax.random.normal(jax.random.key(1), (stride + 1, stride + 1, 1, 6))
        target = jax.random.normal(jax.random.key(2), dw(x, w, stride, stride // 2, 'xla').shape)
        results = [jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(dw(x, w, stride, stride // 2, impl)) * target),
                                              argnums=(0, 1)))(x, w)
                   for impl in ('cpu', 'xla')]
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for kernel, pad in [(3, 1), (5, 2), (3, 0)]:   # stride 1 (PA's gate): a custom VJP
        x = jax.random.normal(jax.random.key(0), (2, 9, 7, 6))
        w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 6))
        target = jax.random.normal(jax.random.key(2), dw(x, w, 1, pad, 'xla').shape)
        results = [jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(dw(x, w, 1, pad, impl)) * target),
                                              argnums=(0, 1)))(x, w)
                   for impl in ('cpu', 'xla')]
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for r in (8, 4, 2, 1):
        _assert_upsample_equals_portable(cpu.upsample, r)


def _assert_upsample_equals_portable(form, r: int) -> None:
    """`form` of v2's upsample branch against the portable one at ratio r, values and gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 6))
    v = {'kernel': jax.random.normal(jax.random.key(1), (3, 3, 1, 6 * r * r)),
         'bias': jax.random.normal(jax.random.key(3), (6 * r * r,))}   # nonzero bias
    target = jax.random.normal(jax.random.key(2), (2, 5 * r, 6 * r, 6))
    results = [jax.jit(jax.value_and_grad(lambda v, x: jnp.sum(jnp.tanh(f(x, v['kernel'], v['bias'], r)) * target),
                                          argnums=(0, 1)))(v, x)
               for f in (form, portable.upsample)]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize('r', [8, 4, 2, 1])
def test_cpu_upsample_inference_forms_equal_the_portable_branch(r):
    """Each inference form of v2's upsample branch on CPU (whichever a host measures fastest), with the
    LayerNorm and the sum with EMSA's attention output after it, against `portable.upsample`."""
    keys = jax.random.split(jax.random.key(r), 6)
    x = jax.random.normal(keys[0], (2, 5, 6, 6))
    kernel, bias = jax.random.normal(keys[1], (3, 3, 1, 6 * r * r)), jax.random.normal(keys[2], (6 * r * r,))
    norm = (1 + 0.1 * jax.random.normal(keys[3], (6,)), jax.random.normal(keys[4], (6,)), 1e-6)
    add = jax.random.normal(keys[5], (2, 5 * r - 1, 6 * r - 2, 6))   # the token grid, cropped
    want = portable.upsample(x, kernel, bias, r, norm, add)
    for name, form in cpu._UPSAMPLE_FORMS.items():
        got = jax.jit(lambda x, kernel, bias, add: portable.finish_upsample(
            form(x, *cpu._shuffled_parameters(kernel, bias, r)), norm, add, cpu.layer_norm))(x, kernel, bias, add)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(jax.jit(lambda x, kernel, bias, add: cpu.upsample(x, kernel, bias, r, norm, add))(
        x, kernel, bias, add), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions")
def test_strided_depthwise_inference_computes_each_tap_once():
    """EMSA's reduction feeds a LayerNorm; in inference its (s + 1)^2 strided slices are summed once and
    written (XLA:CPU fused them into each of the LayerNorm's three passes: 3 (s + 1)^2 slices)."""
    x, kernel = jnp.ones((2, 16, 16, 8)), jnp.ones((5, 5, 1, 8))
    f = jax.jit(lambda x, kernel: cpu.layer_norm(cpu.depthwise_conv(x, kernel, 4, 2), jnp.ones(8), jnp.zeros(8),
                                                 1e-6, jnp.float32))
    text = f.lower(x, kernel).compile().as_text()
    assert len(re.findall(r' slice\(%\S+\), slice=\{\[0:2:1\], \[\d+:\d+:4\]', text)) == 25
    np.testing.assert_allclose(f(x, kernel), portable.layer_norm(portable.depthwise_conv(x, kernel, 4, 2), jnp.ones(8),
                                                                 jnp.zeros(8), 1e-6, jnp.float32), atol=1e-5)


def test_tpu_forms_equal_portable_forms():
    """The TPU forms against the portable ones, values and gradients: v2's upsample branch as one
    transposed (input-dilated) depthwise conv with its hand-written kernel gradient (at ratios 8, 4 and
    2, though the TPU forms take it at 8 and 4 only)."""
    assert tpu.TRANSPOSED_RATIOS == (4, 8)
    for r in (8, 4, 2):
        _assert_upsample_equals_portable(tpu._transposed_upsample, r)
    for r in (8, 4, 2, 1):
        _assert_upsample_equals_portable(tpu.upsample, r)



@pytest.mark.parametrize('layout', ['rows', 'tokens'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_tpu_attention_kernels_equal_the_portable_form(monkeypatch, dtype, layout):
    """The Pallas attention (run by Pallas's interpreter here) against the portable form, values and the
    gradients of q, k and v: one head and several, one query block and several (the key and value
    gradients summed over the blocks); on rows, one image per step, queries padded to a whole number
    of blocks; tokens-major, several images per step and several steps of images."""
    monkeypatch.setattr(tpu_attention, '_BLOCK_ELEMENTS', 1024)   # several query blocks at these sizes
    if layout == 'rows':
        monkeypatch.setattr(tpu_attention, 'image_block', lambda *args: None)
    else:
        monkeypatch.setattr(tpu_attention, '_IMAGE_BLOCKS', (4,))   # two steps of images
    dt = jnp.dtype(dtype)
    # float32: XLA:CPU sums in another order on another CPU kind (one gradient element 2.1e-6 off on Zen 5)
    tol = dict(rtol=1e-5, atol=1e-5) if dt == jnp.float32 else dict(rtol=2e-2, atol=4e-2)
    b = 2 if layout == 'rows' else 8
    for (h, w), m, c, heads in [((8, 12), 6, 24, 1), ((8, 8), 16, 32, 2), ((7, 7), 4, 48, 3), ((3, 5), 4, 8, 1)]:
        keys = jax.random.split(jax.random.key(h * w + c), 4)
        q = jax.random.normal(keys[0], (b, h, w, c), dt)
        k, v = (2 * jax.random.normal(key, (b, m, c), dt) for key in keys[1:3])
        g = jax.random.normal(keys[3], (b, h, w, c), dt)
        scale = (c // heads) ** -0.5
        if layout == 'rows':
            queries = {96: 32, 64: 32, 49: 16, 15: 15}[h * w]
            assert tpu_attention.plan(b, h * w, c, m, dt.itemsize) == (1, queries, False)
        else:   # 4 images and at most 1024 / 4 / max(c, m) queries per step, a divisor of h w
            assert tpu_attention.plan(b, h * w, c, m, dt.itemsize) == (4, {96: 8, 64: 8, 49: 1, 15: 15}[h * w], True)

        q_bias = jax.random.normal(keys[3], (c,), dt)

        def outputs(form, biased):
            if biased:   # the query projection's bias: its gradient summed by the backward kernel
                out, vjp = jax.vjp(lambda q, k, v, bq: form(q, k, v, heads, scale, bq), q, k, v, q_bias)
            else:
                out, vjp = jax.vjp(lambda q, k, v: form(q, k, v, heads, scale), q, k, v)
            return (out, *vjp(g))
        for biased in (False, True):
            # forward and backward kernels, each as Mosaic's and the interpreter's (lax.platform_dependent)
            assert str(jax.make_jaxpr(outputs, static_argnums=(0, 1))(tpu.attention, biased)).count('pallas_call') == 4
            got = jax.jit(outputs, static_argnums=(0, 1))(tpu.attention, biased)
            want = jax.jit(outputs, static_argnums=(0, 1))(portable.attention, biased)
            assert len(got) == len(want) == 4 + biased
            for a, b_ in zip(got[:4], want[:4]):
                assert a.dtype == b_.dtype == dt
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b_, np.float32), **tol)
            if biased:   # q_bias's gradient: q's summed in float32 (XLA:CPU's bfloat16 sum is the coarser one)
                assert got[4].dtype == dt
                np.testing.assert_allclose(np.asarray(got[4], np.float32),
                                           np.asarray(got[1], np.float32).sum((0, 1, 2)), rtol=1e-2 if dt != jnp.float32 else 1e-5, atol=1e-4)
                if dt == jnp.float32:
                    np.testing.assert_allclose(got[4], want[4], **tol)


def test_tpu_attention_layouts():
    """Where the kernels take the tokens-major layout (N, B, C): wherever a block of 8 or 16 images fits
    VMEM, XLA's batch-minor layout (the batch in the lanes, at most 192 channels) included, but not for
    a symbolic batch; 16 images per step where their keys, values and gradients fit VMEM (every stage of
    restv2_tiny), 8 for 1024 channels, all of a small batch; rows where not even 8 fit (2048 channels)."""
    plan = tpu_attention.plan
    # restv2_tiny's stages at 128 and at 32 images per chip (bfloat16; a pod slice at 32)
    for per_chip in (128, 32):
        assert [plan(per_chip, n, c, 49, 2) for n, c in [(3136, 96), (784, 192), (196, 384), (49, 768)]] == \
            [(16, 112, True), (16, 56, True), (16, 28, True), (16, 7, True)]
    assert plan(128, 49, 1024, 49, 2) == (8, 7, True)
    assert plan(128, 49, 2048, 49, 2) == (1, 49, False)
    assert plan(3, 196, 384, 49, 4) == (3, 196, True)
    assert plan(24, 196, 384, 49, 2) == (8, 49, True)
    assert plan(jax.export.symbolic_shape('b')[0], 196, 384, 49, 2) == (1, 196, False)


def test_tpu_attention_query_blocks():
    """Queries per kernel step at restv2's 224 x 224 stages and at a detector's 1333 x 800 input (stage
    1: a block that does not divide the 200 x 333 queries, which are padded), and where not even 16
    queries' logits fit VMEM (the portable form then runs)."""
    assert [tpu_attention.query_block(n, c, 49) for n, c in [(3136, 96), (784, 192), (196, 384), (49, 768)]] == \
        [1568, 784, 196, 49]
    assert tpu_attention.query_block(200 * 333, 96, 25 * 42) == 240
    assert tpu_attention.query_block(200 * 333, 96, 1 << 15) is None
    k = v = jax.ShapeDtypeStruct((1, 1 << 15, 8), jnp.float32)
    q = jax.ShapeDtypeStruct((1, 200, 333, 8), jnp.float32)
    jaxpr = str(jax.make_jaxpr(tpu.attention, static_argnums=(3, 4))(q, k, v, 1, 0.1))
    assert 'pallas_call' not in jaxpr and 'dot_general' in jaxpr   # the portable form


@pytest.mark.parametrize('norm', [True, False], ids=['norm', 'no-norm'])
@pytest.mark.parametrize('dtype, batch', [('float32', 256), ('bfloat16', 128), ('float32', 6), ('bfloat16', 6)])
def test_tpu_mlp_kernels_equal_the_portable_form(monkeypatch, dtype, batch, norm):
    """The Pallas MLP (run by Pallas's interpreter here) against the portable form, values and the
    gradients of x and of both layers' weights and biases (and, with the LayerNorm in front, of its scale
    and bias), in both layouts: the batch in the lanes (a multiple of 128 images; two lane blocks at 256)
    and rows of channels (fewer images). Tokens or rows padded to whole grid steps, several steps in each
    half of the backward grid, the weight gradients summed over all of them. In bfloat16 both are held to
    the float32 form on the same rounded inputs: the kernels sum the bias gradients in float32, closer to
    it than the portable form's bfloat16 sums (~4 % of the largest here)."""
    monkeypatch.setattr(tpu_mlp, '_HIDDEN_ELEMENTS', 2 * 32 * 128)     # two tokens per grid step
    monkeypatch.setattr(tpu_mlp, '_ROW_HIDDEN_ELEMENTS', 16 * 32)      # 16 rows per grid step
    dt = jnp.dtype(dtype)
    c, f = 8, 32
    keys = jax.random.split(jax.random.key(0), 8)
    x = (jax.random.normal(keys[0], (batch, 3, 5, c)) * 2 + jnp.arange(c) / 4).astype(dt)   # uneven means, scales
    w1, w2 = jax.random.normal(keys[1], (c, f)) / c ** 0.5, jax.random.normal(keys[2], (f, c)) / f ** 0.5
    b1, b2 = 0.5 * jax.random.normal(keys[3], (f,)), 0.5 * jax.random.normal(keys[4], (c,))
    scale, bias = 1 + 0.3 * jax.random.normal(keys[6], (c,)), 0.3 * jax.random.normal(keys[7], (c,))
    g = jax.random.normal(keys[5], x.shape, dt)
    assert tpu_mlp.tokens_per_step(f, 15) == 2 and tpu_mlp.rows_per_step(f, 6 * 15) == 16 and tpu_mlp.fits(c, f, batch, norm)

    def outputs(form, dtype, *args):
        def fn(x, w1, b1, w2, b2, *ln):
            return form(x, w1, b1, w2, b2, dtype, (*ln, 1e-6) if ln else None)
        out, vjp = jax.vjp(fn, *args)
        return (out, *vjp(g.astype(out.dtype)))
    args = (x, w1, b1, w2, b2, *((scale, bias) if norm else ()))
    # forward and backward kernels, each as Mosaic's and the interpreter's (lax.platform_dependent)
    assert str(jax.make_jaxpr(outputs, static_argnums=(0, 1))(tpu.mlp, dt, *args)).count('pallas_call') == 4
    got = jax.jit(outputs, static_argnums=(0, 1))(tpu.mlp, dt, *args)
    rounded = [a.astype(dt).astype(jnp.float32) for a in args]
    want = jax.jit(outputs, static_argnums=(0, 1))(portable.mlp, jnp.float32, *rounded)
    assert len(got) == len(want) == len(args) + 1
    for a, r in zip(got, want):
        assert a.shape == r.shape and a.dtype == (dt if a.ndim == 4 else jnp.float32)
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        if dt == jnp.float32:
            np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
        else:
            assert np.max(np.abs(a - r)) <= 1e-2 * np.max(np.abs(r))


def test_tpu_mlp_where_the_kernels_run():
    """The kernels where they lower XLA's estimate (at most 128 channels, 192 in the lanes layout with
    the norm inside), and only where the MLP is differentiated; the portable form for wider MLPs and in
    inference (XLA fuses its own form into one op there)."""
    def kernels(c, batch, norm=True):
        x = jax.ShapeDtypeStruct((batch, 7, 7, c), jnp.bfloat16)
        w1, w2 = jax.ShapeDtypeStruct((c, 4 * c), jnp.float32), jax.ShapeDtypeStruct((4 * c, c), jnp.float32)
        b1, b2 = jax.ShapeDtypeStruct((4 * c,), jnp.float32), jax.ShapeDtypeStruct((c,), jnp.float32)
        args = (x, w1, b1, w2, b2, *((b2, b2) if norm else ()))

        def loss(x, w1, b1, w2, b2, *ln):
            return jnp.sum(tpu.mlp(x, w1, b1, w2, b2, jnp.bfloat16, (*ln, 1e-6) if ln else None).astype(jnp.float32))
        assert 'pallas_call' not in str(jax.make_jaxpr(loss)(*args))
        return 'pallas_call' in str(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(len(args)))))(*args))
    # 192 channels only with the norm inside and the batch in the lanes (a multiple of 128 images)
    assert [kernels(c, 128) for c in (64, 96, 128, 192, 256)] == [True, True, True, True, False]
    assert [kernels(c, 256, norm=False) for c in (128, 192)] == [True, False]
    assert [kernels(c, b) for c in (96, 128, 192) for b in (32, 200)] == [True] * 4 + [False] * 2
    # Tokens per grid step with the batch in the lanes, at 224 (stage 1 of v2 and v1, stage 2 of v1)
    # and where a power of two would pad the tokens by more than an eighth (4 tokens at 64 x 64, 17);
    # rows per step otherwise (32 images at 224, stage 1 of v2; an odd count, padded).
    assert [tpu_mlp.tokens_per_step(f, n) for f, n in [(384, 3136), (256, 3136), (512, 784), (512, 4), (512, 17)]] \
        == [8, 16, 8, 2, 1]
    assert [tpu_mlp.rows_per_step(f, r) for f, r in [(384, 32 * 3136), (384, 15)]] == [512, 16]


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_tpu_upsample_kernels_equal_the_portable_form(monkeypatch, dtype):
    """The Pallas upsample branch with its LayerNorm and the sum with EMSA's attention output (run by
    Pallas's interpreter here) against the portable form (`portable.upsample` with `norm` and `add`),
    values and the gradients of the values, the conv's kernel and bias, the norm's scale and bias and the
    added array, at ratios 8, 4, 2 and 1, square and oblong reduced grids, two steps of images (the
    parameters' gradients summed over both), with the sum and without. In bfloat16 both are held to the
    float32 form on the same rounded inputs (the kernels normalise the float32 conv output and add in
    float32; the portable form rounds the conv's output and the branch's to bfloat16 first)."""
    monkeypatch.setattr(tpu_upsample, '_IMAGES', (4,))     # two steps of images
    dt = jnp.dtype(dtype)
    for r, (h, w), c in [(8, (3, 2), 24), (4, (3, 3), 8), (2, (5, 4), 40), (1, (4, 4), 16)]:
        keys = jax.random.split(jax.random.key(r), 7)
        x = (2 * jax.random.normal(keys[0], (8, h, w, c)) + jnp.arange(c) / c).astype(dt)
        kernel = 0.3 * jax.random.normal(keys[1], (3, 3, 1, c * r * r))
        bias = 0.5 * jax.random.normal(keys[2], (c * r * r,))
        scale, shift = 1 + 0.3 * jax.random.normal(keys[3], (c,)), 0.3 * jax.random.normal(keys[4], (c,))
        g = jax.random.normal(keys[5], (8, h * r, w * r, c), dt)
        added = jax.random.normal(keys[6], g.shape, dt)
        assert tpu_upsample.images_per_step(8, h, w, c, r, dt.itemsize) == 4

        def outputs(form, x, kernel, bias, scale, shift, *add):
            out, vjp = jax.vjp(lambda *a: form(*a[:3], r, (*a[3:5], 1e-6), *a[5:]), x, kernel, bias, scale, shift, *add)
            return (out, *vjp(g.astype(out.dtype)))
        args = (x, kernel.astype(dt), bias.astype(dt), scale, shift, *([added] if r != 4 else []))
        # forward and backward kernels, each as Mosaic's and the interpreter's (lax.platform_dependent)
        assert str(jax.make_jaxpr(outputs, static_argnums=0)(tpu.upsample, *args)).count('pallas_call') == 4
        got = jax.jit(outputs, static_argnums=0)(tpu.upsample, *args)
        want = jax.jit(outputs, static_argnums=0)(portable.upsample, *[a.astype(jnp.float32) for a in args])
        for a, ref, arg in zip(got, want, (x, *args)):
            assert a.shape == ref.shape and a.dtype == arg.dtype
            a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
            if dt == jnp.float32:
                np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
            else:
                assert np.max(np.abs(a - ref)) <= 2e-2 * np.max(np.abs(ref)), (r, np.max(np.abs(a - ref)))


def test_tpu_upsample_where_the_kernels_run():
    """The kernels take the branch with its norm wherever a block of images fits VMEM: restv2's stages
    at 224 with 128 and 32 images per chip, a 384 fine-tune's first stage with fewer images per step, a
    small batch whole, a detector's first stage at 800 x 1333 (25 x 42 reduced values at ratio 8) 8
    images at a time; not a symbolic batch, a batch that no block divides, or that stage at 1600 x 2666
    (50 x 84), where the transposed conv and the portable norm run. Without the norm, the branch alone
    is never a kernel."""
    per_step = tpu_upsample.images_per_step
    for per_chip in (128, 32):
        stages = [(96, 8), (192, 4), (384, 2), (768, 1)]
        assert [per_step(per_chip, 7, 7, c, r, 2) for c, r in stages] == [32, 32, 32, 32]
    assert per_step(128, 12, 12, 96, 8, 2) == 32
    assert per_step(6, 7, 7, 384, 2, 4) == 6
    assert per_step(jax.export.symbolic_shape('b')[0], 7, 7, 96, 8, 2) is None
    assert per_step(12, 7, 7, 96, 8, 2) is None
    assert per_step(8, 25, 42, 96, 8, 2) == 8
    assert per_step(8, 50, 84, 96, 8, 2) is None

    def primitives(batch, h, w, norm=True):
        x = jax.ShapeDtypeStruct((batch, h, w, 96), jnp.bfloat16)
        kernel = jax.ShapeDtypeStruct((3, 3, 1, 96 * 64), jnp.bfloat16)
        bias = jax.ShapeDtypeStruct((96 * 64,), jnp.bfloat16)
        ln = jax.ShapeDtypeStruct((96,), jnp.float32)

        def loss(*args):
            return jnp.sum(tpu.upsample(*args[:3], 8, (*args[3:], 1e-6) if norm else None).astype(jnp.float32))
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, kernel, bias, ln, ln))
    assert 'upsample_norm' in primitives(8, 7, 7)
    for jaxpr in (primitives(8, 7, 7, norm=False), primitives(8, 50, 84)):
        assert 'pallas_call' not in jaxpr and 'lhs_dilation=(8, 8)' in jaxpr   # the transposed conv
    # an added array smaller than the branch (its crop to a token grid that sr does not divide)
    x, ln = jax.ShapeDtypeStruct((8, 7, 7, 16), jnp.float32), jax.ShapeDtypeStruct((16,), jnp.float32)
    kernel, bias = jax.ShapeDtypeStruct((3, 3, 1, 64), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.float32)
    for side, kernels in [(14, True), (13, False)]:
        add = jax.ShapeDtypeStruct((8, side, side, 16), jnp.float32)
        def branch(*a):
            return tpu.upsample(*a[:3], 2, (*a[3:5], 1e-6), a[5])
        assert jax.eval_shape(branch, x, kernel, bias, ln, ln, add).shape == add.shape
        jaxpr = str(jax.make_jaxpr(branch)(x, kernel, bias, ln, ln, add))
        assert ('pallas_call' in jaxpr) == kernels


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_tpu_pixel_attention_kernels_equal_the_portable_form(monkeypatch, dtype):
    """The Pallas pixel attention, with its LayerNorm and without (run by Pallas's interpreter here),
    against `portable.pixel_attention`: the output and the gradients of x, the conv's kernel and bias and
    the norm's scale and bias. Blocks of rows with halo rows above and below (the first, middle and last
    blocks), whole images, rows taken in several pieces, two steps of images (the parameters' gradients
    summed over both). In bfloat16 both are held to the float32 form on the same rounded inputs."""
    monkeypatch.setattr(tpu_pa, '_IMAGES', (4,))     # two steps of images
    monkeypatch.setattr(tpu_pa, '_PIECE', 4)         # rows of 12 in three pieces
    dt = jnp.dtype(dtype)
    for (h, w), c, plan in [((6, 12), 16, (4, 2, 2)), ((8, 5), 24, (4, 4, 1)), ((7, 7), 40, (4, 7, 7))]:
        monkeypatch.setattr(tpu_pa, 'plan', lambda b, h_, w_, c_, size, plan=plan: plan)
        keys = jax.random.split(jax.random.key(h), 6)
        x = (2 * jax.random.normal(keys[0], (8, h, w, c)) + jnp.arange(c) / c).astype(dt)
        kernel, bias = 0.5 * jax.random.normal(keys[1], (3, 3, 1, c)), 0.5 * jax.random.normal(keys[2], (c,))
        scale, shift = 1 + 0.3 * jax.random.normal(keys[3], (c,)), 0.3 * jax.random.normal(keys[4], (c,))
        g = jax.random.normal(keys[5], x.shape, dt)
        x_bias = 0.5 * jax.random.normal(keys[5], (c,))
        for norm, biased in ((True, False), (False, False), (True, True)):
            def outputs(form, x, kernel, bias, scale, shift, x_bias):
                def f(x, kernel, bias, scale, shift, x_bias):
                    return form(x, kernel, bias, (scale, shift, 1e-6) if norm else None, x_bias if biased else None)
                out, vjp = jax.vjp(f, x, kernel, bias, scale, shift, x_bias)
                return (out, *vjp(g.astype(out.dtype)))
            args = (x, kernel.astype(dt), bias.astype(dt), scale, shift, x_bias.astype(dt))
            # forward and backward kernels, each as Mosaic's and the interpreter's (lax.platform_dependent)
            assert str(jax.make_jaxpr(outputs, static_argnums=0)(tpu.pixel_attention, *args)).count('pallas_call') == 4
            got = jax.jit(outputs, static_argnums=0)(tpu.pixel_attention, *args)
            want = jax.jit(outputs, static_argnums=0)(portable.pixel_attention, *[a.astype(jnp.float32) for a in args])
            checked = [i for i in range(7) if i < 4 or (norm and i in (4, 5)) or (biased and i == 6)]
            for a, ref, arg in [(got[i], want[i], (x, *args)[i]) for i in checked]:
                assert a.shape == ref.shape and a.dtype == arg.dtype
                a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
                if dt == jnp.float32:
                    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
                else:
                    assert np.max(np.abs(a - ref)) <= 2e-2 * np.max(np.abs(ref)), ((h, w), norm, np.max(np.abs(a - ref)))


def test_tpu_pixel_attention_where_the_kernels_run():
    """The kernels take pixel attention wherever a block of images and rows fits VMEM: the stem and
    patch embeddings at 224 with 128 and 32 images per chip (halo rows read twice in blocks of 14 or 28
    rows forward, 14 backward, whole images where they fit), an odd batch below a block whole; not a
    symbolic batch, a batch no block divides, a kernel other than 3 x 3, or an input whose dtype is not
    the kernel's."""
    assert [tpu_pa.plan(128, s, s, c, 2) for s, c in [(56, 96), (28, 192), (14, 384), (7, 768)]] == [
        (8, 28, 14), (8, 28, 14), (8, 14, 14), (16, 7, 7)]
    assert [tpu_pa.plan(32, s, s, c, 2) for s, c in [(56, 128), (28, 256), (14, 512), (7, 1024)]] == [
        (8, 28, 14), (8, 28, 14), (8, 14, 14), (16, 7, 7)]
    assert tpu_pa.plan(6, 7, 7, 384, 4) == (6, 7, 7)
    assert tpu_pa.plan(jax.export.symbolic_shape('b')[0], 56, 56, 96, 2) is None
    assert tpu_pa.plan(12, 56, 56, 96, 2) is None
    for budget in (tpu_pa.pallas_lowering.VMEM_BUDGET, tpu_pa.pallas_lowering.SMALL_VMEM_BUDGET):
        with mock.patch.object(tpu_pa.pallas_lowering, 'vmem_budget', return_value=budget):
            for b, s, c in [(128, 56, 96), (128, 28, 192), (32, 14, 512), (32, 7, 1024)]:
                i, forward, backward = tpu_pa.plan(b, s, s, c, 2)
                assert max(tpu_pa._vmem(s, s, c, i, rows, 2, bwd) for rows, bwd in ((forward, False), (backward, True))) <= budget

    def primitives(x_dtype=jnp.bfloat16, k=3, batch=8):
        x = jax.ShapeDtypeStruct((batch, 14, 14, 96), x_dtype)
        kernel, bias = jax.ShapeDtypeStruct((k, k, 1, 96), jnp.bfloat16), jax.ShapeDtypeStruct((96,), jnp.bfloat16)
        ln = jax.ShapeDtypeStruct((96,), jnp.float32)

        def loss(*args):
            return jnp.sum(tpu.pixel_attention(*args[:3], (*args[3:], 1e-6)).astype(jnp.float32))
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, kernel, bias, ln, ln))
    assert 'pixel_attention_backward' in primitives()
    for jaxpr in (primitives(x_dtype=jnp.float32), primitives(batch=12)):
        assert 'pallas_call' not in jaxpr and 'logistic' in jaxpr


def test_exact_gelu_gradient():
    """GELU in PyTorch's erf form: the output against float64 and jax.nn.gelu (erfc form) to
    |x| * 6e-8; the hand-written backward Phi(x) + x * phi(x) against float64, tails included (to
    the ~6e-8 absolute accuracy of Phi from erf), and against autodiff of jax.nn.gelu."""
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 241), jax.random.normal(jax.random.key(0), (500,)) * 3])
    g = jax.random.normal(jax.random.key(1), x.shape)
    ours = jax.vjp(jax.jit(ops.gelu), x)
    ref = jax.vjp(lambda x: jax.nn.gelu(x, approximate=False), x)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(ours[0], [0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x64], rtol=2e-6, atol=8e-7)
    np.testing.assert_allclose(ours[0], ref[0], rtol=2e-6, atol=8e-7)
    exact = np.array([0.5 * math.erfc(-v / math.sqrt(2)) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                      for v in np.asarray(x, np.float64)])
    np.testing.assert_allclose(ours[1](jnp.ones_like(x))[0], exact, rtol=3e-5, atol=2e-7)
    np.testing.assert_allclose(ours[1](g)[0], ref[1](g)[0], rtol=1e-4, atol=1e-6)
    # bfloat16 in, bfloat16 out, computed in float32: no cancellation of 1 + erf(x) in the lower tail.
    xb = x.astype(jnp.bfloat16)
    exact_b = [0.5 * v * math.erfc(-v / math.sqrt(2)) for v in np.asarray(xb, np.float64)]
    out_b = jax.jit(ops.gelu)(xb)
    assert out_b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_b, np.float64), exact_b, rtol=8e-3, atol=8e-7)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_fusion_fence_is_the_identity(dtype):
    """The fence after PA (an XLA:CPU fusion barrier) changes no bit, special values included, in
    the forward and backward pass, and survives compilation on CPU (else it would fence nothing)."""
    info = jnp.finfo(dtype)
    special = jnp.array([0.0, -0.0, info.tiny, info.smallest_subnormal, -info.smallest_subnormal, info.max,
                         -info.max, info.eps, jnp.inf, -jnp.inf, jnp.nan, 1 / 3], dtype)
    x = jnp.concatenate([special, jax.random.normal(jax.random.key(0), (500,), dtype) * 100])
    fence = jax.jit(cpu.pa_fence)
    bits = lambda a: np.asarray(a).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32)
    np.testing.assert_array_equal(bits(fence(x)), bits(x))
    np.testing.assert_array_equal(bits(jax.vjp(fence, x)[1](x)[0]), bits(x))
    if jax.default_backend() == 'cpu':
        assert 'reduce-precision' in fence.lower(x).compile().as_text()


@pytest.mark.parametrize('offset', [0.0, 50.0])
def test_layer_norm_forms_equal_flax(offset):
    """Both LayerNorm forms (the CPU one with a hand-written gradient) against Flax's two-pass
    nn.LayerNorm: the same parameters, the forward pass against float64 (an offset mean tests the
    two-pass variance), and the gradients of x, scale and bias."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 48)) * 3 + offset
    ln, ref = rest_jax.models.layers.LayerNorm(1e-6), nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
    params = {'params': {'scale': 1 + 0.1 * jax.random.normal(jax.random.key(1), (48,)),
                         'bias': 0.1 * jax.random.normal(jax.random.key(2), (48,))}}
    assert jax.tree.structure(ln.init(jax.random.key(3), x)) == jax.tree.structure(params)
    assert jax.tree.structure(ref.init(jax.random.key(3), x)) == jax.tree.structure(params)
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(-1, keepdims=True)
    exact = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    exact = exact * np.asarray(params['params']['scale']) + np.asarray(params['params']['bias'])
    target = jax.random.normal(jax.random.key(4), x.shape)

    def loss(p, x, impl):
        with ops.kernel_forms(impl):
            return jnp.sum(jnp.tanh(ln.apply(p, x)) * target)

    for impl in ('cpu', 'xla'):
        with ops.kernel_forms(impl):
            np.testing.assert_allclose(jax.jit(ln.apply)(params, x), exact, rtol=0, atol=2e-5 * (1 + offset / 10))
        grads = [jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, x, impl),
                 jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.tanh(ref.apply(p, x)) * target), argnums=(0, 1)))(params, x)]
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + offset / 10))
        with ops.kernel_forms(impl):
            half = rest_jax.models.layers.LayerNorm(1e-6, jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
        assert half.dtype == jnp.bfloat16


@pytest.mark.parametrize('channels,kernel,stride,pad', [(3, 3, 2, 1), (6, 3, 2, 1), (6, 1, 1, 0), (6, 3, 1, 1), (5, 5, 4, 2)])
def test_cpu_dense_conv_forms_equal_xla_convolution(channels, kernel, stride, pad):
    """Dense convs on CPU: a 1x1 as a matmul; others with the forward pass, the input gradient and the
    kernel gradient each as patches times a matmul or as XLA's conv (all eight combinations checked,
    whichever this host measures faster)."""
    x = jax.random.normal(jax.random.key(0), (2, 13, 10, channels))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, channels, 7))
    target = jax.random.normal(jax.random.key(2), portable.conv(x, w, stride, pad).shape)
    forms = [cpu.conv, portable.conv]
    if kernel > 1:
        forms += [cpu._conv_in_forms(*combination) for combination in itertools.product(cpu._CONV_FORMS, repeat=3)]
    results = [jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w, stride, pad)) * target),
                                          argnums=(0, 1)))(x, w)
               for f in forms]
    for other in results[:1] + results[2:]:
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(results[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions")
def test_linear_layer_gradients_transpose_no_activation():
    """The CPU forms of a linear layer and the MLP give XLA:CPU 2-D products, whose weight gradients it
    contracts over the tokens in place: the compiled training program transposes no activation-sized
    array (over (B, H, W, C) it copied each output gradient transposed, 38 MB per stage-1 MLP of
    restv2_tiny at batch 8), and the values equal the portable forms'."""
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (2, 8, 8, 16))
    w1, w2 = jax.random.normal(keys[1], (16, 64)) * 0.1, jax.random.normal(keys[2], (64, 16)) * 0.1
    b1, b2, wq = jax.random.normal(keys[3], (64,)), jax.random.normal(keys[4], (16,)), jax.random.normal(keys[5], (16, 24))

    def loss(forms, x, w1, b1, w2, b2, wq):
        y = forms.mlp(x, w1, b1, w2, b2, jnp.float32, (jnp.ones(16), jnp.zeros(16), 1e-6))
        return jnp.sum(jnp.sin(forms.dense(y, wq))) + jnp.sum(jnp.cos(forms.conv(y, wq[None, None], 1, 0)))

    args = (x, w1, b1, w2, b2, wq)
    grads = {forms: jax.jit(jax.value_and_grad(functools.partial(loss, forms), argnums=tuple(range(6))))
             for forms in (cpu, portable)}
    for a, b in zip(jax.tree.leaves(grads[cpu](*args)), jax.tree.leaves(grads[portable](*args))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())   # sums of ~100 terms
    text = grads[cpu].lower(*args).compile().as_text()
    transposed = [int(np.prod([int(d) for d in dims.split(',')]))
                  for dims in re.findall(r'= f32\[([\d,]+)\]\{[\d,]*\} transpose\(', text)]
    assert max(transposed, default=0) <= 64 * 16, transposed


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's fusion decisions")
def test_patches_kernel_gradient_reads_the_output_gradient_once():
    """The patches form's kernel gradient contracts the output gradient g over its pixels, for which
    XLA:CPU transposes g. g is written once before that transpose: XLA:CPU otherwise fuses g's
    producer (here the cosine of sin's derivative) into the transposed copy, and computes it twice."""
    conv = cpu._conv_in_forms('xla', 'xla', 'patches')
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 16))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w, 2, 1))), argnums=(0, 1)))
    fused = re.findall(r'^%\S+ \(.*?\{\n(.*?)\n\}', grad.lower(x, w).compile().as_text(), re.M | re.S)
    assert any(' cosine(' in body for body in fused)
    assert not [body for body in fused if ' cosine(' in body and ' transpose(' in body]



def test_strided_conv_gradient_form_by_isa():
    """The fallback rule, where measuring is off. AVX2: always the patches form. AVX-512: XLA's conv for the RGB stem and for <= 32 channels at
    56x56 outputs and above (v1's stem), the patches form elsewhere."""
    pick = cpu_isa.strided_conv_gradient_form
    assert {pick(c, h, h, False) for c, h in [(3, 112), (32, 56), (96, 28), (384, 7)]} == {'patches'}
    assert [pick(c, h, w, True) for c, h, w in [(3, 112, 112), (4, 7, 7), (32, 56, 56), (32, 56, 60), (32, 28, 28),
                                                (48, 56, 56), (64, 56, 56), (384, 7, 7)]] == \
        ['lax', 'lax', 'lax', 'lax', 'patches', 'patches', 'patches', 'patches']


@pytest.mark.parametrize('name', ['rest_lite', 'restv2_tiny'])
def test_cpu_and_tpu_forms_give_the_same_model_gradients(name):
    """Every CPU form together (depthwise and dense convs, the gradient fences between blocks and between
    stages), and every TPU form, in a model with every stage and two blocks in one: the training
    gradients and BatchNorm updates equal XLA's plain ones."""
    model = rest_jax.create_model(name, embed_dims=[8, 16, 32, 64], depths=[1, 2, 1, 1], num_classes=5)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    x = jax.random.normal(jax.random.key(1), (2, 64, 72, 3))

    def loss(params, impl):
        m = model.clone(impl=impl)
        out, updates = m.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
        return jnp.sum(jnp.tanh(out) * jnp.arange(5.0)), updates

    results = [jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(variables['params'], impl)
               for impl in ('cpu', 'tpu', 'xla')]
    for forms in results[:2]:
        for a, b in zip(jax.tree.leaves(forms), jax.tree.leaves(results[2])):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


# --- which forms run --------------------------------------------------------------------------------

def _tpu_mesh():
    """An abstract mesh of one TPU device: what `jax.set_mesh` of a TPU mesh puts in context."""
    device = jax.sharding.AbstractDevice(device_kind='TPU v5', num_cores=None, platform='tpu')
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('data',), abstract_device=device))


def test_auto_resolves_for_the_target_devices_not_the_host():
    class Device:
        def __init__(self, platform):
            self.platform = platform
    assert ops.resolve('auto', jax.devices()) == jax.devices()[0].platform
    assert ops.resolve('auto', [Device('tpu')] * 4) == 'tpu'
    assert ops.resolve('auto', np.array([[Device('gpu')]])) == ops.resolve('auto', [Device('cuda')]) == 'xla'
    assert ops.resolve('auto', [Device('cpu')]) == 'cpu'
    with _tpu_mesh():
        assert ops.resolve('auto') == 'tpu'
    assert ([ops.resolve(i, [Device('tpu')]) for i in ('cpu', 'shift', 'xla', 'lax', 'tpu')]
            == ['cpu', 'cpu', 'xla', 'xla', 'tpu'])
    with pytest.raises(ValueError, match="one of auto, xla, cpu, tpu, got 'fast'"):
        ops.resolve('fast')
    with pytest.raises(ValueError, match='one platform'):
        ops.resolve('auto', [Device('tpu'), Device('cpu')])


def test_kernel_forms_nest():
    """'auto' keeps an enclosing choice; an explicit setting wins inside it; the default outside."""
    with ops.kernel_forms('xla'):
        assert ops.active() == 'xla'
        with ops.kernel_forms('auto'):
            assert ops.active() == 'xla'
        with ops.kernel_forms('cpu'):
            assert ops.active() == 'cpu'
        assert ops.active() == 'xla'
    assert ops.active() == ops.resolve('auto')


def _primitives(model, variables, x) -> set[str]:
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            if eqn.primitive.name == 'conv_general_dilated' and max(eqn.params['lhs_dilation']) > 1:
                names.add('transposed conv')
            for kernel in ('upsample_norm', 'pixel_attention'):
                if eqn.primitive.name == 'pallas_call' and f'name={kernel}' in str(eqn):
                    names.add(f'pallas:{kernel}')
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return names


@pytest.mark.parametrize('name', ['rest_lite', 'restv2_tiny'])
def test_model_forms_follow_the_target(name):
    """A model with impl='auto' traced for a TPU mesh on this (CPU) host takes the TPU forms: grouped
    convolutions, no CPU fences or hand-written CPU gradients, the attention and pixel attention as
    Pallas kernels, and (v2) the upsample branch and its LayerNorm as Pallas kernels; 'xla' the portable forms, 'cpu' the CPU forms. The
    former name `conv_impl` still selects them."""
    model = rest_jax.create_model(name, embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=5)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    with _tpu_mesh():
        tpu_ops = _primitives(model, variables, x)
    cpu_ops = _primitives(model.clone(impl='cpu'), variables, x)
    portable_ops = _primitives(model.clone(impl='xla'), variables, x)
    assert _primitives(model.clone(conv_impl='shift'), variables, x) == cpu_ops
    assert _primitives(model.clone(impl='tpu'), variables, x) == tpu_ops
    assert 'reduce_precision' in cpu_ops and 'custom_vjp_call' in str(cpu_ops)
    for forms in (portable_ops, tpu_ops):
        assert 'reduce_precision' not in forms and 'conv_general_dilated' in forms
    assert 'transposed conv' not in tpu_ops   # v2's upsample branch and its norm: kernels, below
    assert 'pallas_call' in tpu_ops and 'pallas_call' not in portable_ops | cpu_ops   # the attention kernels
    assert ('pallas:upsample_norm' in tpu_ops) == name.startswith('restv2')
    assert 'pallas:pixel_attention' in tpu_ops   # the stem's and patch embeddings' PA (v2: with its norm)
    if not name.startswith('restv2'):   # no upsample branch in v1: its other TPU forms are the portable ones
        # the kernels, their reads and writes, their loops, and the choice of Mosaic or the interpreter
        assert tpu_ops - portable_ops == {'pallas_call', 'get', 'swap', 'cond', 'platform_index', 'scan',
                                          'pallas:pixel_attention'}
    assert rest_jax.create_model(name, conv_impl='lax').conv_impl == 'xla'
    with pytest.raises(ValueError, match='kernel forms'):
        rest_jax.create_model(name, impl='gpu')
