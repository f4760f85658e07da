"""XLA's TPU figures for one ResTv2 block's training step, upsample branch (or attention, or MLP) in each form, without a TPU.

    pip install -r requirements-tpu.txt
    python docs/tpu_forms.py [--target v5p:2x2x1] [--batch-per-chip 128] [--stages 1 2 3]
    python docs/tpu_forms.py --attention [--stages 1 2 3 4]
    python docs/tpu_forms.py --mlp
    python docs/tpu_forms.py --upsample-kernels [--stages 1 2 3 4]

For each stage of restv2_tiny (its width, heads and reduction ratio; 224 x 224 input, so 7 x 7 reduced
values) it compiles the gradient of one block for the target's chips, batch split over them, bfloat16,
and prints XLA's bytes accessed and time estimate per chip with three forms of the upsample branch:
the portable form (grouped conv, then PixelShuffle), the transposed conv differentiated by autodiff,
and the transposed conv with rest_jax.ops.tpu's custom VJP (the TPU form at ratios 4 and 8). Compiler
estimates, not measurements; ~10 minutes on a 2-core host. The figures behind
rest_jax.ops.tpu.TRANSPOSED_RATIOS (docs/tpu.md). With --attention: the TPU forms with the portable
attention and with the attention kernels (rest_jax.ops.tpu_attention). With --mlp: the TPU forms with
the portable MLP and with the MLP kernels (rest_jax.ops.tpu_mlp), for the first two stages' blocks of
restv2_tiny, restv2_large and rest_lite, and the second of rest_base (the figures behind tpu_mlp.fits).
With --upsample-kernels: the TPU forms with the upsample branch and its LayerNorm as XLA ops (the
forms above, then the portable norm) and as the kernels (rest_jax.ops.tpu_upsample).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from rest_jax import deviceless, hlo_stats, ops  # noqa: E402
from rest_jax.models import rest, rest_v2  # noqa: E402
from rest_jax.ops import portable, tpu, tpu_mlp  # noqa: E402

STAGES = {1: (96, 1, 8, 56), 2: (192, 2, 4, 28), 3: (384, 4, 2, 14), 4: (768, 8, 1, 7)}   # width, heads, ratio, side
# The blocks of --mlp: (ResT version, width, heads, ratio, side).
MLP_BLOCKS = {'restv2_tiny stage 1': (2, 96, 1, 8, 56), 'restv2_tiny stage 2': (2, 192, 2, 4, 28),
              'restv2_large stage 1': (2, 128, 2, 8, 56), 'restv2_large stage 2': (2, 256, 4, 4, 28),
              'rest_lite stage 1': (1, 64, 1, 8, 56), 'rest_lite stage 2': (1, 128, 2, 4, 28),
              'rest_base stage 2': (1, 192, 2, 4, 28)}


def _normed(branch):
    """An upsample form `branch(x, kernel, bias, ratio)` with the `norm` and `add` arguments of
    `ops.upsample`: the portable LayerNorm and sum after it."""
    def form(x, kernel, bias, ratio, norm=None, add=None):
        return portable.finish_upsample(branch(x, kernel, bias, ratio), norm, add, portable.layer_norm)
    return form


def _autodiff_transposed(x, kernel, bias, ratio):
    """The transposed-conv form without the custom VJP (the kernel gradient by autodiff)."""
    return tpu._transposed_upsample.fun(x, kernel, bias, ratio)


FORMS = {'portable': portable.upsample, 'transposed, autodiff': _normed(_autodiff_transposed),
         'transposed, custom VJP': _normed(tpu._transposed_upsample)}


def block_step(stage, devices, per_chip: int, upsample=None, attention=None, mlp=None, branch=None) -> dict:
    """One block's gradient: the portable forms with `upsample` as the upsample branch, or (given
    `attention`, `mlp` or `branch`) the TPU forms with `attention` as EMSA's attention, `mlp` as the MLP
    or `branch` as the upsample branch with its norm. `stage` is a restv2_tiny stage, or a name in
    MLP_BLOCKS."""
    version, c, heads, r, side = MLP_BLOCKS[stage] if stage in MLP_BLOCKS else (2, *STAGES[stage])
    block = (rest_v2.Block(heads, r, 0.0, jnp.bfloat16) if version == 2
             else rest.Block(heads, sr_ratio=r, dtype=jnp.bfloat16))
    mesh = Mesh(np.array(devices), ('data',))
    x = jax.ShapeDtypeStruct((per_chip * len(devices), side, side, c), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P('data')))
    params = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, side, side, c), jnp.bfloat16))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), params)

    def loss(params, x):
        with ops.kernel_forms('xla' if upsample is not None else 'tpu'), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jnp.sum(jnp.square(block.apply(params, x).astype(jnp.float32)))

    module, name, form = ((portable, 'upsample', upsample) if upsample is not None else
                          (tpu, 'attention', attention) if attention is not None else
                          (tpu, 'upsample', branch) if branch is not None else (tpu, 'mlp', mlp))
    saved = getattr(module, name)
    setattr(module, name, form)
    try:
        start = time.perf_counter()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    finally:
        setattr(module, name, saved)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gathers = hlo_stats.collectives(compiled.as_text()).get('all-gather', {})
    return {'bytes': cost['bytes accessed'], 'seconds': cost.get('optimal_seconds', -1.0),
            'gathered': gathers.get('bytes', 0), 'compile_s': time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--target', default='v5p:2x2x1')
    parser.add_argument('--batch-per-chip', type=int, default=128)
    parser.add_argument('--stages', type=int, nargs='+', choices=sorted(STAGES))
    parser.add_argument('--attention', action='store_true', help='compare the attention forms instead')
    parser.add_argument('--mlp', action='store_true', help='compare the MLP forms instead')
    parser.add_argument('--upsample-kernels', action='store_true',
                        help='compare the upsample branch with its norm as XLA ops and as kernels instead')
    args = parser.parse_args()
    stages = (list(MLP_BLOCKS) if args.mlp else
              args.stages or ([1, 2, 3, 4] if args.attention or args.upsample_kernels else [1, 2, 3]))
    devices = deviceless.topology_devices(args.target)
    print(f'one block, training step, {args.batch_per_chip} per chip on {args.target} '
          f'({len(devices)} chips), bfloat16; XLA per chip (compiler estimates)')
    if args.mlp:
        # the MLP kernels for every width (the rule in tpu_mlp.fits lifted), with the LayerNorm before
        # them apart (XLA's) or inside, against the portable MLP
        def apart(x, w1, b1, w2, b2, dtype, norm=None):
            return tpu_mlp.mlp(x if norm is None else portable.layer_norm(x, *norm, dtype), w1, b1, w2, b2, dtype)
        forms = {'portable MLP': dict(mlp=portable.mlp), 'MLP kernels, norm apart': dict(mlp=apart),
                 'MLP kernels, norm inside': dict(mlp=tpu_mlp.mlp)}
    elif args.upsample_kernels:
        forms = {'XLA ops': dict(branch=_normed(tpu._upsample)), 'kernels': dict(branch=tpu.upsample)}
    elif args.attention:
        forms = {'portable attention': dict(attention=portable.attention), 'attention kernels': dict(attention=tpu.attention)}
    else:
        forms = {name: dict(upsample=form) for name, form in FORMS.items()}
    kind = 'MLP' if args.mlp else 'attention' if args.attention else 'upsample'
    print(f'| block | {kind} form | bytes accessed | XLA estimate | activations all-gathered | compile |')
    print('|---|---|---:|---:|---:|---:|')
    for stage in stages:
        for name, form in forms.items():
            f = block_step(stage, devices, args.batch_per_chip, **form)
            est = f'{f["seconds"] * 1e3:.2f} ms' if f['seconds'] > 0 else '-'
            label = stage if args.mlp else f'{stage} (r = {STAGES[stage][2]})'
            print(f'| {label} | {name} | {f["bytes"] / 1e9:.2f} GB | {est} | '
                  f'{f["gathered"] / 1e6:.0f} MB | {f["compile_s"]:.0f} s |', flush=True)


if __name__ == '__main__':
    main()
