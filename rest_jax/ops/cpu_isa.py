"""The host's CPU (vendor, family, model, ISA), and the fixed rule for a strided convolution's gradient
form that `cpu_tune` falls back on where forms are not timed on the host."""

from __future__ import annotations

import functools
import platform


def strided_conv_gradient_form(channels: int, ho: int, wo: int, avx512: bool) -> str:
    """'patches' (patches times a matmul) or 'lax' (XLA's own convolution gradient) for a strided conv
    with `channels` input channels and an ho x wo output.

    The fallback where timing is off (cpu_tune). Measured per ISA on Zen 3 and Zen 5 only (docs/performance.md;
    it picks the slower form for v1's 32 -> 64 stem conv on an Intel AVX-512 machine): with AVX2 the patches form won everywhere, by 1.5-5x.
    With AVX-512 XLA's gradient wins where the input has few channels: the RGB stem, and v1's
    32 -> 64 stem conv at 112 -> 56; with more channels at that size the two were level in isolation
    but the lax gradient made a restv2_tiny step slower, and from 56 -> 28 down the patches form wins.
    """
    if avx512 and (channels <= 4 or (channels <= 32 and ho * wo >= 56 * 56)):
        return 'lax'
    return 'patches'


@functools.cache
def host_cpu() -> dict[str, str]:
    """This host's CPU as /proc/cpuinfo names it: vendor, family, model, name and the widest vector ISA
    ('avx512', 'avx2', 'sse2' or, off Linux x86, 'unknown'), so that figures from different machines
    can be told apart."""
    fields: dict[str, str] = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, sep, value = line.partition(':')
                if not sep:
                    if fields:
                        break   # the first processor is enough
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get('flags', '').split())
    isa = ('avx512' if 'avx512f' in flags else 'avx2' if 'avx2' in flags else 'sse2' if 'sse2' in flags
           else 'unknown')
    return {'vendor': fields.get('vendor_id', 'unknown'), 'family': fields.get('cpu family', '?'),
            'model': fields.get('model', '?'), 'name': fields.get('model name', platform.processor() or 'unknown'),
            'isa': isa}


def describe_cpu(cpu: dict[str, str] | None = None) -> str:
    """'AMD EPYC (AuthenticAMD family 25 model 17, avx512)'."""
    cpu = cpu or host_cpu()
    return f"{cpu['name']} ({cpu['vendor']} family {cpu['family']} model {cpu['model']}, {cpu['isa']})"


def host_has_avx512() -> bool:
    """Whether this host's CPU has AVX-512 (Linux's /proc/cpuinfo; False where it cannot tell)."""
    return host_cpu()['isa'] == 'avx512'
