"""The benchmark tool on tiny models, and the analytic MAC counter against an independent count."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import jax
import jax.extend
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import rest_jax
from conftest import REPO
from rest_jax import benchmark
from rest_jax.models.macs import count_macs

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_classes=10)
FIELDS = ('images_per_sec', 'compile_seconds', 'macs_per_image', 'num_params', 'step_ms', 'peak_memory_bytes')


def _positive(result):
    return {k: result.get(k) for k in FIELDS if not (isinstance(result.get(k), (int, float)) and result[k] > 0)}


def test_cli_json_without_tensorflow_and_torch():
    """`--json` prints one object with the documented fields, and neither tensorflow nor torch is needed."""
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['torch'] = None\n"
            "from rest_jax.benchmark import main\n"
            f"main(['--model', 'restv2_tiny', '--arch', {json.dumps(json.dumps(TINY))}, '--batch-size', '2',"
            " '--image-size', '64', '--repeats', '2', '--conv-impl', 'lax', '--json'])")
    out = subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, capture_output=True, text=True).stdout
    result = json.loads(out)
    assert not _positive(result), result
    assert result['macs_per_image'] == count_macs(rest_jax.create_model('restv2_tiny', **TINY), 64)['total']
    assert (result['model'], result['mode'], result['batch_size'], result['image_size']) == ('restv2_tiny', 'infer', 2, 64)
    assert result['mfu'] is None and 'MFU omitted' in result['mfu_note']   # CPU: no peak to compare with
    assert result['host_huge_pages'].startswith(('on (', 'off ('))
    if sys.platform.startswith('linux'):
        assert result['page_faults_per_step'] >= 0 and result['kernel_seconds_per_step'] >= 0


@pytest.fixture(scope='module')
def train_result():
    # XLA's grouped convs: their backward pass compiles faster than the shifted form's.
    return benchmark.benchmark('rest_lite', mode='train', batch_size=2, image_size=32, repeats=2,
                               drop_path_rate=0.1, conv_impl='lax', **dict(TINY, embed_dims=(8, 16, 32, 64)))


def test_train_step(train_result):
    """A whole AdamW step with donated state, run four times (two warm-up, two timed) from one compile."""
    assert not _positive(train_result), train_result
    assert (train_result['mode'], train_result['conv_impl'], train_result['repeats']) == ('train', 'lax', 2)


def test_markdown_table(train_result):
    table = benchmark.markdown_table([train_result])
    header, rule, row = table.splitlines()
    assert header.startswith('| variant | params | GMACs |') and row.startswith('| rest_lite |')
    assert len(header.split('|')) == len(rule.split('|')) == len(row.split('|'))


def test_bad_input_says_what_to_do(capsys):
    with pytest.raises(ValueError, match="mode must be 'infer' or 'train'"):
        benchmark.build('rest_lite', mode='eval')
    for argv, message in [(['--arch', '{"embed_dim": [1, 2, 3, 4]}'], 'unknown argument'),
                          (['--arch', '[1, 2]'], 'expected a JSON object'),
                          (['--arch', '{"conv_impl": "lax"}'], '--conv-impl'),
                          (['--repeats', '0'], 'at least 1')]:
        with pytest.raises(SystemExit):
            benchmark.main(['--image-size', '32'] + argv)
        assert message in capsys.readouterr().err


def test_time_calls_protocol():
    """Warm-ups first; then rounds in which each function's timed call follows an untimed call of its
    own (with a single function, every call after the warm-ups is timed); page faults per timed call."""
    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ('a', 'b')}
    costs = {}
    times = benchmark.time_calls(calls, repeats=3, warmup=2, host_costs=costs)
    assert log == ['a', 'a', 'b', 'b'] + ['a', 'a', 'b', 'b'] * 3
    assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}
    if sys.platform.startswith('linux'):
        assert set(costs) == {'a', 'b'} and all(faults >= 0 and kernel >= 0 for faults, kernel in costs.values())
    log.clear()
    assert len(benchmark.time_calls({'a': calls['a']}, repeats=3)['a']) == 3 and log == ['a'] * 5


def test_peak_flops_by_device_kind():
    def device(kind, platform='gpu'):
        return types.SimpleNamespace(device_kind=kind, platform=platform)
    assert benchmark.peak_flops(device('NVIDIA H100 80GB HBM3'), 'bfloat16') == 989e12
    assert benchmark.peak_flops(device('NVIDIA H100 PCIe'), 'bfloat16') == 756e12
    assert benchmark.peak_flops(device('NVIDIA A100-SXM4-40GB'), 'float32') == 156e12
    assert benchmark.peak_flops(device('TPU v5 lite', 'tpu'), 'bfloat16') == 197e12
    assert benchmark.peak_flops(device('TPU v4', 'tpu'), 'bfloat16') == 275e12
    assert benchmark.peak_flops(device('Quadro K600'), 'bfloat16') is None
    assert benchmark.peak_flops(device('cpu', 'cpu'), 'float32') is None


# --- the analytic MACs ---------------------------------------------------------------------------

def _traced_macs(model, size: int) -> int:
    """MACs of every dot_general and convolution in the model's jaxpr (nested ones included): a count that
    knows nothing of the architecture. With conv_impl='lax' every depthwise conv is one grouped convolution."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    jaxpr = jax.make_jaxpr(model.apply)(shapes, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).jaxpr

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            out = math.prod(eqn.outvars[0].aval.shape)
            if eqn.primitive.name == 'dot_general':
                (contracting, _), _ = eqn.params['dimension_numbers']
                total += out * math.prod(eqn.invars[0].aval.shape[d] for d in contracting)
            elif eqn.primitive.name == 'conv_general_dilated':
                kh, kw, cin_per_group, _ = eqn.invars[1].aval.shape   # HWIO, I = input channels per group
                total += out * kh * kw * cin_per_group
            total += sum(walk(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        return total
    return walk(jaxpr)


@pytest.mark.parametrize('name', rest_jax.list_models())
def test_macs_equal_the_traced_count(name):
    model = rest_jax.create_model(name, conv_impl='lax')
    assert count_macs(model, 224)['total'] == _traced_macs(model, 224)


def test_macs_beside_the_official_table():
    """v2 within 1% of the published GFLOPs. v1 is 6-10% above its table, which leaves out the attention
    matmuls (module-hook counters cannot see `q @ k`): without them the gap is 3-5%."""
    for name in rest_jax.list_models():
        macs = count_macs(rest_jax.create_model(name), 224)
        official = rest_jax.model_info(name).gflops * 1e9
        if name.startswith('restv2'):
            assert abs(macs['total'] / official - 1) < 0.01, (name, macs)
        else:
            assert 1.05 < macs['total'] / official < 1.11, (name, macs)
            assert 1.02 < (macs['total'] - macs['attention']) / official < 1.06, (name, macs)


def test_depthwise_macs_by_hand():
    """restv2_tiny at 224, depthwise convs written out: pixel attention, sr reductions, up branches."""
    dims, tokens = (96, 192, 384, 768), (56, 28, 14, 7)
    pa = sum(t * t * c * 9 for t, c in zip(tokens, dims))
    sr = 1 * 7 * 7 * 96 * 9 * 9 + 2 * 7 * 7 * 192 * 5 * 5 + 6 * 7 * 7 * 384 * 3 * 3   # every stage reduces to 7x7
    up = 1 * 49 * 96 * 64 * 9 + 2 * 49 * 192 * 16 * 9 + 6 * 49 * 384 * 4 * 9 + 2 * 49 * 768 * 9
    assert count_macs(rest_jax.create_model('restv2_tiny'), 224)['depthwise'] == pa + sr + up
    with pytest.raises(ValueError, match='ResT or ResTV2'):
        count_macs(rest_jax.models.layers.PA(), 224)


# --- the CPU speed forms --------------------------------------------------------------------------

def test_cpu_forms_equal_xla_convolutions():
    """The 'shift' forms against XLA's grouped convolutions, values and gradients: EMSA's reduction
    (slices forward, block form under differentiation, a custom VJP) at strides 8, 4, 2, stride-1
    convs (a custom VJP), and v2's upsample branch (taps written into the pixel-shuffled layout,
    computed by phase under differentiation, a custom VJP)."""
    layers = rest_jax.models.layers
    dw = layers.depthwise_conv
    for stride, size in [(8, (19, 23)), (4, (13, 17)), (2, (9, 8))]:
        x = jax.random.normal(jax.random.key(0), (2, *size, 6))
        w = jax.random.normal(jax.random.key(1), (stride + 1, stride + 1, 1, 6))
        target = jax.random.normal(jax.random.key(2), dw(x, w, stride, stride // 2, 'lax').shape)
        results = [jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(dw(x, w, stride, stride // 2, impl)) * target),
                                              argnums=(0, 1)))(x, w)
                   for impl in ('shift', 'lax')]
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for kernel, pad in [(3, 1), (5, 2), (3, 0)]:   # stride 1 (PA's gate): a custom VJP
        x = jax.random.normal(jax.random.key(0), (2, 9, 7, 6))
        w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 6))
        target = jax.random.normal(jax.random.key(2), dw(x, w, 1, pad, 'lax').shape)
        results = [jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(dw(x, w, 1, pad, impl)) * target),
                                              argnums=(0, 1)))(x, w)
                   for impl in ('shift', 'lax')]
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for r in (8, 4, 2, 1):
        x = jax.random.normal(jax.random.key(0), (2, 5, 6, 6))
        forms = [layers.DepthwiseUpsample(r, impl=impl) for impl in ('shift', 'lax')]
        v = forms[0].init(jax.random.key(1), x)
        v = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(3), a.shape), v)   # nonzero bias
        target = jax.random.normal(jax.random.key(2), (2, 5 * r, 6 * r, 6))
        results = [jax.jit(jax.value_and_grad(lambda v, x: jnp.sum(jnp.tanh(m.apply(v, x)) * target),
                                              argnums=(0, 1)))(v, x)
                   for m in forms]
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_exact_gelu_gradient():
    """GELU in PyTorch's erf form: the output against float64 and jax.nn.gelu (erfc form) to
    |x| * 6e-8; the hand-written backward Phi(x) + x * phi(x) against float64, tails included (to
    the ~6e-8 absolute accuracy of Phi from erf), and against autodiff of jax.nn.gelu."""
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 241), jax.random.normal(jax.random.key(0), (500,)) * 3])
    g = jax.random.normal(jax.random.key(1), x.shape)
    ours = jax.vjp(jax.jit(rest_jax.models.layers.exact_gelu), x)
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
    out_b = jax.jit(rest_jax.models.layers.exact_gelu)(xb)
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
    fence = jax.jit(rest_jax.models.layers.fusion_fence)
    bits = lambda a: np.asarray(a).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32)
    np.testing.assert_array_equal(bits(fence(x)), bits(x))
    np.testing.assert_array_equal(bits(jax.vjp(fence, x)[1](x)[0]), bits(x))
    if jax.default_backend() == 'cpu':
        assert 'reduce-precision' in fence.lower(x).compile().as_text()


@pytest.mark.parametrize('offset', [0.0, 50.0])
def test_cpu_layer_norm_equals_flax(offset):
    """The CPU LayerNorm (hand-written gradient) against Flax's two-pass nn.LayerNorm: the same
    parameters, the forward pass against float64 (an offset mean tests the two-pass variance), and
    the gradients of x, scale and bias."""
    layers = rest_jax.models.layers
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 48)) * 3 + offset
    ours, ref = layers.layer_norm(1e-6, jnp.float32, impl='shift'), layers.layer_norm(1e-6, jnp.float32, impl='lax')
    assert isinstance(ours, layers.LayerNorm) and isinstance(ref, nn.LayerNorm)
    params = {'params': {'scale': 1 + 0.1 * jax.random.normal(jax.random.key(1), (48,)),
                         'bias': 0.1 * jax.random.normal(jax.random.key(2), (48,))}}
    assert jax.tree.structure(ours.init(jax.random.key(3), x)) == jax.tree.structure(params)
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(-1, keepdims=True)
    exact = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    exact = exact * np.asarray(params['params']['scale']) + np.asarray(params['params']['bias'])
    np.testing.assert_allclose(jax.jit(ours.apply)(params, x), exact, rtol=0, atol=2e-5 * (1 + offset / 10))
    target = jax.random.normal(jax.random.key(4), x.shape)
    grads = [jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.tanh(m.apply(p, x)) * target), argnums=(0, 1)))(params, x)
             for m in (ours, ref)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + offset / 10))
    half = layers.layer_norm(1e-6, jnp.bfloat16, impl='shift').apply(params, x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16


@pytest.mark.parametrize('channels,kernel,stride,pad', [(3, 3, 2, 1), (6, 3, 2, 1), (6, 1, 1, 0), (6, 3, 1, 1), (5, 5, 4, 2)])
def test_cpu_dense_conv_forms_equal_xla_convolution(channels, kernel, stride, pad):
    """Dense convs on CPU: a 1x1 as a matmul; strided ones differentiated as patches times a matmul or
    through XLA's conv (both forms checked, whichever this host's ISA picks)."""
    layers = rest_jax.models.layers
    x = jax.random.normal(jax.random.key(0), (2, 13, 10, channels))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, channels, 7))
    target = jax.random.normal(jax.random.key(2), layers.dense_conv(x, w, stride, pad, 'lax').shape)
    forms = [lambda *a: layers.dense_conv(*a, 'shift'), lambda *a: layers.dense_conv(*a, 'lax')]
    if stride > 1:
        forms += [layers._strided_conv_patches_grad, layers._strided_conv_lax_grad]
    results = [jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w, stride, pad)) * target),
                                          argnums=(0, 1)))(x, w)
               for f in forms]
    for other in results[:1] + results[2:]:
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(results[1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_strided_conv_gradient_form_by_isa():
    """AVX2: always the patches form. AVX-512: XLA's conv for the RGB stem and for <= 32 channels at
    56x56 outputs and above (v1's stem), the patches form elsewhere."""
    pick = rest_jax.models.layers.strided_conv_gradient_form
    assert {pick(c, h, h, False) for c, h in [(3, 112), (32, 56), (96, 28), (384, 7)]} == {'patches'}
    assert [pick(c, h, w, True) for c, h, w in [(3, 112, 112), (4, 7, 7), (32, 56, 56), (32, 56, 60), (32, 28, 28),
                                                (48, 56, 56), (64, 56, 56), (384, 7, 7)]] == \
        ['lax', 'lax', 'lax', 'lax', 'patches', 'patches', 'patches', 'patches']


@pytest.mark.parametrize('name', ['rest_lite', 'restv2_tiny'])
def test_cpu_forms_give_the_same_model_gradients(name):
    """Every CPU form together (depthwise and dense convs, the gradient fences between blocks) in a
    two-blocks-per-stage model: the training gradients and BatchNorm updates equal XLA's plain ones."""
    model = rest_jax.create_model(name, embed_dims=[8, 16, 32, 64], depths=[2, 2, 2, 2], num_classes=5)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    x = jax.random.normal(jax.random.key(1), (2, 64, 72, 3))

    def loss(params, impl):
        m = model.clone(conv_impl=impl)
        out, updates = m.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
        return jnp.sum(jnp.tanh(out) * jnp.arange(5.0)), updates

    results = [jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(variables['params'], impl)
               for impl in ('shift', 'lax')]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
