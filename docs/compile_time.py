"""Compile time of a reduced restv2_tiny's init and gradient on this host (docs/testing.md).

    python docs/compile_time.py                                          # XLA's defaults
    JAX_DISABLE_MOST_OPTIMIZATIONS=1 python docs/compile_time.py         # the test suite's level
    JAX_DISABLE_MOST_OPTIMIZATIONS=1 XLA_FLAGS=--xla_cpu_use_fusion_emitters=false python docs/compile_time.py

Each setting in its own process (XLA reads its flags once); nothing is cached between them.
"""
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('REST_JAX_CPU_TUNE', 'off')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import rest_jax  # noqa: E402

model = rest_jax.create_model('restv2_tiny', embed_dims=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_classes=10)
x = jnp.ones((2, 64, 64, 3))
variables = jax.eval_shape(model.init, jax.random.key(0), x)
for name, fn, args in [('model.init', model.init, (jax.random.key(0), x)),
                       ('gradient', jax.grad(lambda v: model.apply(v, x).sum()), (variables,))]:
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    traced = time.perf_counter()
    lowered.compile()
    print(f'{name:10}  trace and lower {traced - start:5.1f} s   compile {time.perf_counter() - traced:5.1f} s')
