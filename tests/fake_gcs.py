"""gs:// paths served from a local directory, for the code that reaches storage through etils.epath.

What reaches GCS through its own client (ArrayRecord's C++ reader, tf.data's TFRecord reader) is
not covered: tests read those files at the local directory behind the fake bucket.
"""

import contextlib
import os
from unittest import mock

from etils.epath import gpath
from etils.epath import testing as epath_testing


@contextlib.contextmanager
def fake_gcs(root):
    """Within the block, epath maps gs://BUCKET/PATH to ROOT/BUCKET/PATH (every operation)."""
    root = os.fspath(root).rstrip('/')

    def local(path):
        path = os.fspath(path)
        return f'{root}/{path[len("gs://"):]}' if path.startswith('gs://') else path

    def remote(path):
        path = os.fspath(path)
        return f'gs://{path[len(root) + 1:]}' if path.startswith(f'{root}/') else path

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def glob(fn, path):
        return [remote(p) for p in fn(local(path))]

    def walk(fn, path, **kwargs):
        return ((remote(d), dirs, files) for d, dirs, files in fn(local(path), **kwargs))

    # epath picks tf.io.gfile for gs:// whenever tensorflow is installed (a cached check), which
    # bypasses its mocks.
    with mock.patch.object(gpath, '_is_tf_installed', lambda: False), epath_testing.mock_epath(
            open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
            rmtree=one, stat=one, glob=glob, walk=walk, copy=two, rename=two, replace=two):
        yield
