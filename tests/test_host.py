"""rest_jax.host: the huge-page restart of the CLIs, and what it does to XLA:CPU's page faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from rest_jax import host

_USABLE = host.thp_mode() == 'madvise' and (host._glibc_version() or (0, 0)) >= (2, 35)
_WHY_NOT = f'needs transparent huge pages on madvise (here: {host.thp_mode()}) and glibc 2.35+'


def _run(code: str, **env: str) -> list[str]:
    full = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', host.OPT_OUT)}
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, check=True,
                          env=dict(full, **env)).stdout.split('\n')


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    for text, mode in [('always [madvise] never\n', 'madvise'), ('[always] madvise never\n', 'always'),
                       ('always madvise [never]\n', 'never'), ('garbage\n', None)]:
        (tmp_path / 'enabled').write_text(text)
        assert host.thp_mode(str(tmp_path / 'enabled')) == mode
    assert host.thp_mode(str(tmp_path / 'missing')) is None


_RESTART = """
import os, sys
from rest_jax import host
print('start', os.getpid(), flush=True)
host.reexec_with_huge_pages()
print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])
print(host.huge_pages_status())
"""


@pytest.mark.skipif(not _USABLE, reason=_WHY_NOT)
def test_restart_once_with_the_tunable_then_never_again():
    """One restart, same pid and arguments, the user's other tunables kept; none with the opt-out or
    when the tunable is already set."""
    start, again, after, status, _ = _run(_RESTART, GLIBC_TUNABLES='glibc.malloc.check=0')
    assert start == again and start.startswith('start ')
    pid = start.split()[1]
    assert after == f"after {pid} glibc.malloc.check=0:glibc.malloc.hugetlb=1 []"
    assert status.startswith('on (')
    out = _run(_RESTART, **{host.OPT_OUT: '0'})
    assert [line.split()[0] for line in out if line] == ['start', 'after', 'off'] and 'None' in out[1]
    out = _run(_RESTART, GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
    assert [line.split()[0] for line in out if line] == ['start', 'after', 'off']


_FAULTS = """
import resource
from rest_jax import host
host.reexec_with_huge_pages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x[:, None] * x[None, :]) @ x))   # a 256 MB temporary per call
x = jnp.linspace(0, 1, 8192)
f(x).block_until_ready(); f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not _USABLE, reason=_WHY_NOT)
def test_huge_pages_spare_xla_cpu_page_faults():
    """Page faults (counted, not timed) of three calls with a 256 MB temporary: with glibc's defaults
    each call faults its 65,536 pages in again; after the restart it faults 2 MiB pages."""
    default = int(_run(_FAULTS, **{host.OPT_OUT: '0'})[0])
    huge = int(_run(_FAULTS)[0])
    assert default > 3 * 50_000, default
    assert huge < default / 10, (huge, default)


def test_cli_entry_points_restart():
    """train.py and the benchmark CLI restart themselves in their __main__ blocks, and only there:
    importing rest_jax or calling benchmark.main() in-process changes nothing."""
    for path in ('train.py', 'rest_jax/benchmark.py'):
        main_block = (REPO / path).read_text().split("if __name__ == '__main__':")[1]
        assert 'host.reexec_with_huge_pages()' in main_block, path
    out = _run('import os, rest_jax, rest_jax.benchmark; print(os.environ.get("GLIBC_TUNABLES"))')
    assert out[0] == 'None'
