"""`python -m rest_jax COMMAND ...`: the command-line tools, one per subject.

    python -m rest_jax convert SRC.pth DST            # official checkpoint -> rest_jax directory
    python -m rest_jax predict --checkpoint DIR a.jpg  # top-k classes of images
    python -m rest_jax export --checkpoint DIR --out F # a serving artifact (jax.export) and F.json
    python -m rest_jax benchmark --model restv2_tiny   # throughput, memory, FLOPs
    python -m rest_jax demo                            # the variant table and a forward pass
    python -m rest_jax deviceless --target v5p:2x2x2   # a TPU slice's program, compiled without a TPU

`python -m rest_jax COMMAND --help` describes each.
"""

import importlib
import sys

COMMANDS = {
    'convert': 'rest_jax.convert.__main__',
    'predict': 'rest_jax.inference',
    'export': 'rest_jax.export',
    'benchmark': 'rest_jax.benchmark',
    'demo': 'rest_jax.demo',
    'deviceless': 'rest_jax.deviceless',
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = f'unknown command {argv[0]!r}; ' if argv and not argv[0].startswith('-') else ''
        print(f'usage: python -m rest_jax {{{",".join(COMMANDS)}}} ... ({given}'
              f'python -m rest_jax COMMAND --help for each)', file=sys.stderr)
        return 0 if argv[:1] in (['-h'], ['--help']) else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == '__main__':
    if sys.argv[1:2] == ['benchmark']:
        # Before jax starts: glibc reads the tunable at process start (rest_jax.host). Here, not in
        # main(), which may be called from a Python program that must not be restarted.
        from rest_jax import host
        host.reexec_with_huge_pages()
    sys.exit(main())
