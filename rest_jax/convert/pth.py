"""Read PyTorch ``.pth`` checkpoints into numpy arrays, without torch and without running pickled code.

``torch.save`` writes a pickle whose tensors point, through "persistent ids", at raw storage
bytes kept outside the pickle. Two layouts exist:

* zip (torch >= 1.6): entries ``<prefix>/data.pkl`` (the pickle), ``<prefix>/data/<key>`` (one
  record of raw bytes per storage), ``<prefix>/byteorder`` (``little``/``big``; absent means little)
  and ``<prefix>/version``. The prefix varies, so ``data.pkl`` is found by its suffix.
* legacy (``_use_new_zipfile_serialization=False``): consecutive pickles of a magic number, the
  protocol version, a ``sys_info`` dict and the object, then a pickled list of storage keys,
  then per key an 8-byte little-endian element count followed by the storage's bytes.

In both, a persistent id is ``('storage', <torch.XStorage class>, key, location, numel[, view])``
and a tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``. The
unpickler here resolves only an allow-list of globals to its own numpy implementations or to inert
stand-ins; every other global (``os.system``, ``builtins.eval``, ...) raises
:class:`UnsafeCheckpointError` before anything from the file can run.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import BinaryIO

import numpy as np

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'InertObject', 'load_pth']

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Element types are numpy dtype names, plus "bfloat16", which is widened to float32 on load.
_STORAGE_TYPES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
    'ComplexFloatStorage': 'complex64', 'ComplexDoubleStorage': 'complex128',
    'UntypedStorage': 'uint8',
}
_TORCH_DTYPES = {
    'float32': 'float32', 'float64': 'float64', 'float16': 'float16', 'bfloat16': 'bfloat16',
    'int64': 'int64', 'int32': 'int32', 'int16': 'int16', 'int8': 'int8', 'uint8': 'uint8',
    'bool': 'bool', 'complex64': 'complex64', 'complex128': 'complex128',
    'uint16': 'uint16', 'uint32': 'uint32', 'uint64': 'uint64',
}
# Harmless classes that are recreated as InertObject subclasses, never imported.
_INERT_GLOBALS = {('argparse', 'Namespace'), ('types', 'SimpleNamespace'), ('torch', 'device')}


class CheckpointError(ValueError):
    """A file cannot be read as a PyTorch checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint refers to a global (function or class) outside the allow-list."""


class InertObject:
    """Stand-in for a harmless pickled object such as ``argparse.Namespace``.

    It records the pickled state as attributes (``args.lr``, ``vars(args)``) and never calls the
    real class. ``type(obj).pickled_global`` names the class it replaces.
    """

    pickled_global = '?'

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        if args or kwargs:
            obj.__dict__['_pickled_args'] = (args, kwargs)
        return obj

    def __init__(self, *args, **kwargs):
        pass  # arguments were recorded by __new__

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if isinstance(part, dict):
                self.__dict__.update(part)
            elif part is not None:
                self.__dict__['_pickled_state'] = part

    def __repr__(self):
        fields = ', '.join(f'{key}={value!r}' for key, value in self.__dict__.items())
        return f'{type(self).pickled_global}({fields})'


_inert_classes: dict[str, type] = {}


def _inert_class(qualified: str) -> type:
    if qualified not in _inert_classes:
        name = qualified.rsplit('.', 1)[-1]
        _inert_classes[qualified] = type(name, (InertObject,), {'pickled_global': qualified})
    return _inert_classes[qualified]


class _Sealed:
    """Base of internal objects a pickle can reach: refuses BUILD, so their fields stay ours."""

    def __setstate__(self, state):
        raise CheckpointError('refused to set the state of an internal storage object')


class _StorageType(_Sealed):
    """What a ``torch.XStorage`` global resolves to: only its element type. Not callable."""

    def __init__(self, dtype: str):
        self.dtype = dtype


class _Storage(_Sealed):
    """The raw bytes of one storage record; ``raw`` is None until read (legacy first pass)."""

    def __init__(self, dtype: str, byteorder: str, raw: bytes | None):
        self.dtype, self.byteorder, self.raw = dtype, byteorder, raw
        self._decoded: dict[str, np.ndarray] = {}

    def elements(self, dtype: str) -> np.ndarray:
        """The storage as a flat, native-endian array of ``dtype`` (bfloat16 widened to float32)."""
        if dtype not in self._decoded:
            order = '<' if self.byteorder == 'little' else '>'
            stored = np.dtype('uint16' if dtype == 'bfloat16' else dtype).newbyteorder(order)
            usable = len(self.raw) - len(self.raw) % stored.itemsize
            flat = np.frombuffer(self.raw[:usable], dtype=stored)
            if dtype == 'bfloat16':
                flat = (flat.astype(np.uint32) << 16).view(np.float32)
            self._decoded[dtype] = flat.astype(flat.dtype.newbyteorder('='), copy=False)
        return self._decoded[dtype]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored, dtype=None):
    """Copy a (possibly strided, offset) view of ``storage`` into a new C-contiguous array."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f'a tensor refers to {type(storage).__name__}, not a storage')
    if storage.raw is None:
        return None  # legacy first pass: the storage bytes come after the pickle
    size, stride = tuple(size), tuple(stride)
    numbers = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(n, int) and n >= 0 for n in numbers):
        raise CheckpointError(f'invalid tensor layout: size {size}, stride {stride}')
    elements = storage.elements(dtype or storage.dtype)
    if 0 in size:
        return np.zeros(size, dtype=elements.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= elements.size:
        raise CheckpointError(
            f'a tensor (offset {storage_offset}, size {size}, stride {stride}) reaches past the '
            f'end of its storage of {elements.size} elements')
    view = np.lib.stride_tricks.as_strided(
        elements[storage_offset:], shape=size, strides=[s * elements.itemsize for s in stride])
    return np.array(view, copy=True, order='C')


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if dtype not in _TORCH_DTYPES.values():
        raise CheckpointError(f'unsupported tensor dtype {dtype!r}')
    return _rebuild_tensor(storage, offset, size, stride, dtype=dtype)


def _rebuild_parameter(data, *_ignored):
    return data


def _numpy_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise CheckpointError(f'refused numpy dtype spec of type {type(spec).__name__}')
    return np.dtype(spec)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise CheckpointError('refused a numpy scalar that is not plain numeric data')
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_bytes(text, encoding='latin1'):
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise CheckpointError(f'refused _codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')


_SAFE_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): OrderedDict,
    ('torch', 'Size'): tuple,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'complex'): complex,
    ('_codecs', 'encode'): _latin1_bytes,
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and serves storages from ``read_storage``."""

    def __init__(self, file, name: str, read_storage):
        super().__init__(file, encoding='utf-8')
        self._name, self._read_storage = name, read_storage
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        # Protocol 2 (torch's default) writes Python 2 names, e.g. '__builtin__.set'; map them back.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in ('torch', 'torch.storage') and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        if module == 'torch' and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if (module, name) in _INERT_GLOBALS:
            return _inert_class(f'{module}.{name}')
        raise UnsafeCheckpointError(
            f"refused to load global '{module}.{name}' from {self._name}: checkpoints may only "
            'contain tensors and plain data; if you trust the file, re-save its tensors with torch')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ('storage', b'storage')):
            raise CheckpointError(f'{self._name} holds an unsupported persistent id {pid!r:.80}')
        storage_type, key, numel, view = pid[1], str(pid[2]), pid[4], (pid[5:] or (None,))[0]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise CheckpointError(f'{self._name} holds a malformed storage reference {pid!r:.80}')
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, storage_type.dtype, numel)
        storage = self.storages[key]
        if view is not None:  # legacy storage view: (view_key, offset, numel), in elements
            _, offset, view_numel = view
            itemsize = _element_size(storage.dtype)
            raw = storage.raw and storage.raw[offset * itemsize:(offset + view_numel) * itemsize]
            storage = _Storage(storage.dtype, storage.byteorder, raw)
        return storage


def _element_size(dtype: str) -> int:
    return 2 if dtype == 'bfloat16' else np.dtype(dtype).itemsize


def _unpickle(file: BinaryIO, name: str, read_storage):
    unpickler = _RestrictedUnpickler(file, name, read_storage)
    try:
        return unpickler.load(), unpickler
    except CheckpointError:
        raise
    except Exception as err:  # a cut or malformed pickle can raise nearly anything
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise CheckpointError(f'{name} is truncated or corrupt ({reason}); re-download or re-save it') from err


def _load_zip(file: BinaryIO, name: str):
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as err:
        raise CheckpointError(f'{name} is truncated or corrupt: {err}; re-download or re-save it')
    with archive:
        pickles = sorted((n for n in archive.namelist() if n.rsplit('/', 1)[-1] == 'data.pkl'),
                         key=lambda n: n.count('/'))
        if not pickles:
            raise CheckpointError(
                f'{name} is not a PyTorch checkpoint (a zip archive without data.pkl)')
        prefix = pickles[0][: -len('data.pkl')]
        entries = set(archive.namelist())
        byteorder = 'little'
        if prefix + 'byteorder' in entries:
            byteorder = archive.read(prefix + 'byteorder').decode('ascii', 'replace').strip()
            if byteorder not in ('little', 'big'):
                raise CheckpointError(f'{name} has an unknown byte order {byteorder!r}')

        def read_storage(key, dtype, numel):
            entry = f'{prefix}data/{key}'
            if entry not in entries:
                raise CheckpointError(
                    f'{name} is corrupt: storage record {entry!r} is missing; re-save the checkpoint')
            raw = archive.read(entry)
            if len(raw) < numel * _element_size(dtype):
                raise CheckpointError(f'{name} is truncated or corrupt: storage {entry!r} is short')
            return _Storage(dtype, byteorder, raw)

        try:
            data_pkl = archive.read(pickles[0])
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise CheckpointError(f'{name} is truncated or corrupt: {err}')
        return _unpickle(io.BytesIO(data_pkl), name, read_storage)[0]


def _load_legacy(file: BinaryIO, name: str):
    header = []
    for _ in range(3):  # magic number, protocol version, sys_info
        header.append(_unpickle(file, name, None)[0])
    magic, protocol, sys_info = header
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
        raise CheckpointError(f'{name} is not a PyTorch checkpoint (unknown header)')
    byteorder = 'little' if sys_info.get('little_endian', True) else 'big'
    start = file.tell()
    # First pass: learn each storage's element type; tensors come out as None.
    _, unpickler = _unpickle(file, name, lambda key, dtype, numel: _Storage(dtype, byteorder, None))
    keys = _unpickle(file, name, None)[0]
    raws = {}
    for key in keys:
        storage = unpickler.storages.get(str(key))
        count = file.read(8)
        if storage is None or len(count) < 8:
            raise CheckpointError(f'{name} is truncated or corrupt: storage {key!r} is missing')
        nbytes = int.from_bytes(count, 'little') * _element_size(storage.dtype)
        raws[str(key)] = file.read(nbytes)
        if len(raws[str(key)]) < nbytes:
            raise CheckpointError(f'{name} is truncated or corrupt: storage {key!r} is short')
    # Second pass: the same pickle again, now with every storage's bytes at hand.
    file.seek(start)

    def read_storage(key, dtype, numel):
        if key not in raws:
            raise CheckpointError(f'{name} is corrupt: storage {key!r} has no data record; re-save it')
        return _Storage(dtype, byteorder, raws[key])

    return _unpickle(file, name, read_storage)[0]


def load_pth(source: str | os.PathLike | BinaryIO) -> object:
    """Load a PyTorch checkpoint with every tensor as a numpy array, without importing torch.

    Args:
        source: path of a ``.pth`` file (zip or legacy format), or a seekable binary file object
            positioned at the start of the checkpoint.

    Returns:
        The object that was passed to ``torch.save`` (usually a dict): tensors and parameters
        become C-contiguous ``np.ndarray`` copies with the same shape and dtype (bfloat16 becomes
        float32 exactly), ``OrderedDict`` stays, and allow-listed objects such as an
        ``argparse.Namespace`` become :class:`InertObject` stand-ins.

    Raises:
        FileNotFoundError: the path does not exist.
        UnsafeCheckpointError: the pickle refers to a global outside the allow-list (code).
        CheckpointError: the file is not a checkpoint, or is truncated or corrupt.
    """
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f'checkpoint {os.fspath(source)!r} does not exist or is not a file')
        with open(source, 'rb') as file:
            return load_pth(file)
    name = os.path.basename(str(getattr(source, 'name', '<stream>')))
    start = source.tell()
    head = source.read(4)
    source.seek(start)
    if head.startswith(b'PK'):
        return _load_zip(source, name)
    if head[:1] == b'\x80':  # a binary pickle: the legacy format starts with one
        return _load_legacy(source, name)
    reason = 'the file is empty' if not head else 'neither a zip archive nor a pickle'
    raise CheckpointError(f'{name} is not a PyTorch checkpoint ({reason}); pass a file made by torch.save')
