"""The package as a user meets it: imports without tensorflow/torch, and the README's claims."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, golden_path


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


def test_one_command_line_entry_point(capsys):
    """`python -m rest_jax COMMAND`: each subject's tool; an unknown command gets one usage line."""
    from rest_jax.__main__ import COMMANDS, main
    run = lambda *args: subprocess.run([sys.executable, '-m', 'rest_jax', *args], cwd=REPO, capture_output=True,
                                       text=True, timeout=300)
    bad = run('nonsense')
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "unknown command 'nonsense'" in bad.stderr
    assert run('demo', '--help').stdout.startswith('usage: python -m rest_jax demo')
    assert sorted(COMMANDS) == ['benchmark', 'convert', 'demo', 'deviceless', 'export', 'predict']
    for command in COMMANDS:  # the others' --help in this process (each interpreter start costs seconds)
        with pytest.raises(SystemExit) as done:
            main([command, '--help'])
        assert done.value.code == 0 and f'usage: python -m rest_jax {command}' in capsys.readouterr().out, command


def test_pip_install_then_import_from_another_directory(tmp_path):
    """`pip install .` builds a package that imports from anywhere, with its data file and console script.

    Built without dependencies and without build isolation into a target directory, reusing this
    environment's packages: the same wheel a fresh `pip install .` makes, without a network or a new venv.
    """
    import shutil
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / 'rest_jax', src / 'rest_jax', ignore=shutil.ignore_patterns('__pycache__'))
    site = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                    '--target', str(site), str(src)], check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith('.dist-info')) == ['bin', 'rest_jax']
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PYTHONPATH'] = str(site)
    code = ("import rest_jax\n"
            "print(rest_jax.__file__)\n"
            "print(len(rest_jax.imagenet_class_names()), len(rest_jax.list_models()), rest_jax.__version__)")
    away = tmp_path / 'elsewhere'
    away.mkdir()
    out = subprocess.run([sys.executable, '-c', code], cwd=away, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out == [str(site / 'rest_jax' / '__init__.py'), '1000', '8', rest_jax_version()]
    script = subprocess.run([sys.executable, str(site / 'bin' / 'rest-jax'), 'nonsense'], cwd=away, env=env,
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 2 and 'usage: python -m rest_jax' in script.stderr


_BASE_FEATURES = """
import importlib.util, sys
from pathlib import Path
import numpy as np, PIL.Image
assert importlib.util.find_spec('tensorflow') is None and importlib.util.find_spec('torch') is None
import rest_jax
from rest_jax.convert import convert_checkpoint
from rest_jax.export import export_checkpoint
out = Path(sys.argv[2])
convert_checkpoint(sys.argv[1], out / 'converted', arch={'num_heads': (1, 2, 4, 8)})
model, variables = rest_jax.load_pretrained(out / 'converted')
PIL.Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(out / 'grey.png')
rest_jax.predict(model, variables, rest_jax.preprocess([PIL.Image.open(out / 'grey.png')], model), top_k=1)
export_checkpoint(out / 'converted', out / 'model.jaxexport', batch_size=1, input_size=64)
assert rest_jax.load_exported(out / 'model.jaxexport')(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 10)
"""


def test_the_base_install_has_what_its_features_import(tmp_path):
    """The converter, inference and export run with only the packages `pip install .` brings.

    jax imports some packages only when a feature needs them (flatbuffers, to write or read a jax.export
    artifact) and does not declare them. The installed files of rest-jax's base dependencies (and
    theirs, extras left out) are linked into one directory, and those features run in an interpreter
    that sees only that directory, the checkout and the standard library.
    """
    from importlib import metadata
    from packaging.requirements import Requirement
    canonical = lambda name: re.sub(r'[-_.]+', '-', name).lower()
    base, todo = set(), ['rest-jax']
    while todo:
        name = todo.pop()
        if canonical(name) in base:
            continue
        base.add(canonical(name))
        for text in metadata.requires(name) or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
                todo.append(requirement.name)
    site = tmp_path / 'site'
    site.mkdir()
    for name in base:
        distribution = metadata.distribution(name)
        for top in {file.parts[0] for file in distribution.files or () if file.parts[0] != '..'}:
            if not (site / top).exists() and top != '__pycache__':
                (site / top).symlink_to(distribution.locate_file(top))
    assert {'jax', 'flax', 'orbax', 'PIL'} <= {p.name for p in site.iterdir()} and not (site / 'tensorflow').exists()
    env = {**os.environ, 'PYTHONPATH': f'{site}{os.pathsep}{REPO}'}
    run = subprocess.run([sys.executable, '-S', '-c', _BASE_FEATURES, str(golden_path('v2_reduced.pth')),
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def rest_jax_version() -> str:
    return re.search(r"__version__ = '([^']+)'", (REPO / 'rest_jax' / '__init__.py').read_text()).group(1)


def test_import_is_lazy():
    """`import rest_jax` loads no flax, orbax or Pillow until a name that needs them is used."""
    code = ("import sys, rest_jax\n"
            "assert not [m for m in ('flax', 'orbax', 'PIL', 'rest_jax.models') if m in sys.modules]\n"
            "assert rest_jax.create_model is rest_jax.models.create_model and 'flax' in sys.modules\n"
            "assert set(rest_jax.__all__) <= set(dir(rest_jax))\n"
            "import rest_jax.models.layers\n"
            "assert all(getattr(rest_jax, name) is not None for name in rest_jax.__all__)\n"
            "try:\n    rest_jax.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
            "else:\n    raise AssertionError")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)
