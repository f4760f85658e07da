"""Model throughput: images/s, compile time, memory, parameters, analytic MACs and MFU.

    python -m rest_jax.benchmark --model restv2_tiny --batch-size 8 --image-size 224 \\
        --mode infer|train --dtype float32|bfloat16 [--json]
    python -m rest_jax.benchmark --all                  # the eight variants as a Markdown table
    python -m rest_jax.benchmark --official ~/ResT      # the official PyTorch code side by side
    python -m rest_jax.benchmark --target v5p:2x2x2 --mode train   # compiled for a TPU slice, no TPU needed
                                                                   # (rest_jax.deviceless: compiler estimates)

Protocol: compile first (timed apart), two warm-up calls, then `--repeats` timed calls, each waited
for; the figure is the median. `--mode train` times a whole optimizer step (forward, backward and
AdamW update) on synthetic images and labels, with BatchNorm in train mode and a dropout rng. Needs
neither tensorflow nor torch; torch is imported only for `--official`. On Linux the command restarts
itself once with glibc's huge-page tunable set (see rest_jax.host; REST_JAX_HUGE_PAGES=0 opts out);
the output says whether huge pages were on.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import resource   # page faults and kernel time per step (Unix)
except ImportError:
    resource = None

import rest_jax
from rest_jax import host
from rest_jax import deviceless, ops
from rest_jax.ops import cpu_isa, cpu_tune
from rest_jax.models.macs import count_macs

# Dense peak FLOP/s per device, by device_kind substring (first match wins): (bfloat16, float32).
# GPUs: float32 matmuls run as TF32 on tensor cores (XLA's default precision), so float32 is held to
# the TF32 peak. TPUs: XLA's default precision computes float32 matmuls in bfloat16 passes.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ('H200', 989e12, 495e12),
    ('H100 PCIe', 756e12, 378e12),
    ('H100', 989e12, 495e12),            # SXM and NVL
    ('A100', 312e12, 156e12),
    ('L4', 121e12, 60e12),
    ('A10', 125e12, 62.5e12),
    ('TPU v6', 918e12, 918e12),          # v6e (Trillium)
    ('TPU v5 lite', 197e12, 197e12),     # v5e
    ('TPU v5e', 197e12, 197e12),
    ('TPU v5', 459e12, 459e12),          # v5p
    ('TPU v4', 275e12, 275e12),
]


def peak_flops(device: jax.Device, dtype: str) -> float | None:
    """The device's dense peak for `dtype`, or None where it is not in PEAK_FLOPS (CPUs, unknown kinds)."""
    if device.platform == 'cpu':
        return None
    for kind, bf16, fp32 in PEAK_FLOPS:
        if kind.lower() in device.device_kind.lower():
            return bf16 if dtype == 'bfloat16' else fp32
    return None


def num_params(variables: Any) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))


def time_calls(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
               host_costs: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved round-robin so that load on a shared machine
    falls on all of them alike. Each call must return only once its work is done.

    With several functions, each timed call follows an untimed one of the same function: the first
    call after another model's was not the steady state. On the 2-core VM of this project's CPU
    figures, a restv2_tiny training step right after an official PyTorch step took 2.0 s instead of
    0.8 s (0.8 s of kernel time zeroing fresh pages; the next call was back at 0.8 s), which no
    training run sees.

    With `host_costs` (a dict to fill), also records per name the process's minor page faults and
    kernel CPU seconds per timed call, where the platform reports them (`resource`, Unix).
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    totals = {name: [0.0, 0.0] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if len(calls) > 1:
                call()
            before = _rusage()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            after = _rusage()
            if before and after:
                totals[name][0] += after[0] - before[0]
                totals[name][1] += after[1] - before[1]
    if host_costs is not None and _rusage():
        host_costs.update({name: [faults / repeats, kernel / repeats] for name, (faults, kernel) in totals.items()})
    return times


def _rusage() -> tuple[int, float] | None:
    """(minor page faults, kernel CPU seconds) of this process so far, or None without `resource`."""
    if resource is None:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def build(name: str, mode: str = 'infer', batch_size: int = 8, image_size: int = 224, dtype: str = 'float32',
          **overrides: Any) -> dict[str, Any]:
    """Compile the forward pass ('infer') or a whole AdamW step ('train') of a variant on synthetic data.

    Args:
      name: a registered variant.
      mode: 'infer' (eval-mode logits) or 'train' (forward, backward, AdamW update, BatchNorm statistics).
      batch_size, image_size: the synthetic batch (square images, NHWC).
      dtype: computation dtype, 'float32' or 'bfloat16' (parameters stay float32).
      **overrides: passed to `create_model` (e.g. `impl`, a reduced architecture).

    Returns:
      A dict with `call` (runs one step and waits for it), the model, `compile_seconds`, `num_params`,
      `macs_per_image`, `xla_flops_per_image` (XLA's cost analysis, for comparison) and `memory_bytes`.
    """
    if mode not in ('infer', 'train'):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    if dtype not in ('float32', 'bfloat16'):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if batch_size < 1 or image_size < 32:
        raise ValueError(f'need batch_size >= 1 and image_size >= 32, got {batch_size} and {image_size}')
    # The kernel forms of the device the benchmark runs on ('auto' resolved here, for that device).
    impl = overrides.pop('impl', 'auto')
    impl = ops.resolve(overrides.pop('conv_impl', None) or impl, jax.devices()[:1])
    model = rest_jax.create_model(name, dtype=jnp.dtype(dtype), impl=impl, **overrides)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    images = jax.random.normal(jax.random.key(1), (batch_size, image_size, image_size, 3))
    classes = max(model.num_classes, 1)
    labels = jax.random.randint(jax.random.key(2), (batch_size,), 0, classes)

    if mode == 'infer':
        fn = jax.jit(lambda v, x: model.apply(v, x))
        args = (variables, images)
    else:
        tx = optax.adamw(1e-3, weight_decay=0.05)

        def loss_fn(params, batch_stats, x, y, rng):
            out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                       mutable=['batch_stats'], rngs={'dropout': rng})
            if out.shape[-1] != classes:   # num_classes=0: pooled features, a stand-in loss
                out = out[:, :classes]
            loss = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), y).mean()
            return loss, updates['batch_stats']

        def step(state, x, y):
            params, batch_stats, opt_state, rng = state
            rng, drop_rng = jax.random.split(rng)
            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y, drop_rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), batch_stats, opt_state, rng), loss

        # The state is donated: each step updates parameters and optimizer moments in place.
        fn = jax.jit(step, donate_argnums=0)
        params = variables['params']
        args = ((params, variables['batch_stats'], tx.init(params), jax.random.key(3)), images, labels)

    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_seconds = time.perf_counter() - start

    if mode == 'infer':
        def call():
            jax.block_until_ready(compiled(*args))
    else:
        holder = [args[0]]

        def call():
            holder[0], loss = compiled(holder[0], *args[1:])
            jax.block_until_ready(loss)

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get('flops', 0.0)) if cost else 0.0
    memory = compiled.memory_analysis()
    memory_bytes = None
    if memory is not None:
        memory_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return dict(call=call, compiled=compiled, model=model, compile_seconds=compile_seconds,
                num_params=num_params(variables),
                macs_per_image=count_macs(model, image_size)['total'],
                xla_flops_per_image=xla_flops / batch_size, memory_bytes=memory_bytes)


def _peak_memory(device: jax.Device, planned: int | None) -> tuple[int | None, str]:
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
        return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
    return planned, "XLA's buffer plan (arguments + outputs + temporaries)"


def benchmark(name: str, mode: str = 'infer', batch_size: int = 8, image_size: int = 224, dtype: str = 'float32',
              repeats: int = 10, official: str | None = None, official_compile: bool = False,
              **overrides: Any) -> dict[str, Any]:
    """Time one variant (optionally beside the official PyTorch code) and return the figures.

    Args:
      name, mode, batch_size, image_size, dtype, **overrides: as `build`.
      repeats: timed calls after two warm-up calls; the median is reported.
      official: path of a clone of wofmanaf/ResT; its model is timed interleaved with ours (needs torch).
      official_compile: also time the official model under torch.compile (inference only).

    Returns:
      A JSON-able dict: images_per_sec, step_ms (median) and step_ms_min, compile_seconds,
      macs_per_image, xla_flops_per_image, num_params, peak_memory_bytes, mfu (None without a known
      accelerator peak), the device, host_huge_pages (rest_jax.host), page_faults_per_step and
      kernel_seconds_per_step (None where not reported), and `official` figures when asked for.
    """
    with cpu_tune.recording() as cpu_forms:   # the CPU kernel forms measured (or read) for this program
        built = build(name, mode, batch_size, image_size, dtype, **overrides)
    calls = {'rest_jax': built['call']}
    if official:
        calls.update(official_calls(official, name, mode, batch_size, image_size, official_compile, **overrides))
    host_costs: dict[str, list[float]] = {}
    times = time_calls(calls, repeats, host_costs=host_costs)
    median = statistics.median(times['rest_jax'])
    device = jax.devices()[0]
    images_per_sec = batch_size / median
    # Forward = 2 FLOPs per MAC; a training step ~3x the forward (backward = two matmuls per forward one).
    flops_per_image = 2 * built['macs_per_image'] * (3 if mode == 'train' else 1)
    peak = peak_flops(device, dtype)
    memory, memory_source = _peak_memory(device, built['memory_bytes'])
    result = dict(
        model=name, mode=mode, dtype=dtype, batch_size=batch_size, image_size=image_size,
        images_per_sec=images_per_sec, step_ms=median * 1e3, step_ms_min=min(times['rest_jax']) * 1e3,
        repeats=repeats, compile_seconds=built['compile_seconds'], num_params=built['num_params'],
        macs_per_image=built['macs_per_image'], xla_flops_per_image=built['xla_flops_per_image'],
        peak_memory_bytes=memory, peak_memory_source=memory_source,
        mfu=images_per_sec * flops_per_image / peak if peak else None,
        mfu_note=(f'against {peak / 1e12:.0f} TFLOP/s ({device.device_kind}, {dtype})' if peak else
                  f'no peak FLOP/s known for {device.device_kind!r} ({device.platform}); MFU omitted'),
        backend=jax.default_backend(), device_kind=device.device_kind, device_count=jax.device_count(),
        cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
        jax_version=jax.__version__, cpu=cpu_isa.host_cpu(), host_huge_pages=host.huge_pages_status(),
        page_faults_per_step=host_costs['rest_jax'][0] if host_costs else None,
        kernel_seconds_per_step=host_costs['rest_jax'][1] if host_costs else None,
        impl=built['model'].impl, cpu_forms=cpu_forms)
    if official:
        result['official'] = {key: dict(images_per_sec=batch_size / statistics.median(t),
                                        step_ms=statistics.median(t) * 1e3,
                                        page_faults_per_step=host_costs[key][0] if host_costs else None)
                              for key, t in times.items() if key != 'rest_jax'}
    return result


def official_calls(path: str, name: str, mode: str, batch_size: int, image_size: int, compile_too: bool,
                   **overrides: Any) -> dict[str, Callable[[], None]]:
    """One step of the official PyTorch model from a clone of wofmanaf/ResT at `path` (same protocol)."""
    try:
        import torch
    except ImportError:
        raise SystemExit('--official needs torch (pip install torch); rest_jax itself does not') from None
    if not os.path.isfile(os.path.join(path, 'models', 'rest_v2.py')):
        raise SystemExit(f'--official: {path} has no models/rest_v2.py; pass a clone of wofmanaf/ResT')
    sys.path.insert(0, os.path.abspath(path))
    try:
        from models import rest, rest_v2  # the official modules (they import timm)
    except ImportError as e:
        raise SystemExit(f'--official: importing the official models failed ({e}); they need timm') from None
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())
    info = rest_jax.model_info(name)
    arch = {k: list(v) if isinstance(v, tuple) else v for k, v in {**info.arch, **overrides}.items()
            if k not in ('impl', 'conv_impl')}
    model = (rest.ResT if name.startswith('rest_') else rest_v2.ResTV2)(**arch)
    x = torch.randn(batch_size, 3, image_size, image_size)
    if mode == 'train':
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        y = torch.randint(0, max(getattr(model, 'num_classes', 1000), 1), (batch_size,))

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return {'official eager': step}
    model.eval()

    def runner(m):
        def run():
            with torch.inference_mode():
                m(x)
        return run
    calls = {'official eager': runner(model)}
    if compile_too:
        calls['official torch.compile'] = runner(torch.compile(model))
    return calls


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The figures of several runs as a Markdown table."""
    with_official = sorted({k for r in results for k in r.get('official', {})})
    head = ['variant', 'params', 'GMACs', 'compile s', 'images/s', 'ms/step', 'memory MiB', 'MFU']
    head += [f'{k} images/s' for k in with_official]
    rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' + '---:|' * (len(head) - 1)]
    for r in results:
        cells = [r['model'], f"{r['num_params'] / 1e6:.2f} M", f"{r['macs_per_image'] / 1e9:.2f}",
                 f"{r['compile_seconds']:.1f}", f"{r['images_per_sec']:.1f}", f"{r['step_ms']:.0f}",
                 f"{r['peak_memory_bytes'] / 2 ** 20:.0f}" if r['peak_memory_bytes'] else 'n/a',
                 f"{r['mfu']:.1%}" if r['mfu'] is not None else 'n/a']
        cells += [f"{r['official'][k]['images_per_sec']:.1f}" if k in r.get('official', {}) else '' for k in with_official]
        rows.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def describe(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} {r['mode']} ({r['dtype']}, batch {r['batch_size']} at {r['image_size']}, "
             f"{r['backend']}: {r['device_kind']}, {r['cpu_count']} CPUs of {cpu_isa.describe_cpu(r['cpu'])}, "
             f"kernel forms {r['impl']})",
             f"  images/s        {r['images_per_sec']:.1f}  (median {r['step_ms']:.1f} ms/step, "
             f"best {r['step_ms_min']:.1f}, {r['repeats']} runs)",
             f"  compile         {r['compile_seconds']:.1f} s",
             f"  parameters      {r['num_params'] / 1e6:.2f} M",
             f"  MACs per image  {r['macs_per_image'] / 1e9:.3f} G analytic (conv, linear, attention matmuls); "
             f"XLA cost analysis: {r['xla_flops_per_image'] / 2e9:.3f} G (flops / 2)",
             "  peak memory     " + (f"{r['peak_memory_bytes'] / 2 ** 20:.0f} MiB ({r['peak_memory_source']})"
                                      if r['peak_memory_bytes'] else 'n/a'),
             "  MFU             " + (f"{r['mfu']:.1%} {r['mfu_note']}" if r['mfu'] is not None else r['mfu_note']),
             f"  host huge pages {r['host_huge_pages']}"
             + (f"; {r['page_faults_per_step']:.0f} page faults and {r['kernel_seconds_per_step']:.3f} s of "
                "kernel time per step" if r['page_faults_per_step'] is not None else '')]
    if r.get('cpu_forms'):   # keys 'conv ...' (forward, input and kernel gradient) and 'upsample ...' (inference)
        names = {'conv': 'dense convs', 'upsample': 'upsample branch'}
        by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for key, e in r['cpu_forms'].items():
            by_op[names.get(key.split()[0], key.split()[0])][f"{e['choice']} ({e['source']})"] += 1
        lines.append('  kernel forms    ' + '; '.join(
            f'{op}: ' + ', '.join(f'{n} x {form}' for form, n in sorted(counts.items()))
            for op, counts in sorted(by_op.items())) + ' (rest_jax.ops.cpu_tune)')
    for key, o in r.get('official', {}).items():
        lines.append(f"  {key:<15} {o['images_per_sec']:.1f} images/s ({o['step_ms']:.1f} ms/step), "
                     f"rest_jax is {r['images_per_sec'] / o['images_per_sec']:.2f}x")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == '--target' or a.startswith('--target=') for a in argv):
        return deviceless.main(argv)   # compiled for a TPU slice without a TPU: compiler estimates
    parser = argparse.ArgumentParser(prog='python -m rest_jax benchmark', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--model', default='restv2_tiny', choices=rest_jax.list_models())
    parser.add_argument('--all', action='store_true', help='every variant, as a Markdown table')
    parser.add_argument('--target', help='a TPU topology (e.g. v5p:2x2x2): compile for it without a TPU instead '
                                         '(rest_jax.deviceless; python -m rest_jax deviceless --help lists its options)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--mode', default='infer', choices=['infer', 'train'])
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--repeats', type=int, default=10, help='timed calls (median reported)')
    parser.add_argument('--impl', '--conv-impl', dest='impl', default='auto',
                        choices=['auto', 'xla', 'cpu', 'tpu', 'lax', 'shift'],
                        help="kernel forms (rest_jax.ops; auto: 'cpu' on a CPU, 'tpu' on a TPU, 'xla' elsewhere; "
                             "--conv-impl, lax and shift are the former names)")
    parser.add_argument('--arch', type=deviceless.json_object, default={}, metavar='JSON',
                        help='create_model overrides, e.g. \'{"embed_dims": [32, 64, 128, 256], "depths": [1, 1, 1, 1]}\'')
    parser.add_argument('--official', metavar='PATH', help='a clone of wofmanaf/ResT to time side by side (needs torch)')
    parser.add_argument('--official-compile', action='store_true', help='also time the official code under torch.compile')
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of text')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f'--repeats must be at least 1, got {args.repeats}')
    if args.batch_size < 1 or args.image_size < 32:
        parser.error(f'need --batch-size >= 1 and --image-size >= 32, got {args.batch_size} and {args.image_size}')

    if {'impl', 'conv_impl', 'dtype'} & set(args.arch):
        parser.error('--arch: set impl and dtype with --impl and --dtype')
    names = rest_jax.list_models() if args.all else [args.model]
    results = []
    for name in names:
        try:
            r = benchmark(name, args.mode, args.batch_size, args.image_size, args.dtype, args.repeats,
                          official=args.official, official_compile=args.official_compile, impl=args.impl,
                          **args.arch)
        except ValueError as e:   # a bad override or size: create_model's message says what is valid
            parser.error(str(e))
        results.append(r)
        if not args.json:
            print(describe(r), flush=True)
    if args.json:
        print(json.dumps({'results': results} if args.all else results[0]))
    elif args.all:
        d = results[0]
        print(f"\n{args.mode}, {args.dtype}, batch {args.batch_size} at {args.image_size}, "
              f"{d['backend']} ({d['device_kind']}, {d['cpu_count']} CPUs of {cpu_isa.describe_cpu(d['cpu'])}), "
              f"jax {d['jax_version']}:\n")
        print(markdown_table(results))


if __name__ == '__main__':
    # Page faults on XLA:CPU's fresh temporaries cost ~25% of a CPU training step (rest_jax.host);
    # the official model timed beside ours runs in this same process, under the same setting.
    host.reexec_with_huge_pages()
    main()
