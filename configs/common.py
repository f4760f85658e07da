"""Every field train.py reads, with its default: the ResTv2 ImageNet-1k recipe on 8 x 128 images.

    python train.py --config configs/common.py --workdir /tmp/rest_run

A variant file calls `get_config()` here and overrides a handful of fields. Sources of the recipe:
wofmanaf/ResT's main.py, datasets.py and TRAINING.md at the v2 release (v2_config, v2_384_config),
its main.py and datasets.py at the v1 release and the ResT paper, arXiv 2105.13677, section 4.1
(v1_config).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from rest_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.name = 'restv2_tiny'        # a registered variant (rest_jax.list_models())
    c.model.num_classes = 1000          # head size; must equal the dataset's number of classes
    c.model.drop_path_rate = 0.1        # stochastic depth, linear in depth up to this rate
    c.model.embed_dims = placeholder(tuple)  # architecture overrides; None = the variant's own
    c.model.depths = placeholder(tuple)      # blocks per stage; None = the variant's own
    c.model.num_heads = placeholder(tuple)   # heads per stage; None = the variant's own
    c.model.impl = 'auto'               # kernel forms (rest_jax.ops): 'auto' (for the mesh's devices) | 'xla' | 'cpu' | 'tpu'
    c.model.remat = 'none'              # recompute blocks in the backward pass: 'none' | 'block' | a jax.checkpoint_policies name
    c.model.conv_impl = placeholder(str)  # former name of impl ('lax' = 'xla', 'shift' = 'cpu'); wins when set

    c.dataset = 'imagenet2012'          # 'imagenet2012' | 'image_folder' | 'digits' (built in, no download)
    c.data_dir = ''                     # TFDS data_dir (may be gs://), or the image_folder root; '' = TFDS default
    c.image_size = 224                  # train and eval resolution
    c.batch_size = 1024                 # GLOBAL batch of one micro-step (an update consumes update_freq of them)
    c.update_freq = 1                   # gradient accumulation: micro-steps per optimizer update
    c.num_epochs = 300                  # length of the run in epochs of the train split
    c.total_steps = 0                   # optimizer updates; > 0 overrides num_epochs

    c.lr = 1.5e-4                       # peak lr per lr_base_batch images (x batch_size * update_freq / lr_base_batch)
    c.lr_base_batch = 256               # the batch lr is given for; scaled at run time from the total batch
    c.min_lr = 1e-6                     # cosine floor (absolute unless scale_warmup_min_lr)
    c.warmup_lr = 0.0                   # lr at step 0 (absolute unless scale_warmup_min_lr); linear up to the peak
    c.scale_warmup_min_lr = False       # True: warmup_lr and min_lr are per lr_base_batch images too (v1's main.py)
    c.lr_schedule = 'step'              # 'step': warmup + cosine per update (v2) | 'epoch': timm's, per epoch (v1)
    c.warmup_epochs = 50                # TRAINING.md: --warmup_epochs 50 for v2
    c.cooldown_epochs = 0               # epochs held at min_lr after the cosine (v1's main.py drops timm's 10)
    c.weight_decay = 0.05               # AdamW decoupled decay; never on biases and 1-D parameters (norms)
    c.b1 = 0.9                          # AdamW beta1
    c.b2 = 0.999                        # AdamW beta2
    c.eps = 1e-8                        # AdamW epsilon
    c.grad_clip = 1.0                   # global-norm gradient clipping (0 = off)
    c.ema_decay = 0.9999                # EMA of the parameters, updated after every optimizer update (0 = off)

    c.data = ml_collections.ConfigDict()
    c.data.train_split = 'train'        # TFDS split / folder read for training
    c.data.eval_split = 'validation'    # split evaluated in full ('validation' imagenet2012, 'val' folder, 'test' digits)
    c.data.crop_pct = 1.0               # eval: shorter side to int(image_size / crop_pct), center crop; >= 384: warp
    c.data.interpolation = 'bicubic'    # resize filter for train and eval
    c.data.scale = (0.08, 1.0)          # random-resized-crop area range
    c.data.ratio = (3 / 4, 4 / 3)       # random-resized-crop aspect range
    c.data.hflip = 0.5                  # horizontal flip probability
    c.data.randaug = 'rand-m9-mstd0.5-inc1'  # timm RandAugment spec ('' = off)
    c.data.reprob = 0.25                # random erasing probability (per-pixel normal fill); 0 = off
    c.data.mixup = 0.8                  # mixup alpha (0 = off)
    c.data.cutmix = 1.0                 # cutmix alpha (0 = off)
    c.data.mixup_prob = 1.0             # probability of mixing a batch at all
    c.data.mixup_switch_prob = 0.5      # probability of cutmix instead of mixup when both are on
    c.data.mixup_group_size = 256       # images per Mixup/CutMix draw whatever the host batch (official: per GPU)
    c.data.repeated_aug = 0             # each image this many times per epoch (v1's RASampler: 3); 0 or 1 = off
    c.data.label_smoothing = 0.1        # smoothing of the one-hot targets
    c.data.mean = IMAGENET_MEAN         # normalisation mean (images in [0, 1])
    c.data.std = IMAGENET_STD           # normalisation std
    c.data.shuffle_buffer = 16384       # tf.data shuffle buffer (clamped to the split size)
    c.data.num_workers = 0              # tf.data threads (0 = AUTOTUNE)

    c.dtype = 'bfloat16'                # computation dtype ('float32' | 'bfloat16'); parameters stay float32
    c.seed = 0                          # parameters, dropout/drop-path keys (fold_in(seed, step)) and data order
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                    # data-parallel axis size (-1 = all devices left over)
    c.mesh.fsdp = 1                     # axis that shards parameters and optimizer state (1 = replicated)

    c.log_every_steps = 100             # console, metrics.jsonl and TensorBoard every N updates
    c.eval_every_steps = 0              # full evaluation every N updates (0 = once per epoch); always at the end
    c.checkpoint_every_steps = 0        # checkpoint every N updates (0 = once per epoch); always at the end
    c.keep_checkpoints = 3              # newest checkpoints kept, plus the best by EMA (or plain) top-1
    c.init_from = ''                    # a converted checkpoint or a training workdir to start from (fine-tuning)
    c.init_from_ema = False             # with a training workdir in init_from: take its EMA parameters
    c.profile_steps = (0, 0)            # (first, last) update to trace with jax.profiler into workdir/profile; (0, 0) = off
    c.predict_examples = 0              # after training, predict this many eval images and print them (demo)
    return c



# Per-variant stochastic depth (the final rate; linear in depth from 0).
# v2: restv2_tiny 0.1 is TRAINING.md's command (--drop_path 0.1). The official repository gives no value
# for restv2_small / base / large: 0.2 / 0.3 / 0.5 are ours, growing with depth and width as the
# stochastic-depth rates of comparable ImageNet-1k recipes do; pass --config.model.drop_path_rate to change.
# v1: the ResT paper's 0.1 / 0.1 / 0.2 / 0.3 for Lite / S / B / L (section 4.1; main.py's default is 0.1).
DROP_PATH = {'rest_lite': 0.1, 'rest_small': 0.1, 'rest_base': 0.2, 'rest_large': 0.3,
             'restv2_tiny': 0.1, 'restv2_small': 0.2, 'restv2_base': 0.3, 'restv2_large': 0.5}


def v2_config(name: str) -> ml_collections.ConfigDict:
    """ResTv2 at 224 (TRAINING.md, main.py at the v2 release): AdamW, lr 1.5e-4 x batch / 256, 50 warmup
    epochs, cosine to 1e-6 per update, clip 1.0, EMA 0.9999, 300 epochs, 8 GPUs x 256 images (one
    Mixup/CutMix draw per 256), eval crop_pct 1.0 (main.py's default: resize to 224, center crop 224)."""
    c = get_config()
    c.model.name = name
    c.model.drop_path_rate = DROP_PATH[name]
    c.batch_size = 2048
    return c


def v1_config(name: str) -> ml_collections.ConfigDict:
    """ResT v1 as its release's main.py trains it (paper section 4.1): AdamW, lr 5e-4, warmup_lr 1e-6 and
    min_lr 1e-5, each x batch / 512 (scaled at run time); timm's CosineLRScheduler stepped after each
    epoch (5 warmup epochs, the cosine over all 300, its 10 cooldown epochs never reached); repeated
    augmentation x3 (RASampler); weight decay 0.05, clip 5.0, no EMA; 8 GPUs x 256 images; eval
    crop_pct 0.875 (Resize(int(256 / 224 * size)), center crop)."""
    c = get_config()
    c.model.name = name
    c.model.drop_path_rate = DROP_PATH[name]
    c.batch_size = 2048
    c.lr = 5e-4
    c.warmup_lr = 1e-6
    c.min_lr = 1e-5
    c.lr_base_batch = 512
    c.scale_warmup_min_lr = True
    c.lr_schedule = 'epoch'
    c.warmup_epochs = 5
    c.cooldown_epochs = 0  # main.py runs --epochs (300): the scheduler's cooldown epochs never come
    c.grad_clip = 5.0
    c.ema_decay = 0.0  # main.py's model EMA is commented out
    c.data.repeated_aug = 3
    c.data.crop_pct = 0.875
    return c


def v2_384_config(name: str) -> ml_collections.ConfigDict:
    """ResTv2 fine-tuned at 384 (TRAINING.md): from a 224 checkpoint's raw (non-EMA) weights, lr 1.5e-5
    x batch / 256, no warmup, weight decay 1e-8, 30 epochs, no mixup/cutmix, clip 1.0, no EMA, 8 GPUs x
    64 images, eval warped to 384 x 384 (no crop)."""
    c = v2_config(name)
    c.image_size = 384
    c.batch_size = 512
    c.lr = 1.5e-5
    c.warmup_epochs = 0
    c.weight_decay = 1e-8
    c.num_epochs = 30
    c.data.mixup = 0.0
    c.data.cutmix = 0.0
    c.data.mixup_group_size = 64  # the official per-GPU batch (no effect while mixup/cutmix are off)
    c.data.crop_pct = 1.0
    c.ema_decay = 0.0  # the official fine-tuning command does not pass --model_ema
    # Required: a fine-tune starts from a 224 checkpoint. None (unset) stops the run with a message;
    # --config.init_from='' trains from scratch on purpose. The official command loads the checkpoint's
    # raw weights ('model'); --config.init_from_ema=True starts from its EMA weights instead.
    c.init_from = placeholder(str)
    return c
