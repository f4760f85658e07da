"""Train ResT / ResTv2: flags -> config -> rest_jax.train.run().

    python train.py --config configs/demo.py --workdir /tmp/rest_demo
    python train.py --config configs/restv2_t.py --workdir /mnt/runs/restv2_t --config.data_dir=/mnt/tfds

Any config field can be overridden: --config.batch_size=512 --config.mesh.fsdp=8. A field that does not
exist fails (the config is locked). Rerunning the same command resumes from the workdir's newest
checkpoint. Multi-host (TPU pods, multi-node GPU): pass --distributed on every host.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/ imports `configs.common`

config_flags.DEFINE_config_file('config', None, 'a configs/*.py file', lock_config=True)
flags.DEFINE_string('workdir', None, 'checkpoints, metrics.jsonl and TensorBoard logs (resumed if present)')
flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() first (one process per host)')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
    """absl's parser, with a one-line error for a --config.FIELD that does not exist (locked config)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        key = str(e).strip('"\'')
        given = next((a.split('=')[0] for a in argv if a.startswith('--config.') and key in a), key)
        sys.exit(f'error: {given}: no such config field ({key!r}); the fields are listed in configs/common.py')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every save and read at INFO; -v 0 shows them
    import jax
    if flags.FLAGS.distributed:
        jax.distributed.initialize()  # cluster auto-detection: TPU pods, SLURM, Open MPI, or JAX_COORDINATOR_* env
    from rest_jax import train
    try:
        train.run(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, train.NonFiniteLoss) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    # On CPU, page faults on XLA's fresh per-step temporaries cost ~25% of a training step; glibc's
    # huge-page tunable, read at process start, removes them (rest_jax/host.py). REST_JAX_HUGE_PAGES=0 opts out.
    from rest_jax import host
    host.reexec_with_huge_pages()
    app.run(main, flags_parser=parse_flags)
