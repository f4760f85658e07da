"""The converter: official .pth -> Orbax directory (CLI and Python API), recognition, and bad input."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import rest_jax
from conftest import REDUCED, REPO, golden_path, relative_error, run_main
from rest_jax.convert import convert_checkpoint, load_pth, recognize_variant
from rest_jax.convert.__main__ import main as convert_main
from test_pth import _Payload, _op_str, _write_malicious, tensor_op, write_zip_checkpoint

# What each golden file needs on the command line. The reduced layouts are no registered variant, so
# --arch is required (a custom layout must be deliberate); v1's layout is fully visible in its shapes,
# v2's head counts are not.
CLI_FLAGS = {
    'v1_reduced': ['--arch', 'num_heads=1,2,4,8'],
    'v2_reduced': ['--arch', 'num_heads=1,2,4,8'],
    'v2_reduced_wide_heads': ['--arch', 'num_heads=2,4,8,16'],
}


def run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'rest_jax.convert', *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(model.apply)


def logits_of(dst, images):
    model, variables = rest_jax.load_pretrained(dst)
    with jax.default_matmul_precision('float32'):
        return np.asarray(_jitted_apply(model)(variables, images))


def golden_arrays(stem):
    return np.load(golden_path(f'{stem}.npz'))


# --- the golden checkpoints through the CLI ------------------------------------------------------

@pytest.mark.parametrize('ema', [False, True], ids=['model', 'model_ema'])
@pytest.mark.parametrize('stem', list(REDUCED))
def test_cli_converts_golden_checkpoint(tmp_path, stem, ema):
    src, dst = golden_path(f'{stem}.pth'), tmp_path / 'out'
    result = run_cli(src, dst, *CLI_FLAGS[stem], *(['--ema'] if ema else []))
    assert result.returncode == 0, result.stderr
    meta = json.loads((dst / 'rest_jax.json').read_text())
    name, arch = REDUCED[stem]
    assert meta['model'] == name and meta['format'] == 'rest_jax.converted/1'
    assert meta['source']['entry'] == ('model_ema' if ema else 'model') and meta['source']['path'] == src.name
    assert meta['preprocessing']['num_classes'] == 10
    model, _ = rest_jax.load_pretrained(dst)
    for key, value in arch.items():
        got = getattr(model, key)
        assert (tuple(got) == tuple(value)) if isinstance(value, list) else got == value, key
    golden = golden_arrays(stem)
    got = logits_of(dst, golden['input_224'])
    assert relative_error(got, golden['logits_ema_224' if ema else 'logits_224']) < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name != 'out']  # no temporary directory left behind


def test_load_pretrained_refuses_other_directories(tmp_path):
    with pytest.raises(ValueError, match='is not a rest_jax checkpoint'):
        rest_jax.load_pretrained(tmp_path)


# --- recognition from shapes ---------------------------------------------------------------------

def manifest_state_dict(name, num_classes=1000):
    """Arrays of the official shapes (one broadcast value each: recognition reads only shapes)."""
    manifest = json.loads(golden_path('manifest.json').read_text())
    rng = np.random.default_rng(0)
    out = {}
    for key, shape, dtype in manifest[name]['state_dict']:
        if key.startswith('head.'):
            shape = [num_classes] + shape[1:]
        out[key] = np.broadcast_to(rng.normal(scale=0.02, size=()).astype(dtype), shape)
    return out


@pytest.mark.parametrize('name', rest_jax.list_models())
def test_recognize_registered_variants(name):
    assert recognize_variant(manifest_state_dict(name)) == (name, {})


def test_recognize_other_head_size():
    assert recognize_variant(manifest_state_dict('rest_base', num_classes=10)) == ('rest_base', {'num_classes': 10})


def test_recognize_unregistered_layout_says_what_it_saw():
    state_dict = load_pth(golden_path('v2_reduced.pth'))['model']
    with pytest.raises(ValueError, match=r'matches no registered variant \(v2, embed_dims=\[16, 32, 64, 128\]'):
        recognize_variant(state_dict)


# --- checkpoint forms, written without torch -----------------------------------------------------

_STORAGE_CLASSES = {'float32': 'FloatStorage', 'float16': 'HalfStorage', 'int64': 'LongStorage'}


def _tensor_entries(arrays):
    """({key: opcodes pushing the tensor}, {storage key: little-endian bytes}), one storage per tensor."""
    entries, storages = {}, {}
    for index, (key, array) in enumerate(arrays.items()):
        array = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder('<'))
        stride = tuple(s // array.itemsize for s in array.strides)
        entries[key] = tensor_op(_STORAGE_CLASSES[array.dtype.name], str(index), array.size, 0, array.shape, stride)
        storages[str(index)] = array.tobytes()
    return entries, storages


def write_state_dict(path, arrays, entry=None):
    """A torch-format zip of the state_dict `arrays`: bare, or as {entry: arrays}."""
    entries, storages = _tensor_entries(arrays)
    if entry is not None:
        entries = {entry: b'}(' + b''.join(_op_str(k) + v for k, v in entries.items()) + b'u'}  # EMPTY_DICT MARK .. SETITEMS
    return write_zip_checkpoint(path, entries, storages)


@pytest.fixture(scope='module')
def v1_state_dict():
    return load_pth(golden_path('v1_reduced.pth'))['model']


@pytest.mark.parametrize('form', ['bare', 'state_dict_entry', 'module_prefix', 'float16'])
def test_checkpoint_forms(tmp_path, v1_state_dict, form):
    arrays = dict(v1_state_dict)
    if form == 'module_prefix':
        arrays = {f'module.{k}': v for k, v in arrays.items()}
    if form == 'float16':
        arrays = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in arrays.items()}
    src = write_state_dict(tmp_path / 'ckpt.pth', arrays, entry='state_dict' if form == 'state_dict_entry' else None)
    meta = convert_checkpoint(src, tmp_path / 'out', arch={'num_heads': (1, 2, 4, 8)})
    assert meta['source']['entry'] == ('state_dict' if form == 'state_dict_entry' else 'bare')
    golden = golden_arrays('v1_reduced')
    error = relative_error(logits_of(tmp_path / 'out', golden['input_224']), golden['logits_224'])
    # float16 storage rounds these random (not trained) weights enough to move logits by ~1e-2;
    # that the converter itself adds nothing is checked exactly below.
    assert error < (2e-2 if form == 'float16' else 1e-4)
    if form == 'float16':
        model, variables = rest_jax.load_pretrained(tmp_path / 'out')
        widened = {k: v.astype(np.float32) for k, v in arrays.items()}
        expected = rest_jax.variables_from_state_dict(model, widened)
        for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --- bad input through the CLI -------------------------------------------------------------------

def assert_cli_error(result, *fragments):
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    assert 'Traceback' not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_bad_sources(tmp_path, v1_state_dict, capsys):
    dst = tmp_path / 'out'
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    golden = golden_path('v1_reduced.pth').read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(golden[:len(golden) // 2])
    missing_keys = write_state_dict(tmp_path / 'partial.pth', {k: v for k, v in v1_state_dict.items()
                                                               if not k.startswith(('stage3.1.mlp.', 'norm.'))})
    no_stage4 = write_state_dict(tmp_path / 'no_stage4.pth',
                                 {k: v for k, v in v1_state_dict.items() if not k.startswith('stage4.')})
    cases = [
        ((tmp_path / 'absent.pth', dst), ('absent.pth',)),
        ((text, dst), ('not a PyTorch checkpoint',)),
        ((truncated, dst), ()),
        ((golden_path('v1_reduced.pth'), dst, '--model', 'restv2_tiny'), ('missing', 'unexpected')),
        ((golden_path('v1_reduced.pth'), dst, '--model', 'rest_large'),
         ('mis-shaped: stem.conv1.weight: checkpoint (8, 3, 3, 3) vs model (48, 3, 3, 3)',)),
        ((golden_path('v1_reduced.pth'), dst, '--model', 'rest_large', '--arch', 'depths=2,2,18,2'),
         ('missing', 'stage1.1.attn')),
        ((golden_path('v1_reduced.pth'), dst, '--arch', 'num_heads=1,2,4,8', 'num_classes=1000'),
         ('mis-shaped', 'head.weight: checkpoint (10, 128) vs model (1000, 128)')),
        ((missing_keys, dst, '--arch', 'num_heads=1,2,4,8'), ('6 missing: norm.bias, norm.weight, stage3.1.mlp.fc1.bias',)),
        ((no_stage4, dst, '--arch', 'num_heads=1,2,4,8'), ('no blocks in stage4',)),
        ((missing_keys, dst, '--ema'), ("no 'model_ema' entry (a bare state_dict); drop --ema",)),
        ((golden_path('v2_reduced.pth'), dst), ('matches no registered variant (v2', '--arch num_heads=a,b,c,d')),
        # v1's heads show in its transform convs: the message gives the flag to pass as is.
        ((golden_path('v1_reduced.pth'), dst), ('matches no registered variant (v1', 'pass --arch num_heads=1,2,4,8')),
        ((golden_path('v2_reduced.pth'), dst, '--arch', 'depths=1,1,2,1'), ('num_heads',)),
    ]
    for i, (args, fragments) in enumerate(cases):
        # The first as a real process (exit status, nothing else on stderr), the rest in this one.
        assert_cli_error(run_cli(*args) if i == 0 else run_main(convert_main, capsys, *args), *fragments)
        assert not dst.exists(), args
        assert sorted(p.name for p in tmp_path.iterdir()) == ['no_stage4.pth', 'notes.txt', 'partial.pth', 'truncated.pth'], args


@pytest.mark.parametrize('layout', ['zip', 'bare_pickle'])
def test_cli_refuses_code_in_pickle(tmp_path, layout):
    marker = tmp_path / 'pwned'
    src = _write_malicious(tmp_path / 'evil.pth', _Payload(os.system, f'touch {marker}'), layout)
    result = run_cli(src, tmp_path / 'out')
    assert_cli_error(result, "refused to load global '" + os.system.__module__ + ".system'")
    assert not marker.exists() and not (tmp_path / 'out').exists()


def test_cli_existing_destination(tmp_path):
    src, dst = golden_path('v1_reduced.pth'), tmp_path / 'out'
    dst.mkdir()
    (dst / 'keep.txt').write_text('mine')
    assert_cli_error(run_cli(src, dst, '--arch', 'num_heads=1,2,4,8'), 'exists; pass --force to overwrite')
    assert [p.name for p in dst.iterdir()] == ['keep.txt'] and (dst / 'keep.txt').read_text() == 'mine'
    result = run_cli(src, dst, '--force', '--arch', 'num_heads=1,2,4,8')
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dst.iterdir()) == ['rest_jax.json', 'variables']
    assert [p.name for p in tmp_path.iterdir()] == ['out']
