"""Tests for rest_jax.convert.pth: the torch-free, allow-listing reader of PyTorch checkpoints.

Checkpoints beyond the golden files are written here by hand in torch's formats (pickle opcodes plus
raw storage bytes), so none of these tests needs torch; the last test, when torch is installed, checks
the reader against torch.load on the same files.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, golden_path
from rest_jax.convert.pth import CheckpointError, InertObject, UnsafeCheckpointError, load_pth

GOLDEN_FILES = {'v1_reduced': 128, 'v2_reduced': 128, 'v2_reduced_wide_heads': 256}  # stem -> head width


# --- writing torch-format checkpoints by hand --------------------------------------------------
# A protocol-2 pickle in which each tensor is
#   torch._utils._rebuild_tensor_v2(<persistent id>, offset, size, stride, False, OrderedDict())
# and the persistent id is ('storage', torch.XStorage, key, 'cpu', numel), exactly as torch.save writes.

def _op_str(text: str) -> bytes:
    raw = text.encode()
    return b'X' + struct.pack('<I', len(raw)) + raw  # BINUNICODE


def _op_int(value: int) -> bytes:
    return b'J' + struct.pack('<i', value)  # BININT


def _op_tuple(items) -> bytes:
    return b'(' + b''.join(items) + b't'  # MARK ... TUPLE


def _op_global(module: str, name: str) -> bytes:
    return b'c' + f'{module}\n{name}\n'.encode()  # GLOBAL


def tensor_op(storage_class, key, numel, offset, size, stride, parameter=False, legacy=False) -> bytes:
    """Pickle opcodes that push one tensor, the way torch.save pickles it."""
    pid_items = [_op_str('storage'), _op_global('torch', storage_class), _op_str(key), _op_str('cpu'),
                 _op_int(numel)] + ([b'N'] if legacy else [])
    pid = _op_tuple(pid_items) + b'Q'  # BINPERSID
    hooks = _op_global('collections', 'OrderedDict') + b')R'
    args = [pid, _op_int(offset), _op_tuple(map(_op_int, size)), _op_tuple(map(_op_int, stride)), b'\x89', hooks]
    tensor = _op_global('torch._utils', '_rebuild_tensor_v2') + _op_tuple(args) + b'R'  # REDUCE
    if parameter:
        tensor = _op_global('torch._utils', '_rebuild_parameter') + _op_tuple([tensor, b'\x88', hooks]) + b'R'
    return tensor


def dict_pickle(entries: dict[str, bytes]) -> bytes:
    """A protocol-2 pickle of {name: object pushed by the given opcodes}."""
    return b'\x80\x02}(' + b''.join(_op_str(k) + v for k, v in entries.items()) + b'u.'


def write_zip_checkpoint(path, entries, storages, prefix='archive', byteorder='little'):
    """Write torch's zip layout: <prefix>/data.pkl, <prefix>/data/<key>, byteorder, version."""
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr(f'{prefix}/data.pkl', dict_pickle(entries))
        if byteorder is not None:
            archive.writestr(f'{prefix}/byteorder', byteorder)
        for key, raw in storages.items():
            archive.writestr(f'{prefix}/data/{key}', raw)
        archive.writestr(f'{prefix}/version', '3\n')
    return path


def write_legacy_checkpoint(path, entries, storages, dtypes):
    """Write the pre-1.6 layout: magic, protocol, sys_info, the object, keys, counted storages."""
    sys_info = {'protocol_version': 1001, 'little_endian': True,
                'type_sizes': {'short': 2, 'int': 4, 'long': 4}}
    with open(path, 'wb') as file:
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
            file.write(pickle.dumps(header, protocol=2))
        file.write(dict_pickle(entries))
        file.write(pickle.dumps(sorted(storages), protocol=2))
        for key in sorted(storages):
            file.write(struct.pack('<q', len(storages[key]) // np.dtype(dtypes[key]).itemsize))
            file.write(storages[key])
    return path


def _view_checkpoint(legacy=False):
    """Tensors that share one float32 storage of 0..11 through offsets and strides."""
    storage = np.arange(12, dtype='<f4')
    floats = dict(storage_class='FloatStorage', key='0', numel=12, legacy=legacy)
    entries = {
        'whole': tensor_op(**floats, offset=0, size=(3, 4), stride=(4, 1)),
        'block': tensor_op(**floats, offset=5, size=(2, 2), stride=(4, 1)),  # rows 1-2, cols 1-2
        'transposed': tensor_op(**floats, offset=0, size=(4, 3), stride=(1, 4)),
        'every_third': tensor_op(**floats, offset=1, size=(4,), stride=(3,)),
        'scalar': tensor_op(**floats, offset=7, size=(), stride=()),
        'empty': tensor_op(**floats, offset=0, size=(0, 4), stride=(4, 1)),
        'param': tensor_op(**floats, offset=2, size=(2,), stride=(1,), parameter=True),
        'count': tensor_op('LongStorage', '1', 1, 0, (), (), legacy=legacy),
    }
    storages = {'0': storage.tobytes(), '1': np.array([299], '<i8').tobytes()}
    full = storage.reshape(3, 4)
    expected = {'whole': full, 'block': full[1:3, 1:3], 'transposed': full.T, 'every_third': storage[1::3],
                'scalar': np.float32(7.0), 'empty': np.zeros((0, 4), np.float32), 'param': storage[2:4],
                'count': np.int64(299)}
    return entries, storages, expected


def _check_views(loaded, expected):
    assert list(loaded) == list(expected)
    for name, want in expected.items():
        got = loaded[name]
        assert isinstance(got, np.ndarray) and got.flags.c_contiguous, name
        assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want), name
        np.testing.assert_array_equal(got, want)


# --- the golden checkpoints saved by torch -----------------------------------------------------

@pytest.mark.parametrize('stem', GOLDEN_FILES)
def test_golden_checkpoint_loads(stem):
    ckpt = load_pth(golden_path(f'{stem}.pth'))
    assert set(ckpt) == {'model', 'model_ema', 'optimizer', 'epoch', 'scaler', 'args'}
    model, ema = ckpt['model'], ckpt['model_ema']
    assert isinstance(model, OrderedDict) and list(model) == list(ema)
    assert model._metadata['']['version'] == 1  # the state_dict's BUILD state survives
    assert model['head.weight'].shape == (10, GOLDEN_FILES[stem]) and model['head.bias'].shape == (10,)
    first = next(iter(model.values()))  # the stem's first conv
    assert first.dtype == np.float32 and first.ndim == 4 and first.shape[1] == 3
    counts = [value for name, value in model.items() if name.endswith('num_batches_tracked')]
    assert counts and all(count.dtype == np.int64 and count.shape == () for count in counts)
    for name, value in model.items():
        assert isinstance(value, np.ndarray) and value.flags.c_contiguous and value.flags.writeable, name
        assert value.shape == ema[name].shape and value.dtype == ema[name].dtype, name
    assert not np.array_equal(model['head.weight'], ema['head.weight'])
    assert np.isfinite(model['head.weight']).all() and np.abs(model['head.weight']).sum() > 0


def test_golden_metadata_entries():
    ckpt = load_pth(golden_path('v1_reduced.pth'))
    count = ckpt['model']['stem.norm1.num_batches_tracked']
    assert count.dtype == np.int64 and count.shape == () and count.flags.c_contiguous
    args = ckpt['args']
    assert isinstance(args, InertObject) and type(args).pickled_global == 'argparse.Namespace'
    assert vars(args) == {'model': 'restv2_tiny', 'input_size': 224, 'drop_path': 0.1, 'lr': 0.00015}
    assert args.lr == 0.00015 and 'Namespace(' in repr(args)
    assert ckpt['epoch'] == 299
    assert ckpt['scaler']['scale'] == 65536.0
    optimizer = ckpt['optimizer']
    assert set(optimizer) == {'state', 'param_groups'}
    group = optimizer['param_groups'][0]
    assert group['lr'] == 0.001 and group['betas'] == (0.9, 0.999) and group['params'][:3] == [0, 1, 2]


def test_file_object_and_pathlike_sources():
    path = golden_path('v1_reduced.pth')
    from_stream = load_pth(io.BytesIO(path.read_bytes()))
    from_str = load_pth(str(path))
    np.testing.assert_array_equal(from_stream['model']['head.weight'], from_str['model']['head.weight'])


# --- formats and dtypes, from hand-written checkpoints -----------------------------------------

@pytest.mark.parametrize('prefix', ['archive', 'my_model'])
def test_views_offsets_and_strides(tmp_path, prefix):
    entries, storages, expected = _view_checkpoint()
    loaded = load_pth(write_zip_checkpoint(tmp_path / 'views.pth', entries, storages, prefix=prefix))
    _check_views(loaded, expected)
    loaded['block'][0, 0] = -1  # copies: writing one tensor leaves the others alone
    assert loaded['whole'][1, 1] == 5


def test_missing_byteorder_means_little_and_big_endian_is_swapped(tmp_path):
    entries, storages, expected = _view_checkpoint()
    _check_views(load_pth(write_zip_checkpoint(tmp_path / 'le.pth', entries, storages, byteorder=None)), expected)
    swapped = {'0': np.frombuffer(storages['0'], '<f4').astype('>f4').tobytes(),
               '1': np.frombuffer(storages['1'], '<i8').astype('>i8').tobytes()}
    big = load_pth(write_zip_checkpoint(tmp_path / 'be.pth', entries, swapped, byteorder='big'))
    _check_views(big, expected)
    assert big['whole'].dtype.isnative


def test_float16_checkpoint(tmp_path):
    values = np.array([[0.5, -1.25, 65504.0], [6.1e-5, 0.0, -0.0]], dtype=np.float16)
    path = write_zip_checkpoint(tmp_path / 'half.pth', {'w': tensor_op('HalfStorage', '0', 6, 0, (2, 3), (3, 1))},
                                {'0': values.astype('<f2').tobytes()})
    got = load_pth(path)['w']
    assert got.dtype == np.float16 and got.shape == (2, 3)
    assert got.tobytes() == values.tobytes()


def test_bfloat16_checkpoint_widens_exactly_to_float32(tmp_path):
    bits = np.array([0x3F80, 0xC020, 0x4049, 0x7F80, 0x0001, 0x8000], dtype='<u2')  # 1, -2.5, ~3.14, inf, tiny, -0
    path = write_zip_checkpoint(tmp_path / 'bf16.pth', {'w': tensor_op('BFloat16Storage', '0', 6, 1, (5,), (1,))},
                                {'0': bits.tobytes()})
    got = load_pth(path)['w']
    assert got.dtype == np.float32 and got.shape == (5,)
    assert got.view(np.uint32).tolist() == [int(b) << 16 for b in bits[1:]]
    assert got[0] == -2.5 and np.isinf(got[2]) and np.signbit(got[4])


@pytest.mark.parametrize('storage_class, dtype', [
    ('DoubleStorage', 'float64'), ('LongStorage', 'int64'), ('IntStorage', 'int32'), ('ShortStorage', 'int16'),
    ('CharStorage', 'int8'), ('ByteStorage', 'uint8'), ('BoolStorage', 'bool'), ('ComplexFloatStorage', 'complex64'),
    ('ComplexDoubleStorage', 'complex128')])
def test_other_storage_classes(tmp_path, storage_class, dtype):
    values = (np.arange(6) % 3 - 1).astype(dtype) * (1 + 1j if dtype.startswith('complex') else 1)
    values = values.astype(dtype)
    path = write_zip_checkpoint(tmp_path / 'x.pth', {'t': tensor_op(storage_class, '0', 6, 0, (3, 2), (1, 3))},
                                {'0': values.astype(np.dtype(dtype).newbyteorder('<')).tobytes()})
    got = load_pth(path)['t']
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, values.reshape(2, 3).T)


def test_legacy_format(tmp_path):
    entries, storages, expected = _view_checkpoint(legacy=True)
    path = write_legacy_checkpoint(tmp_path / 'legacy.pth', entries, storages, {'0': 'f4', '1': 'i8'})
    _check_views(load_pth(path), expected)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_pth(path)


# --- bad and malicious inputs -------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_pth(tmp_path / 'nope.pth')


@pytest.mark.parametrize('content', [b'', b'model weights, see README\n', bytes(range(7, 256)) * 4])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / 'notes.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='notes.pth is not a PyTorch checkpoint'):
        load_pth(path)


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / 'other.pth', 'w') as archive:
        archive.writestr('readme.txt', 'hello')
    with pytest.raises(CheckpointError, match='without data.pkl'):
        load_pth(tmp_path / 'other.pth')


def test_truncated_golden_file(tmp_path):
    raw = golden_path('v1_reduced.pth').read_bytes()
    path = tmp_path / 'cut.pth'
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match='cut.pth is truncated or corrupt'):
        load_pth(path)


def test_missing_storage_record(tmp_path):
    path = write_zip_checkpoint(tmp_path / 'hole.pth', {'w': tensor_op('FloatStorage', '7', 4, 0, (4,), (1,))}, {})
    with pytest.raises(CheckpointError, match='data/7'):
        load_pth(path)


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    path = write_zip_checkpoint(tmp_path / 'oob.pth', {'w': tensor_op('FloatStorage', '0', 4, 2, (1000,), (1000,))},
                                {'0': np.zeros(4, '<f4').tobytes()})
    with pytest.raises(CheckpointError, match='past the end'):
        load_pth(path)


class _Payload:
    """Pickles as a call of ``func(*args)``; loading it with plain pickle would run that call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _write_malicious(path, payload, layout):
    data = pickle.dumps({'model': OrderedDict(), 'args': payload}, protocol=2)
    if layout == 'zip':
        with zipfile.ZipFile(path, 'w') as archive:
            archive.writestr('archive/data.pkl', data)
            archive.writestr('archive/version', '3\n')
    else:
        path.write_bytes(data)  # a bare pickle looks like the legacy format's first record
    return path


@pytest.mark.parametrize('layout', ['zip', 'bare_pickle'])
@pytest.mark.parametrize('make_payload, refused', [
    (lambda marker: _Payload(os.system, f'touch {marker}'), os.system.__module__ + '.system'),
    (lambda marker: _Payload(eval, f"open({str(marker)!r}, 'w')"), 'builtins.eval'),
    (lambda marker: _Payload(subprocess.call, ['touch', str(marker)]), 'subprocess.call'),
    (lambda marker: _Payload(getattr, str(marker), 'upper'), 'builtins.getattr'),
])
def test_malicious_pickle_is_refused_without_running(tmp_path, layout, make_payload, refused):
    marker = tmp_path / 'pwned'
    path = _write_malicious(tmp_path / 'evil.pth', make_payload(marker), layout)
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load global '{refused}' from evil.pth"):
        load_pth(path)
    assert not marker.exists()


_CALL_NOTHING = _op_tuple([]) + b'R'


@pytest.mark.parametrize('ops, message', [
    (_op_global('collections', 'OrderedDict.fromkeys') + _CALL_NOTHING, "refused to load global 'collections.Ordered"),
    (_op_global('torch', 'FloatStorage') + _CALL_NOTHING, 'not callable'),
    (_op_global('torch', 'FloatStorage') + b'}b', 'refused to set the state'),  # BUILD into a storage type
    (_op_global('_codecs', 'encode') + _op_tuple([_op_str('x'), _op_str('rot13')]) + b'R', "encoding 'rot13'"),
    (_op_global('numpy', 'dtype') + _op_tuple([_op_global('builtins', 'set')]) + b'R', 'numpy dtype spec'),
    (_op_global('numpy._core.multiarray', 'scalar')
     + _op_tuple([_op_global('numpy', 'dtype') + _op_tuple([_op_str('O')]) + b'R', _op_str('x')]) + b'R',
     'not plain numeric data'),
    (_op_global('torch._utils', '_rebuild_tensor_v2') + _op_tuple([_op_int(0)] * 2 + [_op_tuple([])] * 2) + b'R',
     'not a storage'),
])
def test_allowed_globals_cannot_be_abused(tmp_path, ops, message):
    path = tmp_path / 'odd.pth'
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', dict_pickle({'x': ops}))
    with pytest.raises(CheckpointError, match=message):
        load_pth(path)


def test_unsafe_error_is_a_checkpoint_error():
    assert issubclass(UnsafeCheckpointError, CheckpointError) and issubclass(CheckpointError, ValueError)


# --- optional: the same files through real torch ------------------------------------------------

def test_matches_torch_load(tmp_path):
    torch = pytest.importorskip('torch')
    entries, storages, _ = _view_checkpoint()
    legacy_entries, _, _ = _view_checkpoint(legacy=True)
    bf16 = {'w': tensor_op('BFloat16Storage', '0', 4, 1, (3,), (1,))}, {'0': np.array([0x3F80, 0xC020, 0x4049, 0x0001], '<u2').tobytes()}
    files = [write_zip_checkpoint(tmp_path / 'views.pth', entries, storages),
             write_legacy_checkpoint(tmp_path / 'legacy.pth', legacy_entries, storages, {'0': 'f4', '1': 'i8'}),
             write_zip_checkpoint(tmp_path / 'bf16.pth', *bf16)]
    files += sorted(GOLDEN.glob('*.pth')) if GOLDEN.is_dir() else []
    for path in files:
        ours, theirs = load_pth(path), torch.load(path, weights_only=False)
        for key in ('model', 'model_ema') if 'model' in theirs else (None,):
            mine, state = (ours, theirs) if key is None else (ours[key], theirs[key])
            assert list(mine) == list(state), path
            for name, tensor in state.items():
                tensor = tensor.detach().float() if tensor.dtype == torch.bfloat16 else tensor.detach()
                assert mine[name].dtype == tensor.numpy().dtype and mine[name].shape == tuple(tensor.shape)
                assert mine[name].tobytes() == tensor.contiguous().numpy().tobytes(), (path, name)
