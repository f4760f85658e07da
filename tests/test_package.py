"""The package as a user meets it: imports without tensorflow/torch, and the README's claims."""

import re
import subprocess
import sys

from conftest import REPO


def test_import_without_tensorflow_and_torch():
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['torch'] = None\n"
            "import rest_jax, rest_jax.convert, rest_jax.convert.pth, rest_jax.demo, rest_jax.inference\n"
            "import rest_jax.benchmark, rest_jax.models.macs, rest_jax.train, rest_jax.ops, rest_jax.pretrained\n"
            "assert len(rest_jax.list_models()) == 8 and callable(rest_jax.predict)")
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


def test_one_command_line_entry_point():
    """`python -m rest_jax COMMAND`: each subject's tool; an unknown command gets one usage line."""
    run = lambda *args: subprocess.run([sys.executable, '-m', 'rest_jax', *args], cwd=REPO, capture_output=True,
                                       text=True, timeout=300)
    bad = run('nonsense')
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "unknown command 'nonsense'" in bad.stderr
    for command in ('convert', 'predict', 'benchmark', 'demo', 'deviceless'):
        help_text = run(command, '--help')
        assert help_text.returncode == 0 and 'usage:' in help_text.stdout, (command, help_text.stderr)
