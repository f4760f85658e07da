"""The package as a user meets it: imports without tensorflow/torch, and the README's claims."""

import re
import subprocess
import sys

from conftest import REPO


def test_import_without_tensorflow_and_torch():
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['torch'] = None\n"
            "import rest_jax, rest_jax.convert, rest_jax.convert.pth, rest_jax.demo, rest_jax.inference\n"
            "import rest_jax.predict, rest_jax.benchmark, rest_jax.models.macs, rest_jax.train\n"
            "assert len(rest_jax.list_models()) == 8")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


def _readme() -> str:
    return (REPO / 'README.md').read_text()


def test_readme_api_example_runs():
    example = re.findall(r'```python\n(.*?)```', _readme(), re.S)[0]
    namespace: dict = {}
    exec(compile(example, 'README.md', 'exec'), namespace)
    assert namespace['logits'].shape == (2, 1000)
    assert [f.shape[1] for f in namespace['feats']] == [56, 28, 14, 7]


def test_readme_variant_table_is_what_the_demo_prints():
    from rest_jax.demo import variant_table
    assert variant_table() in _readme()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / '.ci' / 'run').read_text()
    command = next(line for line in ci.splitlines() if 'pytest' in line)
    assert command in _readme()
