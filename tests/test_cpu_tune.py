"""Kernel forms measured on this host (rest_jax.ops.cpu_tune): the fastest candidate, cached per host
and shape, read back without measuring, and exact whichever wins."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax.ops import cpu, cpu_tune, portable


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """Measuring on, into an empty cache under tmp_path, with no decisions remembered in this process."""
    monkeypatch.setenv(cpu_tune.TUNE_ENV, 'on')
    monkeypatch.setenv(cpu_tune.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpu_tune, '_CHOSEN', {})
    return tmp_path / cpu_tune.FILE_NAME


def _candidate(seconds, built):
    def build():
        built.append(seconds)
        return lambda: __import__('time').sleep(seconds)
    return build


def test_choose_measures_once_then_reads_the_cache(tuning, monkeypatch):
    built = []
    candidates = {'slow': _candidate(0.004, built), 'fast': _candidate(0.0, built)}
    assert cpu_tune.choose('op A', candidates, fallback='slow') == 'fast'
    assert sorted(built) == [0.0, 0.004]
    entry = json.loads(tuning.read_text())[cpu_tune.host_key()]['op A']
    assert entry['choice'] == 'fast' and entry['ms']['slow'] > entry['ms']['fast']
    assert cpu_tune.decisions()['op A']['source'] == 'measured'

    # A new process: nothing remembered, the file answers, nothing is built.
    monkeypatch.setattr(cpu_tune, '_CHOSEN', {})
    never = {'slow': lambda: pytest.fail('measured again'), 'fast': lambda: pytest.fail('measured again')}
    assert cpu_tune.choose('op A', never, fallback='slow') == 'fast'
    assert cpu_tune.decisions()['op A']['source'] == 'cache'
    # Another op, and another host's entries, are measured and kept beside it.
    data = json.loads(tuning.read_text())
    data['AuthenticAMD 25/17 avx512, 2 CPUs, jax 0'] = {'op A': {'choice': 'slow', 'ms': {}}}
    tuning.write_text(json.dumps(data))
    assert cpu_tune.choose('op B', {'x': _candidate(0.0, built)}, fallback='x') == 'x'
    data = json.loads(tuning.read_text())
    assert set(data[cpu_tune.host_key()]) == {'op A', 'op B'} and 'AuthenticAMD 25/17 avx512, 2 CPUs, jax 0' in data


def test_choose_off_uses_the_rule_and_a_bad_file_is_rewritten(tuning, monkeypatch, capsys):
    monkeypatch.setenv(cpu_tune.TUNE_ENV, 'off')
    assert cpu_tune.choose('op', {'a': lambda: pytest.fail('measured')}, fallback='a') == 'a'
    assert not tuning.exists()
    monkeypatch.setenv(cpu_tune.TUNE_ENV, 'sometimes')
    with pytest.raises(ValueError, match='REST_JAX_CPU_TUNE must be on or off'):
        cpu_tune.choose('op', {}, fallback='a')

    monkeypatch.setenv(cpu_tune.TUNE_ENV, 'on')
    tuning.write_text('{not json')
    assert cpu_tune.choose('op', {'a': _candidate(0.0, [])}, fallback='a') == 'a'
    assert 'ignoring unreadable kernel-form cache' in capsys.readouterr().err
    assert json.loads(tuning.read_text())[cpu_tune.host_key()]['op']['choice'] == 'a'


@pytest.mark.parametrize('stride', [2, 1])
def test_a_conv_traced_on_this_host_is_measured(tuning, stride):
    """A dense conv (strided, or 3x3 at stride 1) is timed in both forms: forward when it is only
    evaluated, each of its two gradients apart only when differentiated; its value and gradients equal
    the portable form's whichever won."""
    x = jax.random.normal(jax.random.key(1), (2, 32, 30, 6))
    w = jax.random.normal(jax.random.key(2), (3, 3, 6, 8)) * 0.2
    np.testing.assert_allclose(jax.jit(cpu.conv, static_argnums=(2, 3))(x, w, stride, 1),
                               portable.conv(x, w, stride, 1), rtol=1e-5, atol=1e-5)
    key = f'conv 2x32x30x6 -> 8, kernel 3x3, stride {stride}, pad 1, float32'
    assert list(cpu_tune.decisions()) == [key + ', forward']

    def loss(f, x, w):
        return jnp.sum(jnp.tanh(f(x, w, stride, 1)) * jnp.arange(8.0))
    grads = [jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(f, x, w) for f in (cpu.conv, portable.conv)]
    for a, b in zip(grads[0], grads[1]):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    chosen = cpu_tune.decisions()
    assert set(chosen) == {key + ', forward', key + ', input gradient', key + ', kernel gradient'}
    assert all(v['choice'] in ('xla', 'patches') and set(v['ms']) == {'xla', 'patches'} for v in chosen.values())
    assert set(json.loads(tuning.read_text())[cpu_tune.host_key()]) == set(chosen)


def test_the_upsample_branch_is_measured_for_inference_only(tuning):
    """v2's upsample branch: evaluated, its conv is timed in every inference form together with the
    LayerNorm and sum after it (one key per shape); differentiated, it takes its training form and
    times nothing. Both equal the portable branch."""
    keys = jax.random.split(jax.random.key(0), 3)
    x, kernel, bias = (jax.random.normal(keys[0], (2, 7, 7, 8)), jax.random.normal(keys[1], (3, 3, 1, 32)) * 0.3,
                       jax.random.normal(keys[2], (32,)))
    norm, add = (jnp.ones(8), jnp.zeros(8), 1e-6), jnp.ones((2, 14, 13, 8))

    def loss(f, x, kernel, bias):
        return jnp.sum(jnp.tanh(f(x, kernel, bias, 2, norm, add)) * jnp.arange(8.0))
    grads = [jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(f, x, kernel, bias)
             for f in (cpu.upsample, portable.upsample)]
    for a, b in zip(grads[0], grads[1]):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert cpu_tune.decisions() == {}
    np.testing.assert_allclose(jax.jit(lambda x, kernel, bias: cpu.upsample(x, kernel, bias, 2, norm, add))(x, kernel, bias),
                               portable.upsample(x, kernel, bias, 2, norm, add), rtol=1e-5, atol=1e-5)
    key = 'upsample 2x7x7x8, ratio 2, float32, LayerNorm, added to 14x13, forward'
    chosen = cpu_tune.decisions()
    assert list(chosen) == [key] and set(chosen[key]['ms']) == set(cpu._UPSAMPLE_FORMS)
    assert json.loads(tuning.read_text())[cpu_tune.host_key()][key]['choice'] == chosen[key]['choice']


def test_initialising_a_model_times_nothing(tuning):
    """model.init only needs shapes: its trace takes the rule and measures no form."""
    import rest_jax
    model = rest_jax.create_model('restv2_tiny', embed_dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_classes=5)
    jax.jit(model.init).lower(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))   # the trace is where forms are chosen
    assert cpu_tune.decisions() == {} and not tuning.exists()
