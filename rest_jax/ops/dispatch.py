"""Which kernel forms a program uses: 'xla' (portable), 'cpu' or 'tpu', resolved for the devices it is compiled for.

The setting (`impl`) is 'auto', 'xla', 'cpu' or 'tpu'. 'auto' resolves from the platform of the devices the
program is compiled for, never from the host's default backend: a TPU program compiled on a CPU host
(deviceless compilation) must not get the CPU forms. In order of precedence, those devices are the
ones passed in (a mesh's devices, a topology's), the mesh set with `jax.set_mesh`, the default device.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import jax
import numpy as np

IMPLS = ('auto', 'xla', 'cpu', 'tpu')
ALIASES = {'lax': 'xla', 'shift': 'cpu'}   # the names of the former `conv_impl` setting

_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar('rest_jax_kernel_forms', default=None)
# False inside `kernel_forms(timing=False)`: CPU forms are not timed on the host there (cpu_tune).
TIMING: contextvars.ContextVar[bool] = contextvars.ContextVar('rest_jax_cpu_form_timing', default=True)


def canonical(impl: str) -> str:
    """`impl` as one of IMPLS (the aliases 'lax' and 'shift' accepted); ValueError otherwise."""
    impl = ALIASES.get(impl, impl)
    if impl not in IMPLS:
        raise ValueError(f"kernel forms (impl) must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def target_platform(devices: Any = None) -> str:
    """The platform ('cpu', 'gpu', 'tpu', ...) of `devices` (a list, an array of devices or a Mesh), else
    of the mesh set with `jax.set_mesh`, else of the default device."""
    if devices is not None:
        devices = getattr(devices, 'devices', devices)   # a Mesh
        platforms = {d.platform for d in np.ravel(np.asarray(devices, dtype=object))}
        if len(platforms) != 1:
            raise ValueError(f'devices of one platform expected, got {sorted(platforms)}')
        return platforms.pop()
    device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
    if device is not None:
        return device.platform
    default = jax.config.jax_default_device
    if default is not None:
        return default if isinstance(default, str) else default.platform
    return jax.devices()[0].platform


def resolve(impl: str = 'auto', devices: Any = None) -> str:
    """'xla', 'cpu' or 'tpu': `impl` itself, or for 'auto' the forms of `target_platform(devices)` (the
    portable 'xla' forms on GPUs and other platforms)."""
    impl = canonical(impl)
    if impl != 'auto':
        return impl
    return platform_forms(target_platform(devices))


def platform_forms(platform: str) -> str:
    """The forms a platform runs: 'cpu' and 'tpu' their own, any other (GPUs) the portable 'xla'."""
    return platform if platform in ('cpu', 'tpu') else 'xla'


@contextlib.contextmanager
def kernel_forms(impl: str = 'auto', devices: Any = None, timing: bool = True) -> Iterator[str]:
    """Run the ops inside with the forms `impl` names. 'auto' keeps an enclosing choice, if any.
    `timing=False`: CPU forms are not timed on the host inside (`cpu_tune`: the cached choice or the rule)."""
    outer = _ACTIVE.get()
    impl = canonical(impl)
    chosen = outer if impl == 'auto' and devices is None and outer is not None else resolve(impl, devices)
    token = _ACTIVE.set(chosen)
    timing_token = None if timing else TIMING.set(False)
    try:
        yield chosen
    finally:
        if timing_token is not None:
            TIMING.reset(timing_token)
        _ACTIVE.reset(token)


def active() -> str:
    """The forms in effect: the enclosing `kernel_forms`, else 'auto' resolved now."""
    chosen = _ACTIVE.get()
    return chosen if chosen is not None else resolve('auto')
