"""rest_small on ImageNet-1k at 224, the ResT v1 recipe (see configs/common.py: v1_config).

    python train.py --config configs/rest_s.py --workdir /tmp/rest_small --config.data_dir=/path/to/tfds
"""

from configs import common


def get_config():
    return common.v1_config('rest_small')
