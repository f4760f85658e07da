"""python -m rest_jax.predict --checkpoint DIR img.jpg ...: the top-k classes of each image."""

from __future__ import annotations

import argparse
import json
import sys
import types

from rest_jax import inference


def _open(path: str):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert('RGB')
    except FileNotFoundError:
        raise ValueError(f'{path}: no such file') from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f'{path}: not a readable image ({" ".join(str(e).split())})') from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m rest_jax.predict',
        description='Classify images with a converted or trained rest_jax checkpoint, using the '
                    "official evaluation transform from the checkpoint's metadata.")
    parser.add_argument('images', nargs='+', help='image files (anything Pillow reads)')
    parser.add_argument('--checkpoint', required=True,
                        help='a directory from python -m rest_jax.convert or a training workdir')
    parser.add_argument('--ema', action='store_true', help="a training workdir's EMA weights")
    parser.add_argument('--top-k', type=int, default=5, help='classes per image (default 5)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default 16)')
    parser.add_argument('--json', action='store_true', help='one JSON object per image instead of text')
    args = parser.parse_args(argv)
    try:
        if args.top_k < 1 or args.batch_size < 1:
            raise ValueError('--top-k and --batch-size must be positive')
        from rest_jax.convert import load_pretrained
        images = [_open(path) for path in args.images]  # all readable before the (slow) model load
        model, variables = load_pretrained(args.checkpoint, ema=args.ema)
        for start in range(0, len(images), args.batch_size):
            chunk = images[start:start + args.batch_size]
            x = inference.preprocess(chunk, model)
            top = inference.predict(model, variables, x, top_k=args.top_k)
            for j, path in enumerate(args.images[start:start + args.batch_size]):
                rows = list(zip(top.classes[j].tolist(), top.probs[j].tolist(), top.names[j]))
                if args.json:
                    print(json.dumps({'image': path, 'top': [{'class': c, 'prob': round(p, 6), 'name': n}
                                                             for c, p, n in rows]}))
                else:
                    print(path)
                    for rank, (c, p, n) in enumerate(rows, 1):
                        print(f'  {rank}. {p:7.2%}  {n} ({c})')
    except (ValueError, OSError) as e:
        print(f'error: {" ".join(str(e).split()) or type(e).__name__}', file=sys.stderr)
        return 1
    return 0


class _CallableModule(types.ModuleType):
    """`import rest_jax.predict` binds this module to the name `rest_jax.predict`, shadowing the
    function of the same name; calling the module keeps `rest_jax.predict(model, variables, x)` working."""

    def __call__(self, *args, **kwargs):
        return inference.predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == '__main__':
    sys.exit(main())
