"""How rest_jax's Pallas kernels (`tpu_attention`, `tpu_mlp`) are lowered, and what they tell XLA.

A kernel is compiled by Mosaic where the program is lowered for a TPU (a TPU-only `jax.export` artifact
included, whatever host lowers it) and run by Pallas's interpreter on any other platform (the tests on
a CPU): decided when the program is lowered, not by the host that traces it. Each kernel carries its
FLOPs, transcendentals and bytes for XLA's cost model, which otherwise sees an opaque call.

XLA's partitioner cannot split a Pallas call over devices (it would gather the whole batch onto
every chip, and Mosaic refuses to be partitioned at all), so the kernels split the batch over the mesh
in context themselves (`batch_axes`), and the ops take their portable forms where a batch may be split
over devices with no mesh in context to split it by (`splittable`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P


def on_platform(kernel_call: Callable, *args):
    """`kernel_call(*args, interpret=...)`: Mosaic's kernel in a program lowered for a TPU, Pallas's
    interpreter in one lowered for any other platform."""
    return lax.platform_dependent(*args, tpu=functools.partial(kernel_call, interpret=False),
                                  default=functools.partial(kernel_call, interpret=True))


def cost(batch, **figures) -> pl.CostEstimate | None:
    """The kernel's cost for XLA's estimates; none for a symbolic batch (a `jax.export` for any batch)."""
    return pl.CostEstimate(**figures) if isinstance(batch, int) else None


def splittable() -> bool:
    """Whether a kernel can run here: a mesh is in context, or the program has a single device."""
    return not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1


def batch_axes(batch: int) -> tuple[str, ...] | None:
    """The axes of the mesh in context to split a batch over by hand (`jax.shard_map`); none with no
    mesh or one device, inside a shard_map (the arrays are local already), or for a batch they do not
    divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes or batch % mesh.size:
        return None
    return tuple(mesh.axis_names)


def split_batch(local: Callable, batch, n_params: int, n_args: int) -> Callable:
    """local(params..., x, ...) over the batch split across the mesh in context (`jax.shard_map`, where
    `batch_axes` splits it): the first `n_params` arguments replicated, the `n_args` after them and
    every result split along axis 0."""
    axes = batch_axes(batch)
    if not axes:
        return local
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(*[P()] * n_params, *[P(axes)] * n_args), out_specs=P(axes), check_vma=False)


def local_batch(batch: int) -> int:
    """The batch one kernel call sees: a share of the mesh in context where `batch_axes` splits it."""
    return batch // jax.sharding.get_abstract_mesh().size if batch_axes(batch) else batch


# Bytes of VMEM a kernel's grid step may take, as the kernels estimate it (blocks, their second buffers,
# scratch). Cores of v5e, v5p and v6e have 95-128 MiB of VMEM, of which Mosaic's default limit lets a
# kernel use a part (16 MiB on v5p): there the kernels ask for VMEM_LIMIT and plan for VMEM_BUDGET (a
# quarter left for what the estimates do not count), for longer bands and larger blocks than 12 MB
# under the default gave (docs/tpu.md). Cores with 16 MiB in all (v2-v4) keep Mosaic's default limit:
# there 12 MB of estimate overran the 16 MiB in the attention kernels of stages 3 and 4 on v4.
VMEM_BUDGET = 24 << 20
VMEM_LIMIT = 32 << 20
SMALL_VMEM_BUDGET = 8 << 20
SMALL_VMEM_KINDS = ('TPU v2', 'TPU v3', 'TPU v4')


def _small_vmem() -> bool:
    """Whether the program is traced for cores with 16 MiB of VMEM: the device kind of the mesh in
    context (its abstract device), else of the default device."""
    device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
    kind = device.device_kind if device is not None else jax.devices()[0].device_kind
    return kind.startswith(SMALL_VMEM_KINDS)


def vmem_budget() -> int:
    """VMEM_BUDGET, or SMALL_VMEM_BUDGET where the program is traced for cores with 16 MiB of VMEM."""
    return SMALL_VMEM_BUDGET if _small_vmem() else VMEM_BUDGET


def compiler_params(*dimension_semantics: str):
    """Mosaic's parameters for a kernel: its grid's semantics, and VMEM_LIMIT where the cores have more
    than 16 MiB of VMEM (Mosaic's default limit elsewhere)."""
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics,
                                vmem_limit_bytes=None if _small_vmem() else VMEM_LIMIT)


LANES = 128   # a vector register's lanes
NARROW_CHANNELS = 192   # channels up to which XLA may put the batch in the lanes (`fills_lanes`)


def fills_lanes(batch) -> bool:
    """Whether XLA's TPU layout of a block's narrow activations (at most NARROW_CHANNELS) puts the batch
    in the lanes (batch-minor: (N, C, B) in memory, for a per-device batch that is a multiple of 128);
    else it keeps the channels minor. A symbolic batch (a `jax.export` for any batch) does not."""
    return isinstance(batch, int) and batch % LANES == 0
