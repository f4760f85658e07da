"""Serving artifacts: a model with its weights as one `jax.export` program, run later with jax alone.

    python -m rest_jax export --checkpoint DIR --out model.jaxexport [--batch-size N | dynamic]
        [--dtype float32|bfloat16] [--platforms cpu,cuda,tpu] [--pre-logits]

writes FILE (a serialized `jax.export.Exported`: StableHLO with the weights inside) and FILE.json (what
it takes and gives, and the preprocessing its inputs need). `load_exported(FILE)` runs it: this module
imports only jax and numpy at the top, so a serving process needs neither flax nor the model code.

Kernel forms (rest_jax.ops): an artifact for the CPU only is traced with the CPU forms (exact rewrites
that XLA:CPU runs faster, correct on any x86 or Arm CPU; where the faster of two depends on the machine,
the one measured on the exporting host for a fixed batch size, the fixed rule for any batch size, whose
shapes cannot be timed); an artifact for TPUs only with the TPU forms; an artifact for several
platforms, or for GPUs, with the portable forms, so that every platform gets the program the models
are tested with there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 'rest_jax.exported/1'
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')   # jax.export's names
DTYPES = ('float32', 'bfloat16')


# --- exporting (needs the model code) --------------------------------------------------------------

def kernel_forms(platforms: tuple[str, ...]) -> str:
    """The kernel forms (rest_jax.ops) an artifact for `platforms` is traced with (see the module docstring)."""
    from rest_jax.ops.dispatch import platform_forms   # here: serving needs no model code (module docstring)
    return platform_forms(platforms[0]) if len(platforms) == 1 else 'xla'


def check_platforms(platforms: str | Sequence[str]) -> tuple[str, ...]:
    """`platforms` ('cpu,cuda' or a sequence) as a tuple of jax.export platform names; ValueError otherwise."""
    names = [p.strip().lower() for p in (platforms.split(',') if isinstance(platforms, str) else platforms)]
    for name in names:
        if name not in PLATFORMS:
            hint = ' (GPUs are cuda or rocm)' if name == 'gpu' else ''
            raise ValueError(f'unknown platform {name!r}{hint}; choose from {", ".join(PLATFORMS)}')
    if not names or len(set(names)) != len(names):
        raise ValueError(f'platforms must be distinct names from {", ".join(PLATFORMS)}, got {platforms!r}')
    return tuple(names)


def export_model(model: Any, variables: Any, *, input_size: int | tuple[int, int] = 224, batch_size: int | None = None,
                 dtype: str = 'float32', platforms: str | Sequence[str] = ('cpu',), pre_logits: bool = False):
    """Trace `model` with its weights into a `jax.export.Exported` (nothing is compiled here).

    Args:
      model: a ResT/ResTV2 classifier (e.g. from load_pretrained).
      variables: its {'params', 'batch_stats'}; they become constants of the program.
      input_size: the image size (an int for a square, or (height, width)); fixed in the program.
      batch_size: the batch size, or None for any (a symbolic dimension, one artifact for all sizes).
      dtype: computation dtype, 'float32' or 'bfloat16' (weights stay float32; outputs are float32).
      platforms: where the artifact may run: names from PLATFORMS, e.g. ('cpu', 'cuda', 'tpu'). Lowering
        for a platform needs no device of it.
      pre_logits: output the pooled features (B, C) instead of the logits.

    Returns:
      The Exported: `.call(images)` runs it; `.serialize()` gives the bytes `save_exported` writes.
    """
    platforms = check_platforms(platforms)
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (any), got {batch_size!r}")
    height, width = (input_size, input_size) if isinstance(input_size, (int, np.integer)) else input_size
    impl = kernel_forms(platforms)
    model = model.clone(impl=impl, conv_impl=None, dtype=jnp.dtype(dtype), remat='none')
    variables = jax.tree.map(jnp.asarray, {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})})

    def serve(images: jax.Array) -> jax.Array:
        return model.apply(variables, images, pre_logits=pre_logits)

    batch = jax.export.symbolic_shape('batch')[0] if batch_size is None else int(batch_size)
    spec = jax.ShapeDtypeStruct((batch, int(height), int(width), 3), jnp.float32)
    return jax.export.export(jax.jit(serve), platforms=platforms)(spec)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, batch_size: int | None = None,
                      dtype: str = 'float32', platforms: str | Sequence[str] = ('cpu',), input_size: int | None = None,
                      pre_logits: bool = False, ema: bool = False, force: bool = False) -> dict[str, Any]:
    """`python -m rest_jax export`: a checkpoint directory -> FILE and FILE.json (see `export_model`).

    Args:
      checkpoint: a converted or saved directory, or a training workdir (`load_pretrained` reads it).
      out: the artifact's path; its metadata goes to `out + '.json'`.
      input_size: default: the checkpoint's (its preprocessing's input_size).
      ema: a training workdir's EMA weights.
      force: replace an existing `out`.
      batch_size, dtype, platforms, pre_logits: as for `export_model`.

    Returns:
      The metadata written to `out + '.json'`.
    """
    from rest_jax import pretrained   # the model code: needed to export, never to run an artifact
    platforms = check_platforms(platforms)   # bad arguments fail before the (slow) load
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not force:
        raise ValueError(f'{out} exists; pass --force to overwrite')
    model, variables = pretrained.load_pretrained(checkpoint, ema=ema)
    if getattr(model, 'num_classes', 0) == 0 and not pre_logits:
        pre_logits = True   # a headless model's __call__ gives the pooled features anyway
    prep = pretrained.preprocessing_of(model)
    size = int(input_size or prep['input_size'])
    exported = export_model(model, variables, input_size=size, batch_size=batch_size, dtype=dtype,
                            platforms=platforms, pre_logits=pre_logits)
    name, config = pretrained.model_spec(model)
    meta = {
        'format': FORMAT,
        'model': name, 'config': config, 'checkpoint': os.fspath(checkpoint),
        'preprocessing': {**prep, 'input_size': size},
        'input': {'shape': [batch_size, size, size, 3], 'dtype': 'float32', 'layout': 'NHWC',
                  'note': "normalized images: rest_jax.preprocess, or resize/crop/mean/std from 'preprocessing'"},
        'output': {'shape': [batch_size, exported.out_avals[0].shape[-1]], 'dtype': 'float32',
                   'what': 'pooled features (pre-logits)' if pre_logits else 'logits'},
        'platforms': list(platforms), 'dtype': dtype, 'kernel_forms': kernel_forms(platforms),
        'jax_version': jax.__version__,
    }
    save_exported(out, exported, meta, force=force)
    return meta


_NO_FLATBUFFERS = ('{what} a jax.export artifact needs the flatbuffers package (jax.export does not declare it): '
                   'pip install flatbuffers')


def save_exported(path: str | os.PathLike, exported: Any, metadata: dict[str, Any], force: bool = False) -> None:
    """Write `exported` to `path` and `metadata` to `path + '.json'`, each atomically (a temporary file,
    then a rename): the metadata first, so that a reader who finds the artifact finds its metadata."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not force:
        raise ValueError(f'{path} exists; pass --force to overwrite')
    try:   # before anything is written: a failure leaves no metadata without its artifact
        program = bytes(exported.serialize())
    except ImportError:
        raise ImportError(_NO_FLATBUFFERS.format(what='Writing')) from None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for target, data in ((path + '.json', (json.dumps(metadata, indent=2) + '\n').encode()), (path, program)):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f'.{os.path.basename(target)}.tmp-')
        try:
            with os.fdopen(fd, 'wb') as file:
                file.write(data)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- running (jax only) ----------------------------------------------------------------------------

class ExportedModel:
    """A loaded artifact: call it with a normalized (N, H, W, 3) float32 batch; `.metadata` is FILE.json."""

    def __init__(self, exported: Any, metadata: dict[str, Any]):
        self.exported = exported
        self.metadata = metadata
        self._call = jax.jit(exported.call)   # compiled once per batch size

    @property
    def preprocessing(self) -> dict[str, Any]:
        """input_size, crop_pct, interpolation, mean, std, num_classes: how to make the inputs."""
        return self.metadata['preprocessing']

    def __call__(self, images: Any) -> jax.Array:
        expected = self.exported.in_avals[0].shape
        shape = np.shape(images)
        fixed = [d if isinstance(d, int) else None for d in expected]
        if len(shape) != 4 or any(f is not None and f != s for f, s in zip(fixed, shape)) or shape[0] < 1:
            want = 'x'.join('N' if f is None else str(f) for f in fixed)
            raise ValueError(f'expected a {want} batch of normalized NHWC images, got shape {tuple(shape)}; '
                             'make it with rest_jax.preprocess or the metadata\'s preprocessing')
        dtype = getattr(images, 'dtype', None) or np.asarray(images).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError('expected normalized float images (mean/std applied), got integers; make them with '
                             "rest_jax.preprocess or the metadata's preprocessing")
        platform = _export_platform(jax.default_backend())
        if platform not in self.exported.platforms:
            raise ValueError(f'this artifact runs on {", ".join(self.exported.platforms)}, not on {platform}; '
                             f'export it again with --platforms including {platform}')
        return self._call(jnp.asarray(images, jnp.float32))


def _export_platform(backend: str) -> str:
    if backend == 'gpu':   # jax.export names the GPU platforms by their runtimes
        return 'rocm' if 'rocm' in jax.devices()[0].client.platform_version.lower() else 'cuda'
    return backend


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Load an artifact written by `python -m rest_jax export` (or `save_exported`); needs jax (and
    flatbuffers, which jax.export reads artifacts with), not flax or the model code.

    Args:
      path: the artifact; its metadata is read from `path + '.json'`.

    Returns:
      An ExportedModel: `model(images)` gives float32 logits (or pooled features, see
      `model.metadata['output']`); `model.preprocessing` says how to make `images`.
    """
    path = os.fspath(path)
    try:
        with open(path + '.json') as file:
            metadata = json.load(file)
        with open(path, 'rb') as file:
            data = file.read()
    except FileNotFoundError as e:
        raise ValueError(f'{e.filename}: no such file (write artifacts with python -m rest_jax export)') from None
    if metadata.get('format') != FORMAT:
        raise ValueError(f'{path}.json: not a rest_jax artifact (format {metadata.get("format")!r}, expected {FORMAT!r})')
    try:
        exported = jax.export.deserialize(bytearray(data))
    except ImportError:
        raise ImportError(_NO_FLATBUFFERS.format(what='Reading')) from None
    except Exception as e:   # flatbuffers raise assorted errors on foreign bytes
        raise ValueError(f'{path}: not a serialized jax.export artifact ({type(e).__name__})') from None
    return ExportedModel(exported, metadata)


# --- command line ----------------------------------------------------------------------------------

def _batch_size(text: str) -> int | None:
    if text == 'dynamic':
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """`python -m rest_jax export --checkpoint DIR --out FILE ...`."""
    parser = argparse.ArgumentParser(
        prog='python -m rest_jax export',
        description='Export a checkpoint as a jax.export artifact (StableHLO with the weights inside) plus '
                    'FILE.json; rest_jax.load_exported(FILE) runs it with jax alone.')
    parser.add_argument('--checkpoint', required=True, help='a converted or saved directory, or a training workdir')
    parser.add_argument('--out', required=True, help='the artifact file; its metadata goes to FILE.json')
    parser.add_argument('--batch-size', type=_batch_size, default=None, metavar='N|dynamic',
                        help="a fixed batch size, or 'dynamic' (default): any batch size")
    parser.add_argument('--dtype', choices=DTYPES, default='float32', help='computation dtype (weights stay float32)')
    parser.add_argument('--platforms', default='cpu',
                        help=f'comma-separated, from {",".join(PLATFORMS)} (default cpu); several: portable kernels')
    parser.add_argument('--image-size', type=int, default=None, help="default: the checkpoint's input size")
    parser.add_argument('--pre-logits', action='store_true', help='output pooled features instead of logits')
    parser.add_argument('--ema', action='store_true', help="a training workdir's EMA weights")
    parser.add_argument('--force', action='store_true', help='replace an existing FILE')
    args = parser.parse_args(argv)
    try:
        if args.image_size is not None and args.image_size < 32:
            raise ValueError(f'--image-size must be at least 32, got {args.image_size}')
        meta = export_checkpoint(args.checkpoint, args.out, batch_size=args.batch_size, dtype=args.dtype,
                                 platforms=args.platforms, input_size=args.image_size, pre_logits=args.pre_logits,
                                 ema=args.ema, force=args.force)
    except (ValueError, OSError, ImportError) as e:
        print(f'error: {" ".join(str(e).split()) or type(e).__name__}', file=sys.stderr)
        return 1
    shape = 'x'.join('N' if d is None else str(d) for d in meta['input']['shape'])
    print(f"{meta['model']}: {shape} float32 -> {meta['output']['what']} ({meta['dtype']}, "
          f"{','.join(meta['platforms'])}) -> {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
