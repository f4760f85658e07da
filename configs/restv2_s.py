"""restv2_small on ImageNet-1k at 224, the official ResTv2 recipe (see configs/common.py: v2_config).

    python train.py --config configs/restv2_s.py --workdir /tmp/restv2_small --config.data_dir=/path/to/tfds
"""

from configs import common


def get_config():
    return common.v2_config('restv2_small')
