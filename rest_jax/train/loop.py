"""run(config, workdir): the whole training job, from an empty or a preempted workdir to the final eval."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rest_jax import ops, pretrained
from rest_jax.models.registry import create_model, model_info
from rest_jax.train import checkpoint as ckpt
from rest_jax.train import metrics as mlog
from rest_jax.train import optimizer, sharding, state as state_lib, step as step_lib


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the run stopped without saving the poisoned state."""


class DoesNotFit(ValueError):
    """The training step needs more memory than a device has."""


def config_overrides(config) -> dict[str, Any]:
    """create_model overrides that config.model gives: the architecture fields set, and num_classes
    where it differs from the variant's."""
    overrides = {k: tuple(config.model[k]) for k in ('embed_dims', 'depths', 'num_heads') if config.model[k] is not None}
    if config.model.num_classes != model_info(config.model.name).num_classes:
        overrides['num_classes'] = config.model.num_classes
    return overrides


def model_spec(config, workdir: str) -> tuple[str, dict[str, Any], str | None]:
    """(variant, overrides, note): the architecture to build.

    A resumed run takes it from its own workdir; a fine-tuning run from its init_from checkpoint (whose
    architecture may be a reduced or custom one), keeping only config.model.num_classes; otherwise from
    config.model (name plus any embed_dims / depths / num_heads given).
    """
    meta = pretrained.read_metadata(workdir, pretrained.WORKDIR_FORMAT)
    if meta is not None:
        return meta['model'], dict(meta['config']), None
    if config.init_from:
        source = pretrained.read_metadata(config.init_from)
        if source is None:
            raise ValueError(f'config.init_from={config.init_from!r} is neither a converted checkpoint nor a training '
                             f'workdir (no {pretrained.METADATA}); convert official weights with python -m rest_jax.convert')
        if source['model'] != config.model.name:
            raise ValueError(f'config.init_from holds a {source["model"]} but config.model.name is '
                             f'{config.model.name!r}; set --config.model.name={source["model"]}')
        overrides = {k: v for k, v in source['config'].items() if k != 'num_classes'}
        note = f'architecture from {config.init_from}: {source["model"]} {overrides or "(registered)"}'
    else:
        overrides, note = config_overrides(config), None
    if config.model.num_classes != model_info(config.model.name).num_classes:
        overrides['num_classes'] = config.model.num_classes
    return config.model.name, overrides, note


def build_model(config, name: str, overrides: dict[str, Any], devices) -> Any:
    """The model a run trains: `create_model(name, **overrides)` with the config's drop path, dtype and
    remat, and the kernel forms for `devices`, the devices the step is compiled for (never the host's
    default backend: a TPU program compiled on a CPU host must not get the CPU forms)."""
    impl = ops.resolve(config.model.conv_impl or config.model.impl, devices)
    return create_model(name, **overrides, drop_path_rate=config.model.drop_path_rate,
                        dtype=jnp.dtype(config.dtype), impl=impl, remat=config.model.remat)


def _initial_variables(config, model, image_size: int) -> dict[str, Any]:
    """init_from's weights; a head of another size replaced by a fresh one (rest_jax.reset_classifier)."""
    loaded_model, loaded = pretrained.load_pretrained(config.init_from, ema=config.init_from_ema)
    old_head = loaded['params'].get('head', {})
    if loaded_model.num_classes != model.num_classes:
        # The key of a fresh run's init: the new head is the one model.init would have given.
        _, loaded = pretrained.reset_classifier(loaded_model, loaded, model.num_classes, jax.random.key(config.seed))
    new_head = loaded['params'].get('head', {})
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    expected = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
    flat = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    for path, spec in expected.items():
        if path not in flat:
            raise ValueError(f'init_from: {config.init_from} has no {jax.tree_util.keystr(path)}')
        if flat[path].shape != spec.shape:
            raise ValueError(f'init_from: {jax.tree_util.keystr(path)} has shape {flat[path].shape} there, {spec.shape} here')
    extra = set(flat) - set(expected)
    if extra:
        raise ValueError(f'init_from: unexpected entries {sorted(map(jax.tree_util.keystr, extra))[:4]}')
    reinit = [f"['params']['head'][{k!r}] {getattr(old_head.get(k), 'shape', None)} -> {new_head[k].shape}"
              for k in sorted(new_head) if new_head[k] is not old_head.get(k)]
    mlog.log(f'init_from {config.init_from}{" (EMA)" if config.init_from_ema else ""}: loaded {len(flat) - len(reinit)} '
             f'arrays' + (f'; head re-initialised for {model.num_classes} classes: {", ".join(reinit)}' if reinit else ''))
    return jax.tree.map(lambda x, spec: jnp.asarray(x, spec.dtype), loaded, abstract)


def _schedule_points(config, steps_per_epoch: int) -> tuple[int, int]:
    every_eval = config.eval_every_steps or steps_per_epoch
    every_ckpt = config.checkpoint_every_steps or steps_per_epoch
    return every_eval, every_ckpt


def evaluate(eval_step, variables, config, batch_sharding) -> dict[str, float]:
    """Top-1 / top-5 / loss over the whole eval split, each example once (padding masked out)."""
    from rest_jax import data
    total = None
    for batch in data.eval_iterator(config):
        out = eval_step(variables, data.make_global(batch, batch_sharding))
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    if total is None:
        raise ValueError(f'the eval split {config.data.eval_split!r} is empty')
    total = jax.device_get(total)
    count = max(float(total['count']), 1.0)
    return {'top1': float(total['correct1']) / count, 'top5': float(total['correct5']) / count,
            'eval_loss': float(total['loss_sum']) / count, 'eval_count': float(total['count'])}


def run(config, workdir: str) -> dict[str, float]:
    """Train (or resume) `config` in `workdir`, evaluating and checkpointing on the way.

    Args:
      config: a locked ml_collections.ConfigDict with configs/common.py's fields.
      workdir: checkpoints, metrics.jsonl, tensorboard/ and the model spec go here. A workdir with
        checkpoints is resumed from its newest one.

    Returns:
      The final metrics: 'step', 'top1', 'top5' (and 'ema_top1', 'ema_top5' with an EMA).

    Raises:
      NonFiniteLoss: the loss became NaN/Inf (the checkpoints written before stay valid).
      DoesNotFit (a ValueError): the training step needs more memory than a device has.
      ValueError: a config that does not fit the data or the devices.
    """
    if config.init_from is None:  # the fine-tuning configs leave it unset on purpose
        raise ValueError('this config fine-tunes a trained model: pass --config.init_from=DIR (a training workdir '
                         "or a converted checkpoint), or --config.init_from='' to train from scratch")
    from rest_jax import data  # tensorflow lives behind this import, never behind `import rest_jax`
    workdir = workdir if '://' in str(workdir) else os.path.abspath(workdir)  # gs:// stays a URL
    info = data.dataset_info(config)
    if config.model.num_classes != info.num_classes:
        raise ValueError(f'config.model.num_classes={config.model.num_classes} but {config.dataset} has '
                         f'{info.num_classes} classes; set --config.model.num_classes={info.num_classes}')
    images_per_update = config.batch_size * config.update_freq
    steps_per_epoch = max(info.num_train // images_per_update, 1)
    total_steps = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    every_eval, every_ckpt = _schedule_points(config, steps_per_epoch)

    name, overrides, note = model_spec(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    model = build_model(config, name, overrides, mesh.devices)
    eval_model = model
    tx, lr_fn = optimizer.make_optimizer(config, steps_per_epoch, total_steps)
    if config.batch_size % mesh.size:
        raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of the {mesh.size} devices')
    batch_sharding = sharding.batch_sharding(mesh)
    checkpoints = ckpt.Checkpoints(workdir, config.keep_checkpoints, 'ema_top1' if config.ema_decay > 0 else 'top1')
    preprocessing = {**model_info(name).preprocessing(), 'input_size': config.image_size,
                     'crop_pct': config.data.crop_pct, 'interpolation': config.data.interpolation,
                     'mean': list(config.data.mean), 'std': list(config.data.std),
                     'num_classes': config.model.num_classes}
    mlog.log(f'jax {jax.__version__}, {jax.process_count()} process(es), {jax.device_count()} {jax.default_backend()} '
             f'device(s), mesh {dict(mesh.shape)}; {config.dataset}: {info.num_train} train / {info.num_eval} eval '
             f'images, {info.num_classes} classes; {total_steps} updates of {images_per_update} images '
             f'({steps_per_epoch} per epoch)')
    if note:
        mlog.log(note)

    start = checkpoints.latest_step()
    if start is not None:
        target = state_lib.abstract_state(model, tx, config.image_size, config.seed, mesh)
        state = checkpoints.restore(target, start)
        shardings = jax.tree.map(lambda x: x.sharding, target)
        mlog.log(f'resumed from {checkpoints.directory}/{start}')
    else:
        init_vars = _initial_variables(config, model, config.image_size) if config.init_from else None
        state, shardings = state_lib.create_state(model, tx, config.image_size, config.seed, mesh, init_vars)
        start = 0
        pretrained.write_workdir_metadata(workdir, name, overrides, preprocessing, config.to_json_best_effort(indent=2) + '\n')
    mlog.log(f'{name} {overrides or ""}\n' + mlog.parameter_table(state_lib.count_by_stage(state.params)))

    train_step = step_lib.jit_train_step(model, tx, lr_fn, config, mesh, shardings)
    eval_step = jax.jit(sharding.traced_in(mesh, step_lib.make_eval_step(eval_model)))

    writer = mlog.MetricWriter(workdir, total_steps)
    preemption = ckpt.Preemption()
    progress = mlog.Progress(start, total_steps, images_per_update)
    first_prof, last_prof = (int(v) for v in config.profile_steps)
    step, previous, results = start, None, {}

    def check(metrics, at: int) -> None:
        if not bool(metrics['finite']):
            raise NonFiniteLoss(f'non-finite loss or gradients at step {at} (loss {float(metrics["loss"]):.4g}, gradient '
                                f'norm {float(metrics["grad_norm"]):.4g}); stopped without saving it. '
                                f'The checkpoints in {checkpoints.directory} are intact; lower config.lr or '
                                f'use dtype float32, then rerun to resume from the last one')

    def run_eval(at: int) -> dict[str, float]:
        out = {k: v for k, v in evaluate(eval_step, state.variables(), config, batch_sharding).items()}
        if config.ema_decay > 0:
            out.update({f'ema_{k}': v for k, v in
                        evaluate(eval_step, state.variables(ema=True), config, batch_sharding).items()
                        if k in ('top1', 'top5')})
        writer.write(at, out)
        mlog.log(f'eval at step {at}: top-1 {out["top1"]:.2%}  top-5 {out["top5"]:.2%}' +
                 (f'  | EMA top-1 {out["ema_top1"]:.2%}  top-5 {out["ema_top5"]:.2%}' if 'ema_top1' in out else '') +
                 f'  ({int(out["eval_count"])} images)')
        return out

    try:
        train_iter = data.train_iterator(config, start_step=start)
        while step < total_steps:
            if first_prof and step + 1 == first_prof:
                jax.profiler.start_trace(os.path.join(workdir, 'profile'))
            batch = data.make_global(next(train_iter), batch_sharding)
            try:
                state, metrics = train_step(state, batch)
            except jax.errors.JaxRuntimeError as e:
                detail = step_lib.out_of_memory(e)
                if detail is None:
                    raise
                remat = '--config.model.remat=block, ' if config.model.remat == 'none' else ''
                raise DoesNotFit(
                    f'the training step of {name} at {config.batch_size // mesh.size} images per device (remat '
                    f'{config.model.remat!r}) does not fit the device memory: {detail}; use {remat}a larger '
                    f'--config.mesh.fsdp, or a smaller --config.batch_size with a larger --config.update_freq') from None
            step += 1
            if previous is not None:  # one step late: the device already works on this step
                check(*previous)
            previous = (metrics, step)
            if first_prof and step == last_prof:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                mlog.log(f'profiler trace of steps {first_prof}-{last_prof} in {workdir}/profile')
            stop = preemption.requested(step)
            do_log = step % config.log_every_steps == 0 or step == total_steps or step == start + 1
            do_eval = step % every_eval == 0 or step == total_steps
            do_save = do_eval or step % every_ckpt == 0 or stop
            if do_log or do_eval or do_save:
                check(metrics, step)
                previous = None
            if do_log:
                metrics = jax.device_get(metrics)
                line, rate = progress.line(step, float(metrics['loss']), float(metrics['lr']))
                mlog.log(line)
                writer.write(step, {'loss': metrics['loss'], 'lr': metrics['lr'],
                                    'grad_norm': metrics['grad_norm'], 'images_per_s': rate})
            if do_eval:
                results = {'step': step, **run_eval(step)}
            if do_save:
                best = {k: results[k] for k in ('top1', 'ema_top1') if k in results} if do_eval else None
                checkpoints.save(step, state, best)
            if do_eval or do_save:
                progress.reset(step)
            if stop:
                checkpoints.wait()
                mlog.log(f'preempted (SIGTERM): saved step {step} in {checkpoints.directory}; rerun to resume')
                return {'step': step, 'preempted': 1.0, **{k: v for k, v in results.items() if k != 'step'}}
        if previous is not None:
            check(*previous)
        if not results or results.get('step') != step:  # resumed at the very end: evaluate what is there
            results = {'step': step, **run_eval(step)}
        checkpoints.wait()
        if config.predict_examples:
            use_ema = results.get('ema_top1', -1.0) > results['top1']  # the better of the two evaluated
            _show_predictions(config, model, state.variables(ema=use_ema), 'EMA' if use_ema else 'final', info)
        return results
    finally:
        writer.close()
        preemption.close()
        checkpoints.close()


def _show_predictions(config, model, variables, which: str, info) -> None:
    """Predict the first eval images with rest_jax.predict and print them beside their labels."""
    from rest_jax import data
    from rest_jax.inference import predict
    batch = next(iter(data.eval_iterator(config, process_index=0, process_count=1)))
    n = min(config.predict_examples, int(batch['mask'].sum()))
    variables = jax.device_get(variables)
    names = getattr(info, 'class_names', None) or [str(i) for i in range(info.num_classes)]
    eval_model = model.clone(drop_path_rate=0.0)
    out = predict(eval_model, variables, np.asarray(batch['image'][:n]), top_k=min(3, info.num_classes),
                  class_names=list(names))
    mlog.log(f'predictions on {n} held-out images (rest_jax.predict, {which} weights):')
    for i in range(n):
        guesses = ', '.join(f'{name} {p:.2f}' for name, p in zip(out.names[i], out.probs[i]))
        truth = names[int(batch['label'][i])]
        mlog.log(f'  image {i}: label {truth} -> {guesses}{"" if out.names[i][0] == truth else "   (wrong)"}')
