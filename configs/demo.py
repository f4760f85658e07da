"""A small ResTv2 on the built-in 'digits' dataset (1797 real 8x8 scans from scikit-learn, upscaled to
32x32): trains on one CPU in a few minutes, then evaluates and predicts held-out images.

    python train.py --config configs/demo.py --workdir /tmp/rest_demo

Departures from the ImageNet recipe, for 32-px digits and a 2-minute budget: no mixup/cutmix, no
RandAugment, no random erasing and no flips (a flipped 2 is not a 2); a mild crop scale (0.08 of a
32-px digit is a few strokes); a higher lr with a short warmup; 10 epochs; an EMA of 0.95 (0.9999 averages over 10k updates,
longer than the whole run, and the EMA also averages the BatchNorm statistics, whose initial 1.0
variance would linger); float32 (bf16 is emulated, hence slow, on CPU).
"""

from configs import common


def get_config():
    c = common.get_config()
    c.model.name = 'restv2_tiny'
    c.model.embed_dims = (32, 64, 128, 256)
    c.model.depths = (1, 1, 2, 1)
    c.model.num_heads = (1, 2, 4, 8)
    c.model.num_classes = 10
    c.model.drop_path_rate = 0.0
    c.dataset = 'digits'
    c.image_size = 32
    c.batch_size = 128
    c.num_epochs = 10
    c.lr = 2e-3  # per 256 images: 1e-3 at batch 128
    c.min_lr = 1e-5
    c.warmup_epochs = 2
    c.ema_decay = 0.95
    c.dtype = 'float32'
    c.data.eval_split = 'test'
    c.data.crop_pct = 1.0
    c.data.scale = (0.6, 1.0)
    c.data.ratio = (0.85, 1.15)
    c.data.hflip = 0.0
    c.data.randaug = ''
    c.data.reprob = 0.0
    c.data.mixup = 0.0
    c.data.cutmix = 0.0
    c.data.shuffle_buffer = 2048
    c.log_every_steps = 20
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    c.predict_examples = 8
    return c
