"""Which form XLA:CPU differentiates a strided convolution faster in, by the host's instruction set."""

from __future__ import annotations

import functools


def strided_conv_gradient_form(channels: int, ho: int, wo: int, avx512: bool) -> str:
    """'patches' (patches times a matmul) or 'lax' (XLA's own convolution gradient) for a strided conv
    with `channels` input channels and an ho x wo output.

    Measured per ISA (docs/performance.md): with AVX2 the patches form won everywhere, by 1.5-5x.
    With AVX-512 XLA's gradient wins where the input has few channels: the RGB stem, and v1's
    32 -> 64 stem conv at 112 -> 56; with more channels at that size the two were level in isolation
    but the lax gradient made a restv2_tiny step slower, and from 56 -> 28 down the patches form wins.
    """
    if avx512 and (channels <= 4 or (channels <= 32 and ho * wo >= 56 * 56)):
        return 'lax'
    return 'patches'


@functools.cache
def host_has_avx512() -> bool:
    """Whether this host's CPU has AVX-512 (Linux's /proc/cpuinfo; False where it cannot tell)."""
    try:
        with open('/proc/cpuinfo') as f:
            return 'avx512f' in f.read().split()
    except OSError:
        return False
