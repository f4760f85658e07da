"""Shared test fixtures: the golden outputs of the official code, and the reduced models they came from."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Compilation dominates this suite's time, and many tests (and the subprocesses they start: the CLIs,
# train.py) compile identical programs. A persistent XLA cache for the session turns the repeats into
# loads. Set before jax is imported, so the subprocesses inherit it through the environment.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _cache = tempfile.mkdtemp(prefix='rest_jax_test_xla_cache_')
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    if 'jax' in sys.modules:  # imported early by a plugin: configure it directly
        sys.modules['jax'].config.update('jax_compilation_cache_dir', _cache)
        sys.modules['jax'].config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

# The suite's programs are small and each runs a few times, so XLA's optimisation of the generated CPU
# code (LLVM) costs far more than it saves: at this level a reduced model's init compiles ~3x faster and
# its gradient ~1.7x faster (2-core AMD EPYC; docs/testing.md, docs/compile_time.py). The HLO program is
# the same; results may differ from the default level in the last bit (FMA contraction), which no test
# compares across levels. The TPU compile of tests/test_deviceless.py turns it off again: that test
# examines the program users get.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

# Likewise XLA:CPU's older fusion code generator, which compiles the suite's training steps ~2.8x
# faster than the default one (a reduced restv2_tiny's gradient: 16.6 -> 5.9 s). XLA aborts on a flag
# it does not know, and the jax range in pyproject.toml spans several XLA releases, so a subprocess
# tries it first, once: the marker variable tells pytest-xdist's workers and the tests' subprocesses,
# which inherit the environment, that it was tried.
if 'REST_JAX_TEST_XLA_FLAGS_TRIED' not in os.environ:
    os.environ['REST_JAX_TEST_XLA_FLAGS_TRIED'] = '1'
    _flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()
    if subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], capture_output=True,
                      env=dict(os.environ, XLA_FLAGS=_flags, JAX_PLATFORMS='cpu')).returncode == 0:
        os.environ['XLA_FLAGS'] = _flags

# The suite runs on the host CPU. With libtpu installed (tests/test_deviceless.py needs it), JAX would
# otherwise probe for a TPU first, and libtpu prints warnings off a TPU VM into the CLIs' stderr.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Kernel forms are not measured on this host during the suite (the same programs on every run, no
# timing in CI); tests/test_cpu_tune.py measures them into a temporary cache on purpose.
os.environ.setdefault('REST_JAX_CPU_TUNE', 'off')

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; REST_JAX_GOLDEN points elsewhere if needed.
GOLDEN = Path(os.environ.get('REST_JAX_GOLDEN', REPO.parent / 'shared' / 'golden'))

# The official classes and arguments behind each golden file (shared/golden/README.md).
REDUCED = {
    'v1_reduced': ('rest_lite', dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4],
                                     qkv_bias=True, depths=[1, 1, 2, 1], sr_ratios=[8, 4, 2, 1],
                                     apply_transform=True, num_classes=10)),
    'v2_reduced': ('restv2_tiny', dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 2, 1],
                                       sr_ratios=[8, 4, 2, 1], num_classes=10)),
    'v2_reduced_wide_heads': ('restv2_tiny', dict(embed_dims=[32, 64, 128, 256], num_heads=[2, 4, 8, 16],
                                                  depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], num_classes=10)),
}


def subprocess_env(devices: int | None = None) -> dict:
    """The environment for a test's jax subprocess: this suite's settings above (the shared compilation
    cache, the compile flags) and this checkout on the path; `devices` simulated CPU devices."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if devices is not None:
        env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def run_main(main, capsys, *args) -> subprocess.CompletedProcess:
    """A command-line tool's `main(args)` in this process, as if run (no interpreter start, no imports
    repeated): its exit code and what it printed, in a subprocess's result."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def golden_path(name: str) -> Path:
    """A file of shared/golden; skipped locally if absent, a failure under CI (CI=true)."""
    path = GOLDEN / name
    if not path.exists():
        message = f'golden file {path} not found (set REST_JAX_GOLDEN to the shared/golden directory)'
        if os.environ.get('CI'):
            pytest.fail(message)
        pytest.skip(message)
    return path


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the golden README's measure."""
    import numpy as np
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def convert_golden(dst, stem: str = 'v2_reduced'):
    """The golden official checkpoint `stem` converted into `dst` (ResTv2's head counts given, since its
    shapes cannot show them); returns `dst`."""
    from rest_jax.convert import convert_checkpoint
    convert_checkpoint(golden_path(f'{stem}.pth'), dst, arch={'num_heads': tuple(REDUCED[stem][1]['num_heads'])})
    return dst
