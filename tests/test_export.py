"""Serving artifacts (rest_jax.export): the exported program equals the model, runs with jax alone (no
flax), lowers for GPUs and TPUs without one, and bad input gets one line."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rest_jax
from conftest import REPO, convert_golden, golden_path, relative_error
from rest_jax import export, pretrained

STEM = 'v2_reduced'


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    return convert_golden(tmp_path_factory.mktemp('export') / STEM, STEM)


@pytest.fixture(scope='module')
def artifact(converted):
    """One artifact for any batch size and three platforms, written by the command line."""
    out = converted.parent / 'model.jaxexport'
    assert export.main(['--checkpoint', str(converted), '--out', str(out), '--platforms', 'cpu,cuda,tpu',
                        '--image-size', '224']) == 0
    return out


def test_artifact_and_metadata(artifact, converted):
    meta = json.loads((artifact.parent / (artifact.name + '.json')).read_text())
    assert meta['format'] == export.FORMAT and meta['platforms'] == ['cpu', 'cuda', 'tpu']
    assert meta['input']['shape'] == [None, 224, 224, 3] and meta['output']['shape'] == [None, 10]
    assert meta['kernel_forms'] == 'xla'   # several platforms: the portable forms
    platforms = [('cpu',), ('tpu',), ('cuda',), ('cpu', 'tpu')]
    assert [export.kernel_forms(p) for p in platforms] == ['cpu', 'tpu', 'xla', 'xla']
    assert meta['preprocessing'] == pretrained.read_metadata(converted)['preprocessing']
    exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
    assert exported.platforms == ('cpu', 'cuda', 'tpu')   # lowered for each, with no GPU or TPU here
    assert str(exported.in_avals[0].shape[0]) == 'batch'


def test_exported_equals_the_model_at_two_batch_sizes_without_flax(artifact, converted, tmp_path):
    """One artifact, batch 2 and 1, in a process where flax cannot be imported."""
    gold = np.load(golden_path(f'{STEM}.npz'))
    x = gold['input_224']
    np.save(tmp_path / 'x.npy', x)
    code = (f"import sys; sys.modules['flax'] = None; sys.modules['orbax'] = None\n"
            f"import numpy as np, rest_jax\n"
            f"serve = rest_jax.load_exported({str(artifact)!r})\n"
            f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
            f"np.savez({str(tmp_path / 'out.npz')!r}, two=serve(x), one=serve(x[:1]))\n"
            f"assert not any(m.startswith(('flax', 'orbax', 'PIL')) for m in sys.modules if sys.modules[m])\n"
            f"print(serve.preprocessing['input_size'])")
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['224']
    out = np.load(tmp_path / 'out.npz')
    model, variables = rest_jax.load_pretrained(converted)
    with jax.default_matmul_precision('float32'):
        expected = np.asarray(jax.jit(model.apply)(variables, x))
    assert out['two'].shape == (2, 10) and out['one'].shape == (1, 10)
    np.testing.assert_allclose(out['two'], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(out['one'], expected[:1], rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert relative_error(out['two'], gold['logits_224']) < 1e-4   # and the official model's logits


def test_cpu_artifact_uses_the_cpu_forms(converted):
    """A CPU-only artifact with a fixed batch: the CPU kernel forms, the same logits as the model."""
    model, variables = rest_jax.load_pretrained(converted)
    gold = np.load(golden_path(f'{STEM}.npz'))
    exported = export.export_model(model, variables, input_size=(192, 256), batch_size=2, platforms='cpu')
    assert exported.platforms == ('cpu',) and exported.in_avals[0].shape == (2, 192, 256, 3)
    serve = export.ExportedModel(exported, {'preprocessing': {}})
    with jax.default_matmul_precision('float32'):
        got = np.asarray(serve(gold['input_rect']))
        expected = np.asarray(jax.jit(model.apply)(variables, gold['input_rect']))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match=r'expected a 2x192x256x3 batch'):
        serve(gold['input_rect'][:1])
    with pytest.raises(ValueError, match='got integers'):
        serve(np.zeros((2, 192, 256, 3), np.uint8))


def test_cpu_artifact_for_any_batch_size_with_forms_measured_on_the_host(converted, tmp_path, monkeypatch):
    """With the CPU forms timed on the host (the default outside the tests), a CPU artifact for any batch
    size still exports: shapes with a symbolic batch cannot be timed, so those ops take the fixed rule."""
    from rest_jax.ops import cpu_tune
    monkeypatch.setenv(cpu_tune.TUNE_ENV, 'on')
    monkeypatch.setenv(cpu_tune.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpu_tune, '_CHOSEN', {})
    model, variables = rest_jax.load_pretrained(converted)
    with cpu_tune.recording() as chosen:
        exported = export.export_model(model, variables, input_size=64, batch_size=None, platforms='cpu')
    assert chosen and {entry['source'] for entry in chosen.values()} == {'rule'}
    assert not (tmp_path / cpu_tune.FILE_NAME).exists()
    images = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))
    np.testing.assert_allclose(exported.call(images), jax.jit(model.apply)(variables, images), rtol=1e-5, atol=1e-5)


def test_lowering_for_tpu_in_bfloat16_and_pre_logits(converted):
    model, variables = rest_jax.load_pretrained(converted)
    exported = export.export_model(model, variables, platforms=('tpu',), dtype='bfloat16', pre_logits=True,
                                   input_size=64)
    assert exported.platforms == ('tpu',)
    assert exported.out_avals[0].shape[1:] == (model.embed_dims[-1],) and exported.out_avals[0].dtype == jnp.float32
    assert 'bf16' in exported.mlir_module()
    # The TPU forms' attention kernels are Mosaic's in a TPU artifact, though lowered on this CPU host.
    assert exported.mlir_module().count('tpu_custom_call') == sum(model.depths)   # one per block
    serve = export.ExportedModel(exported, {})
    with pytest.raises(ValueError, match='runs on tpu, not on cpu'):
        serve(np.zeros((1, 64, 64, 3), np.float32))


def _one_error_line(capsys, argv) -> str:
    assert export.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == '' and len(captured.err.splitlines()) == 1 and captured.err.startswith('error: ')
    return captured.err


def test_bad_input_gets_one_line(tmp_path, capsys, artifact, converted):
    out = str(tmp_path / 'a.jaxexport')
    (tmp_path / 'plain').mkdir()
    assert 'not a rest_jax checkpoint' in _one_error_line(capsys, ['--checkpoint', str(tmp_path / 'plain'), '--out', out])
    # A training workdir whose first checkpoint is not written yet.
    pretrained.write_workdir_metadata(tmp_path / 'run', 'restv2_tiny', {}, {}, '{}\n')
    assert 'no complete checkpoint yet' in _one_error_line(capsys, ['--checkpoint', str(tmp_path / 'run'), '--out', out])
    err = _one_error_line(capsys, ['--checkpoint', str(converted), '--out', out, '--platforms', 'cpu,gpu'])
    assert "unknown platform 'gpu' (GPUs are cuda or rocm)" in err
    assert 'exists; pass --force' in _one_error_line(capsys, ['--checkpoint', str(converted), '--out', str(artifact)])
    assert not (tmp_path / 'a.jaxexport').exists() and not (tmp_path / 'a.jaxexport.json').exists()
    with pytest.raises(SystemExit):
        export.main(['--checkpoint', str(converted), '--out', out, '--batch-size', '0'])
    assert "positive integer or 'dynamic'" in capsys.readouterr().err
    with pytest.raises(ValueError, match='no such file'):
        rest_jax.load_exported(tmp_path / 'missing.jaxexport')
    (tmp_path / 'x.jaxexport').write_bytes(b'not flatbuffers')
    (tmp_path / 'x.jaxexport.json').write_text(json.dumps({'format': export.FORMAT}))
    with pytest.raises(ValueError, match='not a serialized jax.export artifact'):
        rest_jax.load_exported(tmp_path / 'x.jaxexport')


def test_without_flatbuffers_one_line_and_nothing_written(tmp_path, capsys, artifact, converted, monkeypatch):
    """jax.export needs flatbuffers to write or read an artifact and does not declare it."""
    monkeypatch.setitem(sys.modules, 'flatbuffers', None)   # as if not installed
    monkeypatch.delitem(sys.modules, 'jax._src.export.serialization', raising=False)
    out = tmp_path / 'a.jaxexport'
    err = _one_error_line(capsys, ['--checkpoint', str(converted), '--out', str(out), '--batch-size', '1',
                                   '--image-size', '64'])
    assert 'Writing a jax.export artifact needs the flatbuffers package' in err and 'pip install flatbuffers' in err
    assert list(tmp_path.iterdir()) == []   # not even the metadata
    with pytest.raises(ImportError, match='Reading a jax.export artifact needs the flatbuffers package'):
        rest_jax.load_exported(artifact)


def test_command_line_entry_point(artifact):
    """`python -m rest_jax export` and `python -m rest_jax.export` are the same tool."""
    for module in (['rest_jax', 'export'], ['rest_jax.export']):
        result = subprocess.run([sys.executable, '-m', *module, '--help'], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and '--platforms' in result.stdout, result.stderr


def test_tpu_artifact_for_any_batch(converted):
    """A TPU-only artifact with a symbolic batch lowers on this CPU host with the TPU forms (the rules
    that pick a kernel form by the batch accept a batch of unknown size)."""
    model, variables = rest_jax.load_pretrained(converted)
    exported = export.export_model(model, variables, input_size=64, batch_size=None, platforms='tpu')
    assert exported.platforms == ('tpu',) and str(exported.in_avals[0].shape[0]) == 'batch'
    assert 'tpu_custom_call' in exported.mlir_module()   # the attention kernels, lowered for Mosaic
