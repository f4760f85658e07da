"""train.py end to end on the real input pipeline: resume after SIGTERM and kill -9 is bit-identical,
metrics.jsonl / checkpoints / load_pretrained(workdir), a non-finite loss, a step too large for the
device, initialising from a converted golden checkpoint, and config typos. (Fine-tuning on the tiny
real-layout ImageNet through train.py, over 8 devices: tests/test_data_formats.py.)

Every run is a `train.py` subprocess sharing the suite's persistent compilation cache, so only the first
run of each program pays for XLA.
"""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import REDUCED, convert_golden, subprocess_env

pytest.importorskip('tensorflow')
REPO = Path(__file__).resolve().parents[1]
STEPS = 12
TINY = ['--config.model.embed_dims=(16,32,64,128)', '--config.model.depths=(1,1,1,1)',
        '--config.model.conv_impl=lax', '--config.batch_size=32', '--config.log_every_steps=1',
        '--config.eval_every_steps=12', '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=2',
        '--config.predict_examples=0', '--config.model.drop_path_rate=0.1', f'--config.total_steps={STEPS}']


@pytest.fixture(scope='module')
def env():
    return subprocess_env()


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


def _start_and_signal(env, workdir, data_dir, sig, after=2):
    """Start a run, send `sig` once it has a complete checkpoint of a step >= `after` (Orbax renames a
    checkpoint to its step number when it is complete), return (returncode, stdout)."""
    proc = subprocess.Popen(_command(workdir, data_dir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    checkpoints = Path(workdir) / 'checkpoints'
    saved = lambda: [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []  # noqa: E731
    deadline = time.time() + 600
    while not any(step >= after for step in saved()) and proc.poll() is None and time.time() < deadline:
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


def test_load_pretrained_reads_a_workdir(reference, caplog):
    import jax
    import jax.numpy as jnp
    import rest_jax
    with caplog.at_level('WARNING'):
        model, variables = rest_jax.load_pretrained(reference[0], ema=True)
    assert not caplog.records, [r.getMessage() for r in caplog.records]   # Orbax's read-only notices kept out
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), variables) == jax.tree.map(lambda x: (x.shape, x.dtype), expected)
    assert model.num_classes == 10 and tuple(model.embed_dims) == (16, 32, 64, 128)
    plain, ema = _final(reference[0])
    assert any(not np.array_equal(plain[k], ema[k]) for k in plain)
    with pytest.raises(ValueError, match='no complete checkpoint'):
        (reference[0].parent / 'empty').mkdir(exist_ok=True)
        (reference[0].parent / 'empty' / 'rest_jax.json').write_text((reference[0] / 'rest_jax.json').read_text())
        rest_jax.load_pretrained(reference[0].parent / 'empty')


def test_resume_after_sigterm_and_kill_9_is_bit_identical(env, data_dir, reference, tmp_path):
    """Preempted (SIGTERM: a checkpoint is saved on the way out), resumed, killed (-9: nothing saved
    after the last periodic checkpoint), resumed again: the final state equals the uninterrupted run's."""
    returncode, out = _start_and_signal(env, tmp_path, data_dir, signal.SIGTERM)
    assert returncode == 0 and 'preempted (SIGTERM): saved step' in out, out[-2000:]
    saved = int(re.search(r'saved step (\d+)', out).group(1))
    assert saved < STEPS, 'the run ended before the signal: nothing was interrupted'
    returncode, out = _start_and_signal(env, tmp_path, data_dir, signal.SIGKILL, after=saved + 1)
    assert returncode == -signal.SIGKILL and re.search(rf'resumed from \S+/{saved}\n', out), out[-2000:]
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


def test_a_step_larger_than_the_device_memory_is_one_line(data_dir, tmp_path, monkeypatch):
    """A training step XLA cannot fit in a device's memory stops the run with one line naming the batch per
    device and what to change. The error is XLA's own: a 1 EiB buffer, more than any machine has."""
    import jax.numpy as jnp
    from configs import demo
    from rest_jax import train
    from rest_jax.train import step as step_lib
    too_large = jax.jit(lambda x: jnp.zeros((2 ** 60,), jnp.uint8) + x)
    monkeypatch.setattr(step_lib, 'jit_train_step', lambda *args: lambda state, batch: too_large(1))
    config = demo.get_config()
    config.data_dir, config.batch_size = str(data_dir), 32
    config.model.embed_dims, config.model.depths = (16, 32, 64, 128), (1, 1, 1, 1)
    with pytest.raises(train.DoesNotFit, match=r'at 32 images per device \(remat .none.\) does not fit the device '
                                               r'memory: Out of memory allocating .*--config.model.remat=block') as e:
        train.run(config, str(tmp_path / 'run'))
    assert '\n' not in str(e.value)


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
