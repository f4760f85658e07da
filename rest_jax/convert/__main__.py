"""python -m rest_jax.convert SRC.pth DST_DIR: an official PyTorch checkpoint -> a rest_jax directory."""

from __future__ import annotations

import argparse
import sys

from rest_jax.convert.checkpoint import convert_checkpoint, parse_arch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m rest_jax convert',
        description='Convert an official ResT/ResTv2 .pth checkpoint (read without torch) into an Orbax '
                    'checkpoint plus rest_jax.json, for rest_jax.load_pretrained.')
    parser.add_argument('src', help='the .pth file')
    parser.add_argument('dst', help='output directory (written atomically)')
    parser.add_argument('--model', help='registered variant (default: recognised from the shapes)')
    parser.add_argument('--ema', action='store_true', help="convert the 'model_ema' weights")
    parser.add_argument('--force', action='store_true', help='replace an existing DST')
    parser.add_argument('--arch', nargs='+', metavar='KEY=VALUE', default=[],
                        help='create_model overrides, e.g. num_heads=1,2,4,8 (lists: commas; true/false)')
    args = parser.parse_args(argv)
    try:
        meta = convert_checkpoint(args.src, args.dst, model=args.model, ema=args.ema, force=args.force,
                                  arch=parse_arch(args.arch))
    except (FileNotFoundError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        message = ' '.join(str(e).split()) or type(e).__name__
        print(f'error: {message}', file=sys.stderr)
        return 1
    config = ', '.join(f'{k}={v}' for k, v in meta['config'].items())
    print(f"{meta['model']}{f' ({config})' if config else ''}: {meta['source']['entry']} weights, "
          f"{meta['num_params']:,} params -> {args.dst}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
