"""How rest_jax's Pallas kernels (`tpu_attention`, `tpu_mlp`) are lowered, and what they tell XLA.

A kernel is compiled by Mosaic where the program is lowered for a TPU (a TPU-only `jax.export` artifact
included, whatever host lowers it) and run by Pallas's interpreter on any other platform (the tests on
a CPU): decided when the program is lowered, not by the host that traces it. Each kernel carries its
FLOPs, transcendentals and bytes for XLA's cost model, which otherwise sees an opaque call.
"""

from __future__ import annotations

import functools
from typing import Callable

from jax import lax
from jax.experimental import pallas as pl


def on_platform(kernel_call: Callable, *args):
    """`kernel_call(*args, interpret=...)`: Mosaic's kernel in a program lowered for a TPU, Pallas's
    interpreter in one lowered for any other platform."""
    return lax.platform_dependent(*args, tpu=functools.partial(kernel_call, interpret=False),
                                  default=functools.partial(kernel_call, interpret=True))


def cost(batch, **figures) -> pl.CostEstimate | None:
    """The kernel's cost for XLA's estimates; none for a symbolic batch (a `jax.export` for any batch)."""
    return pl.CostEstimate(**figures) if isinstance(batch, int) else None
