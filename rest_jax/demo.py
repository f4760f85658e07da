"""A tour of the models: the variant table, then a jitted forward pass (no data, no network needed).

    python -m rest_jax.demo [--model restv2_tiny] [--batch-size 2] [--image-size 224] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import rest_jax


def count_params(name: str) -> int:
    """Parameters of a registered variant, counted from shapes alone (no memory, no FLOPs)."""
    model = rest_jax.create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes['params']))


def variant_table() -> str:
    """The eight variants as a Markdown table: our parameter count beside the official figures."""
    rows = ['| variant | params | official GFLOPs @224 | official top-1 @224 | eval crop_pct |',
            '|---|---:|---:|---:|---:|']
    for name in rest_jax.list_models():
        info = rest_jax.model_info(name)
        rows.append(f'| {name} | {count_params(name) / 1e6:.2f} M | {info.gflops} | {info.top1} | {info.crop_pct} |')
    return '\n'.join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m rest_jax demo', description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='restv2_tiny', choices=rest_jax.list_models())
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    args = parser.parse_args(argv)

    print(variant_table())
    print(f'\njax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))')
    model = rest_jax.create_model(args.model, dtype=jnp.dtype(args.dtype))
    size = args.image_size
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    images = jax.random.normal(jax.random.key(1), (args.batch_size, size, size, 3))

    forward = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method=model.forward_features)))
    start = time.perf_counter()
    compiled = forward.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, images))
    start = time.perf_counter()
    logits, feats = jax.block_until_ready(compiled(variables, images))
    run_s = time.perf_counter() - start
    print(f'{args.model} ({args.dtype}), batch {args.batch_size} at {size}x{size}, random weights and images:')
    print(f'  compile {compile_s:.1f} s, forward {run_s * 1e3:.0f} ms ({args.batch_size / run_s:.1f} images/s)')
    print(f'  logits {tuple(logits.shape)} {logits.dtype}, finite: {bool(jnp.isfinite(logits).all())}')
    print('  stage outputs (NHWC): ' + ', '.join(str(tuple(f.shape)) for f in feats))


if __name__ == '__main__':
    main()
