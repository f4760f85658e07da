"""train.py end to end on the real input pipeline: resume after kill -9 and SIGTERM is bit-identical,
metrics.jsonl / checkpoints / load_pretrained(workdir), fine-tuning from a converted golden checkpoint,
the tiny real-layout ImageNet, and config typos.

Every run is a `train.py` subprocess sharing one persistent compilation cache, so only the first run
of each program pays for XLA.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import REDUCED, convert_golden

pytest.importorskip('tensorflow')
REPO = Path(__file__).resolve().parents[1]
STEPS = 12
TINY = ['--config.model.embed_dims=(16,32,64,128)', '--config.model.depths=(1,1,1,1)',
        '--config.model.conv_impl=lax', '--config.batch_size=32', '--config.log_every_steps=1',
        '--config.eval_every_steps=12', '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=2',
        '--config.predict_examples=0', '--config.model.drop_path_rate=0.1', f'--config.total_steps={STEPS}']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp('jax_cache')
    return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
                JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=str(REPO))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('tfds')


def _command(workdir, data_dir, *extra, config='configs/demo.py'):
    return [sys.executable, str(REPO / 'train.py'), f'--config={REPO / config}', f'--workdir={workdir}',
            f'--config.data_dir={data_dir}', *TINY, *extra]


def _train(env, workdir, data_dir, *extra, **kwargs):
    proc = subprocess.run(_command(workdir, data_dir, *extra, **kwargs), env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _start_and_signal(env, workdir, data_dir, sig, *extra):
    """Start a run, send `sig` once its checkpoint of step 2 is complete, return (returncode, stdout)."""
    proc = subprocess.Popen(_command(workdir, data_dir, *extra), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    done = Path(workdir) / 'checkpoints' / '2'
    deadline = time.time() + 600
    while not done.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def _final(workdir):
    import jax
    import rest_jax
    _, plain = rest_jax.load_pretrained(workdir)
    _, ema = rest_jax.load_pretrained(workdir, ema=True)
    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v) for p, v in  # noqa: E731
                         jax.tree_util.tree_flatten_with_path(tree)[0]}
    return flat(plain), flat(ema)


@pytest.fixture(scope='module')
def reference(env, data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('reference')
    out = _train(env, workdir, data_dir)
    return workdir, out


def test_uninterrupted_run_logs_and_saves(reference):
    workdir, out = reference
    assert 'first step, compilation included' in out and 'img/s  ETA' in out
    assert 'stage1' in out and 'head' in out  # the parameter table
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == list(range(1, STEPS + 1))
    assert all({'loss', 'lr'} <= r.keys() for r in records)
    final = records[-1]
    assert {'top1', 'top5', 'ema_top1', 'ema_top5'} <= final.keys() and final['eval_count'] == 364
    assert 0 <= final['top1'] <= final['top5'] <= 1
    assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [10, 12]
    assert any(p.name.startswith('events.out.tfevents') for p in (workdir / 'tensorboard').iterdir())


def test_load_pretrained_reads_a_workdir(reference):
    import jax
    import jax.numpy as jnp
    import rest_jax
    model, variables = rest_jax.load_pretrained(reference[0], ema=True)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), variables) == jax.tree.map(lambda x: (x.shape, x.dtype), expected)
    assert model.num_classes == 10 and tuple(model.embed_dims) == (16, 32, 64, 128)
    plain, ema = _final(reference[0])
    assert any(not np.array_equal(plain[k], ema[k]) for k in plain)
    with pytest.raises(ValueError, match='no complete checkpoint'):
        (reference[0].parent / 'empty').mkdir(exist_ok=True)
        (reference[0].parent / 'empty' / 'rest_jax.json').write_text((reference[0] / 'rest_jax.json').read_text())
        rest_jax.load_pretrained(reference[0].parent / 'empty')


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM], ids=['kill-9', 'sigterm'])
def test_resume_is_bit_identical(env, data_dir, reference, tmp_path, sig):
    returncode, out = _start_and_signal(env, tmp_path, data_dir, sig)
    if sig == signal.SIGKILL:
        assert returncode == -signal.SIGKILL, out[-2000:]
    else:
        assert returncode == 0 and 'preempted (SIGTERM): saved step' in out, out[-2000:]
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert records[-1]['step'] < STEPS, 'the run ended before the signal: nothing was interrupted'
    out = _train(env, tmp_path, data_dir)
    assert 'resumed from' in out
    for resumed, uninterrupted in zip(_final(tmp_path), _final(reference[0])):
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


def test_config_typo_fails_clearly(env, tmp_path, data_dir):
    proc = subprocess.run(_command(tmp_path, data_dir, '--config.lerning_rate=1'), env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --config.lerning_rate: no such config field ('lerning_rate'); the fields are listed in "
        'configs/common.py')


def test_non_finite_loss_stops_naming_the_step(env, tmp_path, data_dir):
    workdir = tmp_path / 'run'
    proc = subprocess.run(_command(workdir, data_dir, '--config.lr=1e9'), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: non-finite loss or gradients at step '), last
    step = int(last.split('at step ')[1].split()[0])
    saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    assert saved and max(saved) < step  # what was saved before stays; the bad step is not saved
    import rest_jax
    model, variables = rest_jax.load_pretrained(workdir)  # and it is intact
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(variables))


def test_fine_tune_config_requires_init_from(env, tmp_path):
    command = [sys.executable, str(REPO / 'train.py'), f'--config={REPO / "configs/restv2_t_384.py"}',
               f'--workdir={tmp_path / "run"}']
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'pass --config.init_from=DIR' in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / 'run').exists()  # stopped before anything was written


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    return convert_golden(tmp_path_factory.mktemp('golden') / 'v2_reduced')


def test_init_from_converted_golden_reinitialises_the_head(converted):
    import jax
    import ml_collections
    import rest_jax
    from configs import demo
    from rest_jax.train import loop
    config = demo.get_config()
    config.init_from, config.model.num_classes = str(converted), 7
    config = ml_collections.FrozenConfigDict(config)
    name, overrides, note = loop.model_spec(config, '/nonexistent')
    arch = REDUCED['v2_reduced'][1]
    assert name == 'restv2_tiny' and overrides['num_classes'] == 7 and str(converted) in note
    assert [list(overrides[k]) for k in ('embed_dims', 'depths')] == [arch['embed_dims'], arch['depths']]
    model = rest_jax.create_model(name, **overrides)
    variables = loop._initial_variables(config, model, 32)
    _, golden = rest_jax.load_pretrained(converted)
    assert variables['params']['head']['kernel'].shape == (arch['embed_dims'][-1], 7)
    flat = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(golden)[0]:
        if 'head' not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(flat[path], value, err_msg=jax.tree_util.keystr(path))


def test_tiny_imagenet_fine_tune_through_train_py(env, converted, tmp_path):
    """The real imagenet2012 builder on tiny tars, fine-tuned from the 10-class golden (head -> 1000)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_pipeline import _tiny_imagenet
    data_dir = tmp_path / 'imagenet'
    _tiny_imagenet(data_dir)
    out = _train(env, tmp_path / 'run', data_dir, '--config.dataset=imagenet2012', '--config.model.num_classes=1000',
                 '--config.data.eval_split=validation', '--config.batch_size=4', '--config.total_steps=3',
                 '--config.eval_every_steps=3', f'--config.init_from={converted}', '--config.model.embed_dims=None',
                 '--config.model.depths=None')
    assert 'head re-initialised for 1000 classes' in out
    assert 'imagenet2012: 12 train / 5 eval images, 1000 classes' in out
    assert 'eval at step 3' in out and '(5 images)' in out
