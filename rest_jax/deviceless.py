"""The TPU program of train.py's step or of inference, compiled on any host for a TPU slice, with XLA's figures.

    python -m rest_jax.deviceless --target v5p:2x2x2 --model restv2_tiny --mode train --batch-per-chip 128
    python -m rest_jax.deviceless --target v5e:4x4 --model restv2_base --mesh.fsdp 4 --json
    python -m rest_jax.deviceless --target v5p:2x2x2 --mode infer --all     # the eight variants, a table

No TPU is needed, only libtpu (`pip install -r requirements-tpu.txt`): libtpu describes a slice by its
topology name (`jax.experimental.topologies`), and XLA compiles for its devices exactly as it would on
the slice. What is compiled is built by train.py's own functions: the variant's recipe from configs/,
the optimizer (train.optimizer), the state and its shardings (train.state, train.sharding) and the
jitted step with its donation (train.step.jit_train_step). Inference is `model.apply(train=False)`
jitted over the same mesh, parameters laid out as in training, images split over every chip.

Every figure is per chip and comes from the compiler, not from a run: XLA's cost analysis (FLOPs,
bytes accessed, its own time estimate), its buffer assignment (memory), the optimized HLO (collectives,
where the bytes go: rest_jax.hlo_stats). The roofline time is max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth) with Google's published peaks per chip (CHIPS); MFU divides the model's analytic FLOPs
(rest_jax.models.macs: 2 x MACs, x 3 for a training step) by peak FLOP/s x that time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from rest_jax import hlo_stats
from rest_jax.models.macs import count_macs
from rest_jax.models.registry import list_models
from rest_jax.train import loop, optimizer, sharding, state as state_lib, step as step_lib

IMAGENET_TRAIN = 1_281_167  # sets the schedule's length only: the program is the same for any value
TOPOLOGY_FORMS = ('v4:2x2x1, v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:2x2x2, v5p:4x4x4, v6e:2x2, v6e:8x8 (TPU generation:chip grid); '
                  'h100:8, a100:8 (GPU:count, memory figures only)')


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip peaks (cloud.google.com/tpu/docs/<generation>)."""
    name: str
    bf16_flops: float      # dense bfloat16 FLOP/s
    hbm_bandwidth: float   # bytes/s
    hbm_bytes: float       # HBM capacity


CHIPS = {  # by device_kind, as libtpu names the topology's devices
    'TPU v3': Chip('v3', 123e12, 900e9, 32 * 2 ** 30),
    'TPU v4': Chip('v4', 275e12, 1200e9, 32 * 2 ** 30),
    'TPU v5 lite': Chip('v5e', 197e12, 819e9, 16e9),
    'TPU v5': Chip('v5p', 459e12, 2765e9, 95e9),
    'TPU v6 lite': Chip('v6e', 918e12, 1638e9, 32e9),
    'NVIDIA H100 80GB HBM3': Chip('h100', 989e12, 3350e9, 80e9),   # SXM, dense bf16 (nvidia.com/h100)
    'NVIDIA A100-SXM4-80GB': Chip('a100', 312e12, 2039e9, 80e9),   # (nvidia.com/a100)
}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What XLA's GPU compiler needs to know of an NVIDIA GPU it compiles for without one: NVIDIA's
    published figures (the data sheet and the CUDA programming guide's per-compute-capability limits)."""
    name: str                 # device kind, as the driver names it
    compute_capability: tuple[int, int]
    sms: int
    memory_bytes: int
    memory_bandwidth: float   # bytes/s
    clock_ghz: float          # boost clock
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    l2_bytes: int

    def target_config(self) -> str:
        """A GpuTargetConfigProto in text form: the device description XLA compiles against."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32  threads_per_core_limit: 2048
  shared_memory_per_block: 49152  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  shared_memory_per_core: {self.shared_memory_per_sm}  core_count: {self.sms}  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
  memory_bandwidth: {int(self.memory_bandwidth)}  l2_cache_size: {self.l2_bytes}  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{self.name}"
"""


GPUS = {
    'h100': Gpu('NVIDIA H100 80GB HBM3', (9, 0), 132, 84_942_979_072, 3.35e12, 1.98, 233_472, 232_448, 50 * 2 ** 20),
    'a100': Gpu('NVIDIA A100-SXM4-80GB', (8, 0), 108, 85_899_345_920, 2.039e12, 1.41, 167_936, 166_912, 40 * 2 ** 20),
}
# Autotuning runs candidate kernels, which needs a GPU: compile with XLA's default GEMMs instead.
GPU_COMPILER_OPTIONS = {'xla_gpu_enable_triton_gemm': False, 'xla_gpu_autotune_level': 0}


class TargetError(ValueError):
    """A target, batch or mesh that cannot be compiled; the message is one line saying what to change."""


@contextlib.contextmanager
def _quiet_stderr():
    """Hide what libtpu prints while it starts on a host that is not a TPU VM (no accelerator type, no
    worker hostnames): harmless warnings for a compile-only topology, written by C++ to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(target: str) -> list[jax.Device]:
    """The compile-only devices of a TPU slice named like 'v5p:2x2x2' (one device per chip), or of
    `count` GPUs named like 'h100:8'.

    Raises:
      TargetError: libtpu (or the CUDA plugin) is not installed, or the name is unknown.
    """
    if target.split(':')[0].lower() in GPUS:
        return gpu_devices(target)
    if importlib.util.find_spec('libtpu') is None:
        raise TargetError('compiling for a TPU target needs libtpu (about 700 MB), which is not installed: '
                          'pip install -r requirements-tpu.txt')
    from jax.experimental import topologies
    # libtpu takes a lockfile so that two processes never drive one TPU; a compile-only topology drives
    # none, so a second compile (or a second test worker) beside the first is no conflict.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    # v4 chips hold two TensorCores; 'megacore' makes one device of both, as on a real v4 slice.
    options = {'chip_config_name': 'megacore'} if target.split(':')[0].lower() == 'v4' else {}
    try:
        with _quiet_stderr():
            jax.devices()  # starts the host's backends (and libtpu's warnings) inside the silence
            return list(topologies.get_topology_desc(topology_name=target, platform='tpu', **options).devices)
    except Exception as e:  # libtpu raises a generic runtime error, for a bad name as for anything else
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if 'INVALID_ARGUMENT' not in reason and 'topology' not in reason.lower():
            raise TargetError(f'libtpu could not describe {target!r}: {reason}') from None
        raise TargetError(f'unknown TPU topology {target!r} ({reason}); accepted forms: {TOPOLOGY_FORMS}') from None


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA plugin (jax-cuda12-plugin) is importable."""
    try:
        return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
    except ImportError:   # no jax_plugins package at all
        return False


def gpu_devices(target: str) -> list[jax.Device]:
    """Compile-only devices for 'h100:8' (GPU kind:count), from jax's CUDA plugin; no GPU or driver needed."""
    kind, _, count = target.partition(':')
    if not count.isdigit() or int(count) < 1:
        raise TargetError(f'a GPU target is kind:count, e.g. h100:8, got {target!r}; accepted forms: {TOPOLOGY_FORMS}')
    if not cuda_plugin_installed():
        raise TargetError(f'compiling for a GPU target needs jax\'s CUDA plugin, which is not installed: '
                          f"pip install 'jax[cuda12-local]=={jax.__version__}' (the plugin, without CUDA's libraries)")
    from jax.experimental import topologies
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')   # there is no driver to check
    with _quiet_stderr():
        jax.devices()
        topo = topologies.get_topology_desc(platform='cuda', topology_name='', topology=f'1x1x{int(count)}',
                                            target_config=GPUS[kind.lower()].target_config())
    return list(topo.devices)


def recipe_config(name: str, config_file: str | None = None):
    """The ml_collections config train.py runs for variant `name` (configs/<file>.py), or `config_file`."""
    import importlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)  # configs/ imports `configs.common`, as train.py arranges
    if config_file is None:
        files = {'rest_lite': 'rest_lite', 'rest_small': 'rest_s', 'rest_base': 'rest_b', 'rest_large': 'rest_l',
                 'restv2_tiny': 'restv2_t', 'restv2_small': 'restv2_s', 'restv2_base': 'restv2_b',
                 'restv2_large': 'restv2_l'}
        module = importlib.import_module(f'configs.{files[name]}')
    else:
        spec = importlib.util.spec_from_file_location('deviceless_config', config_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    config = module.get_config()
    if config_file is None and config.model.name != name:
        raise TargetError(f'configs/{files[name]}.py trains {config.model.name}, not {name}')
    return config


@dataclasses.dataclass
class CompiledTarget:
    """A program compiled for a TPU slice, with what built it."""
    compiled: Any            # jax.stages.Compiled
    mesh: jax.sharding.Mesh
    model: Any
    config: Any
    mode: str
    target: str
    params: int              # parameter count
    lower_s: float
    compile_s: float


def compile_for_target(target: str, name: str = 'restv2_tiny', mode: str = 'train', batch_per_chip: int | None = None,
                       *, batch_size: int | None = None, dtype: str | None = None, fsdp: int = 1,
                       image_size: int | None = None, config=None, remat: str | None = None,
                       impl: str | None = None, **overrides: Any) -> CompiledTarget:
    """Compile train.py's step (mode 'train') or jitted inference ('infer') for a TPU slice, without a TPU.

    Args:
      target: a libtpu topology name, e.g. 'v5p:2x2x2' (see TOPOLOGY_FORMS).
      name: a registered variant; its recipe config (configs/) supplies everything train.py reads.
      mode: 'train' (one optimizer update, state donated) or 'infer' (logits of a batch).
      batch_per_chip: images per chip; default: the recipe's global batch / 8 (its 8 GPUs).
      batch_size: the global batch instead (config.batch_size); must divide over the devices.
      dtype: 'bfloat16' | 'float32'; default: the config's.
      fsdp: the mesh's fsdp axis size (config.mesh.fsdp); data takes the other devices.
      image_size: default: the config's (224).
      config: a config to use instead of the variant's recipe (its model.name wins over `name`).
      remat: config.model.remat ('none', 'block' or a jax.checkpoint_policies name); default: the config's.
      impl: config.model.impl; default 'auto', resolved for the target's devices (the TPU forms, rest_jax.ops.tpu).
      **overrides: create_model arguments (a reduced architecture: embed_dims, depths, num_classes...).

    Raises:
      TargetError / ValueError: unknown topology, libtpu missing, a batch or fsdp size that does not fit.
    """
    if mode not in ('train', 'infer'):
        raise TargetError(f"mode must be 'train' or 'infer', got {mode!r}")
    config = recipe_config(name) if config is None else config.copy_and_resolve_references()  # the caller's stays
    name = config.model.name
    devices = topology_devices(target)
    n = len(devices)
    if batch_size is None:
        batch_size = (batch_per_chip or max(config.batch_size // 8, 1)) * n
    micro = batch_size // config.update_freq
    if batch_size < 1 or batch_size % config.update_freq or micro % n:
        raise TargetError(f'a batch of {batch_size} images ({config.update_freq} micro-batch(es)) does not divide '
                          f'over the {n} devices of {target}: use a multiple of {n * config.update_freq}')
    config.batch_size, config.mesh.fsdp, config.mesh.data = batch_size, fsdp, -1
    config.dtype = dtype or config.dtype
    config.image_size = image_size or config.image_size
    config.model.remat = remat or config.model.remat
    config.model.impl = impl or config.model.impl
    model = loop.build_model(config, name, {**loop.config_overrides(config), **overrides}, devices)   # train.py's model, forms for the target
    mesh = sharding.make_mesh(config.mesh, devices)
    steps_per_epoch = max(IMAGENET_TRAIN // batch_size, 1)
    tx, lr_fn = optimizer.make_optimizer(config, steps_per_epoch, config.num_epochs * steps_per_epoch)
    state = state_lib.abstract_state(model, tx, config.image_size, config.seed, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    # Training: images in the computation dtype, as the input pipeline delivers them
    # (rest_jax.data.pipeline.image_dtype); inference: float32, as rest_jax.inference.preprocess gives.
    image_dtype = jnp.dtype(config.dtype) if mode == 'train' else jnp.float32
    images = jax.ShapeDtypeStruct((batch_size, config.image_size, config.image_size, 3), image_dtype,
                                  sharding=batch_sharding)
    start = time.perf_counter()
    if mode == 'train':
        shardings = jax.tree.map(lambda x: x.sharding, state)
        step = step_lib.jit_train_step(model, tx, lr_fn, config, mesh, shardings)
        labels = jax.ShapeDtypeStruct((batch_size, model.num_classes), jnp.float32, sharding=batch_sharding)
        lowered = step.lower(state, {'image': images, 'label': labels})
    else:
        infer = jax.jit(sharding.traced_in(mesh, lambda variables, x: model.apply(variables, x, train=False)),
                        out_shardings=batch_sharding)
        lowered = infer.lower({'params': state.params, 'batch_stats': state.batch_stats}, images)
    lower_s = time.perf_counter() - start
    options = GPU_COMPILER_OPTIONS if devices[0].platform in ('gpu', 'cuda') else None
    try:
        with _quiet_stderr():
            compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        detail = step_lib.out_of_memory(e)
        if detail is None:
            raise
        what = ("a kernel's blocks do not fit the chip's on-chip memory (VMEM), whatever the batch: report it, "
                'and use --impl xla (the portable forms) meanwhile' if 'memory space vmem' in detail
                else 'use --remat block or a smaller --batch-per-chip')
        raise TargetError(f'{name} ({mode}, {batch_size // n} images per chip) does not fit {target}: {detail}; '
                          f'{what}') from None
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    return CompiledTarget(compiled, mesh, model, config, mode, target, params, lower_s,
                          time.perf_counter() - start - lower_s)


def report(ct: CompiledTarget, top: int = 10) -> dict[str, Any]:
    """Per-chip figures of a compiled target as a JSON-ready dict (see the module docstring)."""
    compiled, config, mesh = ct.compiled, ct.config, ct.mesh
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}   # None for a GPU target
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    device = mesh.devices.flat[0]
    chip = CHIPS.get(device.device_kind)
    per_chip = config.batch_size // mesh.size
    macs = count_macs(ct.model, config.image_size)['total']
    model_flops = 2 * macs * per_chip * (3 if ct.mode == 'train' else 1)
    gpu = device.platform in ('gpu', 'cuda')
    flops = float(cost['flops']) if 'flops' in cost else None
    bytes_accessed = float(cost['bytes accessed']) if 'bytes accessed' in cost else None
    xla_s = float(cost.get('optimal_seconds', -1.0))
    mem = {k: int(getattr(memory, f'{k}_size_in_bytes')) for k in ('argument', 'output', 'alias', 'temp')}
    mem['peak'] = mem['argument'] + mem['output'] + mem['temp'] - mem['alias']
    mem['code'] = int(memory.generated_code_size_in_bytes)
    rows = [] if gpu else hlo_stats.op_bytes(text)   # op_bytes counts TPU layouts (8 x 128 tiles)
    out: dict[str, Any] = {
        'target': ct.target, 'device_kind': device.device_kind, 'chips': mesh.size,
        'mesh': {k: int(v) for k, v in mesh.shape.items()}, 'model': config.model.name,
        'architecture': {k: list(v) if isinstance(v, tuple) else v for k, v in _arch(ct.model).items()},
        'mode': ct.mode, 'dtype': config.dtype, 'image_size': config.image_size,
        'params': ct.params, 'batch_per_chip': per_chip, 'global_batch': config.batch_size,
        'impl': ct.model.impl, 'remat': ct.model.remat,
        'jax_version': jax.__version__, 'lower_s': ct.lower_s, 'compile_s': ct.compile_s,
        'flops': flops, 'model_flops': float(model_flops),
        'flops_ratio': flops / model_flops if flops is not None and model_flops else None,
        'bytes_accessed': bytes_accessed, 'bytes_per_image': bytes_accessed / per_chip if bytes_accessed is not None else None,
        'memory': mem, 'xla_seconds': xla_s if xla_s > 0 else None,
        'collectives': hlo_stats.collectives(text), 'top_bytes': rows[:top],
        'bytes_by_layer': hlo_stats.bytes_by_layer(rows, top), 'op_bytes_sum': sum(r['bytes'] for r in rows),
    }
    if chip is not None:
        out.update(chip=dataclasses.asdict(chip), memory_fraction=mem['peak'] / chip.hbm_bytes)
    if chip is not None and flops is not None and bytes_accessed is not None:
        t_flops, t_bytes = flops / chip.bf16_flops, bytes_accessed / chip.hbm_bandwidth
        step_s = max(t_flops, t_bytes)
        out.update(roofline={
            'flops_s': t_flops, 'bytes_s': t_bytes, 'step_s': step_s,
            'bound': 'FLOPs' if t_flops >= t_bytes else 'HBM'},
            images_per_s=per_chip / step_s if step_s else None,
            mfu_roofline=model_flops / (chip.bf16_flops * step_s) if step_s else None,
            mfu_xla=model_flops / (chip.bf16_flops * xla_s) if xla_s > 0 else None)
    return out


def _arch(model) -> dict[str, Any]:
    return {k: getattr(model, k) for k in ('embed_dims', 'depths', 'num_heads', 'num_classes') if hasattr(model, k)}


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(x) >= scale:
            return f'{x / scale:.3g} {prefix}{unit}'
    return f'{x:.3g} {unit}'


def describe(r: dict[str, Any]) -> str:
    """A report as text: one figure a line, then the collectives and where the bytes go."""
    m, per = r['memory'], r['batch_per_chip']
    lines = [f"{r['model']} {r['mode']}, {r['dtype']}, {per} images/chip at {r['image_size']}, on {r['target']} "
             f"({r['chips']} x {r['device_kind']}, mesh {r['mesh']}, kernel forms {r['impl']}, remat {r['remat']}, jax {r['jax_version']})",
             f"  compile             {r['lower_s']:.1f} s lowering + {r['compile_s']:.1f} s XLA (this host)",
             (f"  FLOPs (XLA)         {_si(r['flops'], 'FLOP')}  = {r['flops_ratio']:.2f} x the analytic "
              f"{_si(r['model_flops'], 'FLOP')} (2 x MACs{', x 3 for training' if r['mode'] == 'train' else ''})"
              if r['flops'] is not None else
              f"  FLOPs, bytes        n/a: XLA's compiler gives no cost analysis for {r['device_kind']} (memory only)"),
             *([f"  bytes accessed      {_si(r['bytes_accessed'], 'B')}  ({_si(r['bytes_per_image'], 'B')} per image)"]
               if r['bytes_accessed'] is not None else []),
             f"  memory              peak {_si(m['peak'], 'B')} = arguments {_si(m['argument'], 'B')} + outputs "
             f"{_si(m['output'], 'B')} + temporaries {_si(m['temp'], 'B')} - aliased {_si(m['alias'], 'B')}"
             + (f"  ({r['memory_fraction']:.1%} of {_si(r['chip']['hbm_bytes'], 'B')} HBM)" if 'chip' in r else '')]
    if 'roofline' in r:
        rf, c = r['roofline'], r['chip']
        lines.append(f"  roofline            {rf['step_s'] * 1e3:.2f} ms: max(FLOPs / {_si(c['bf16_flops'], 'FLOP/s')} = "
                     f"{rf['flops_s'] * 1e3:.2f} ms, bytes / {_si(c['hbm_bandwidth'], 'B/s')} = {rf['bytes_s'] * 1e3:.2f} ms),"
                     f" {rf['bound']}-bound: {r['images_per_s']:.0f} images/s per chip, MFU {r['mfu_roofline']:.1%}")
    elif 'chip' not in r:
        lines.append(f"  roofline            no published peaks for {r['device_kind']} in rest_jax.deviceless.CHIPS")
    if r['xla_seconds']:
        lines.append(f"  XLA's estimate      {r['xla_seconds'] * 1e3:.2f} ms"
                     + (f": {per / r['xla_seconds']:.0f} images/s per chip, MFU {r['mfu_xla']:.1%}" if r.get('mfu_xla') else ''))
    if r['collectives']:
        for kind, c in sorted(r['collectives'].items()):
            lines.append(f"  {kind:<19} {c['count']:>4} x, {_si(c['bytes'], 'B')} in all, groups of "
                         f"{'/'.join(map(str, c['group_sizes'])) or '?'} chips")
    else:
        lines.append('  collectives         none')
    if not r['bytes_by_layer']:
        return '\n'.join(lines)
    lines.append(f"  bytes by layer, every block, forward and backward (all ops: {_si(r['op_bytes_sum'], 'B')} counting "
                 f"whole operands and layout padding; XLA counts {_si(r['bytes_accessed'], 'B')}):")
    lines.extend(f"    {_si(b, 'B'):>9}  {layer}" for layer, b in r['bytes_by_layer'])
    lines.append(f"  bytes by op (the top {len(r['top_bytes'])}):")
    for row in r['top_bytes']:
        lines.append(f"    {_si(row['bytes'], 'B'):>9}  {row['op']:<15} {row['source'][:64]:<64} {row['shape']}")
    return '\n'.join(lines)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per variant: the figures the README's TPU table shows."""
    head = ('| model | FLOPs / analytic | bytes / image | peak memory | roofline | images/s/chip | MFU (roofline) '
            '| XLA estimate | compile |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    rows = []
    for r in results:
        rf = r.get('roofline')
        rows.append(f"| {r['model']} | "
                    + (f"{_si(r['flops'], 'FLOP')} / {r['flops_ratio']:.2f} | {_si(r['bytes_per_image'], 'B')} "
                       if r['flops'] is not None else '- | - ')
                    + f"| {_si(r['memory']['peak'], 'B')} | "
                    + (f"{rf['step_s'] * 1e3:.1f} ms ({rf['bound']}) | {r['images_per_s']:.0f} | {r['mfu_roofline']:.0%} | "
                       if rf else '- | - | - | ')
                    + (f"{r['xla_seconds'] * 1e3:.1f} ms" if r['xla_seconds'] else '-') + f" | {r['compile_s']:.0f} s |")
    return '\n'.join([head] + rows)


def json_object(text: str) -> dict[str, Any]:
    """An --arch value: a JSON object of create_model overrides (argparse type)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e}): {text!r}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object of create_model overrides, got {text!r}')
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m rest_jax deviceless', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--target', required=True, help=f'a TPU topology or GPUs: {TOPOLOGY_FORMS}')
    parser.add_argument('--model', default='restv2_tiny', choices=list_models())
    parser.add_argument('--all', action='store_true', help='every variant, as a Markdown table')
    parser.add_argument('--mode', default='train', choices=['train', 'infer'])
    size = parser.add_mutually_exclusive_group()
    size.add_argument('--batch-per-chip', type=int, help="images per chip (default: the recipe's batch / 8)")
    size.add_argument('--batch-size', type=int, help='the global batch instead (config.batch_size)')
    parser.add_argument('--dtype', choices=['bfloat16', 'float32'], help="default: the recipe's (bfloat16)")
    parser.add_argument('--image-size', type=int, help="default: the recipe's (224)")
    parser.add_argument('--mesh.fsdp', dest='fsdp', type=int, default=1, help='fsdp axis size (config.mesh.fsdp)')
    parser.add_argument('--remat', help="recompute blocks in the backward pass: none, block or a jax.checkpoint_policies "
                                            "name (default: the recipe's, none)")
    parser.add_argument('--impl', choices=['auto', 'xla', 'cpu', 'tpu'],
                        help='kernel forms (default auto: the TPU forms on a TPU, the portable forms on a GPU)')
    parser.add_argument('--config', help='a configs/*.py file instead of the variant\'s recipe (e.g. a 384 fine-tune)')
    parser.add_argument('--arch', type=json_object, default={}, metavar='JSON',
                        help='create_model overrides, e.g. \'{"embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}\'')
    parser.add_argument('--top', type=int, default=10, help='ops listed by bytes')
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of text')
    args = parser.parse_args(argv)
    if (args.batch_per_chip is not None and args.batch_per_chip < 1) or (args.image_size is not None and args.image_size < 32):
        parser.error('need --batch-per-chip >= 1 and --image-size >= 32')
    if {'impl', 'conv_impl', 'remat', 'dtype'} & set(args.arch):
        parser.error('--arch: set the kernel forms, remat and dtype with --impl, --remat and --dtype')
    names = list_models() if args.all else [args.model]
    results = []
    for name in names:
        try:
            config = recipe_config(name, args.config) if args.config else None
            ct = compile_for_target(args.target, name, args.mode, args.batch_per_chip, batch_size=args.batch_size,
                                    dtype=args.dtype, fsdp=args.fsdp, image_size=args.image_size, config=config,
                                    remat=args.remat, impl=args.impl,
                                    **args.arch)
        except ValueError as e:  # TargetError, make_mesh's and create_model's one-line messages
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)
        r = report(ct, args.top)
        results.append(r)
        if not args.json:
            print(describe(r), flush=True)
    if args.json:
        print(json.dumps({'results': results} if args.all else results[0], default=list))
    elif args.all:
        print(f"\n{args.mode}, {results[0]['dtype']}, {results[0]['batch_per_chip']} images/chip, "
              f"{args.target} ({results[0]['device_kind']}), jax {jax.__version__}; compiler estimates:\n")
        print(markdown_table(results))


if __name__ == '__main__':
    main()
