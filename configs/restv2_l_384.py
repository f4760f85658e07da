r"""restv2_large fine-tuned at 384 from a 224 checkpoint (see configs/common.py: v2_384_config).

    python train.py --config configs/restv2_l_384.py --workdir /tmp/restv2_large_384 \
        --config.init_from=/tmp/restv2_large --config.data_dir=/path/to/tfds

As the official command does, the fine-tune starts from the checkpoint's raw weights; add
--config.init_from_ema=True to start from its EMA weights instead. init_from takes a training
workdir (its latest checkpoint) or a converted official checkpoint
(python -m rest_jax.convert restv2_large.pth /tmp/restv2_large_converted).
"""

from configs import common


def get_config():
    return common.v2_384_config('restv2_large')
