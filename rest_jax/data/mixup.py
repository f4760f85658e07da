"""Label smoothing and timm's Mixup / CutMix (mode 'batch', correct_lam) on a host's batch, in TF.

As in timm, a micro-batch draws one decision (mix or not, mixup or cutmix) and one coefficient
lam ~ Beta(alpha, alpha), and pairs row i with row n-1-i (the batch flipped). CutMix pastes a box
whose side is sqrt(1 - lam) of the image, clipped at the border, and then sets lam to the share of
the image left unpasted, so that the labels match what the pixels show.
"""

import tensorflow as tf


def smooth_one_hot(labels, num_classes, smoothing):
    """timm's mixup_target without mixing: off = smoothing / C, on = 1 - smoothing + off."""
    off = smoothing / num_classes
    return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def sample_beta(seed, alpha, shape):
    """Beta(alpha, alpha) from two stateless Gamma(alpha) draws."""
    s = tf.random.experimental.stateless_split(seed, 2)
    a = tf.random.stateless_gamma(shape, s[0], alpha=alpha)
    b = tf.random.stateless_gamma(shape, s[1], alpha=alpha)
    return a / (a + b)


def cutmix_box(seed, lam, height, width):
    """timm's rand_bbox for each lam [n]: (top, bottom, left, right) int32 [n] each, and the
    corrected lam = 1 - box area / image area."""
    s = tf.random.experimental.stateless_split(seed, 2)
    ratio = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(float(height) * ratio, tf.int32)  # int() truncates, as timm's does
    cut_w = tf.cast(float(width) * ratio, tf.int32)
    shape = tf.shape(lam)
    cy = tf.random.stateless_uniform(shape, s[0], 0, height, dtype=tf.int32)
    cx = tf.random.stateless_uniform(shape, s[1], 0, width, dtype=tf.int32)
    top = tf.clip_by_value(cy - cut_h // 2, 0, height)
    bottom = tf.clip_by_value(cy + cut_h // 2, 0, height)
    left = tf.clip_by_value(cx - cut_w // 2, 0, width)
    right = tf.clip_by_value(cx + cut_w // 2, 0, width)
    area = tf.cast((bottom - top) * (right - left), tf.float32)
    return (top, bottom, left, right), 1.0 - area / float(height * width)


def mix_batch(images, labels, seed, *, num_classes, groups=1, mixup_alpha=0.8, cutmix_alpha=1.0,
              prob=1.0, switch_prob=0.5, smoothing=0.1):
    """Smoothed one-hot targets, mixed within each group of rows as timm's Mixup does.

    Args:
      images: float32 [L, H, W, C].
      labels: int [L].
      seed: int tensor [2].
      num_classes: number of classes.
      groups: micro-batches in the batch; row r belongs to group r % groups.
      mixup_alpha, cutmix_alpha: Beta parameters (0 turns that kind off; both 0: no mixing).
      prob: probability that a group is mixed at all.
      switch_prob: with both kinds on, probability of CutMix rather than Mixup.
      smoothing: label smoothing.

    Returns:
      (images float32 [L, H, W, C], targets float32 [L, num_classes]) and, for tests, a dict with
      each group's lam [groups] and use_cutmix [groups].
    """
    targets = smooth_one_hot(labels, num_classes, smoothing)
    n, height, width = images.shape[0], images.shape[1], images.shape[2]
    rows = n // groups
    s = tf.random.experimental.stateless_split(seed, 5)
    mixed = tf.random.stateless_uniform([groups], s[0]) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([groups], s[1]) < switch_prob
        lam = tf.where(use_cutmix, sample_beta(s[2], cutmix_alpha, [groups]),
                       sample_beta(s[3], mixup_alpha, [groups]))
    elif mixup_alpha > 0:
        use_cutmix = tf.zeros([groups], tf.bool)
        lam = sample_beta(s[3], mixup_alpha, [groups])
    elif cutmix_alpha > 0:
        use_cutmix = tf.ones([groups], tf.bool)
        lam = sample_beta(s[2], cutmix_alpha, [groups])
    else:
        return images, targets, dict(lam=tf.ones([groups]), use_cutmix=tf.zeros([groups], tf.bool))
    use_cutmix &= mixed
    lam = tf.where(mixed, lam, 1.0)
    (top, bottom, left, right), box_lam = cutmix_box(s[4], lam, height, width)
    lam = tf.where(use_cutmix, box_lam, lam)

    if groups <= _MAX_LOOPED_GROUPS:
        x = _mix_looped(images, groups, lam, use_cutmix, (top, bottom, left, right))
    else:
        x = _mix_vectorized(images, groups, lam, use_cutmix, (top, bottom, left, right))
    y = tf.reshape(targets, [rows, groups, num_classes])
    y = lam[None, :, None] * y + (1.0 - lam[None, :, None]) * tf.reverse(y, [0])
    return x, tf.reshape(y, [n, num_classes]), dict(lam=lam, use_cutmix=use_cutmix)


# Up to this many micro-batches, each is mixed on its own, computing only the kind it draws: a
# scalar lam, and CutMix by slicing; several times cheaper than the vectorized form, which computes
# both kinds for every pixel and selects with broadcast masks. Both give identical results.
_MAX_LOOPED_GROUPS = 8


def _mix_looped(images, groups, lam, use_cutmix, box):
    n, height, width = images.shape[0], images.shape[1], images.shape[2]
    rows = n // groups
    x = tf.reshape(images, [rows, groups, height, width, -1])
    out = []
    for g in range(groups):
        top, bottom, left, right = (b[g] for b in box)

        def blend(x=x[:, g], lam=lam[g]):
            return lam * x + (1.0 - lam) * tf.reverse(x, [0])

        def paste(x=x[:, g], top=top, bottom=bottom, left=left, right=right):
            pair = tf.reverse(x[:, top:bottom, left:right], [0])
            band = tf.concat([x[:, top:bottom, :left], pair, x[:, top:bottom, right:]], axis=2)
            return tf.concat([x[:, :top], band, x[:, bottom:]], axis=1)

        # lam == 1 (not mixed) blends to the image itself; skip the work.
        out.append(tf.case([(use_cutmix[g], paste), (lam[g] < 1.0, blend)],
                           default=lambda x=x[:, g]: x, exclusive=False))
    return tf.reshape(tf.stack(out, axis=1), tf.shape(images))


def _mix_vectorized(images, groups, lam, use_cutmix, box):
    top, bottom, left, right = box
    n, height, width = images.shape[0], images.shape[1], images.shape[2]
    rows = n // groups
    # [rows, groups, ...]: column g is micro-batch g; reversing axis 0 pairs row i with rows-1-i.
    x = tf.reshape(images, [rows, groups, height, width, -1])
    x_pair = tf.reverse(x, [0])
    i = tf.range(height)[None, :, None]
    j = tf.range(width)[None, None, :]
    box = ((i >= top[:, None, None]) & (i < bottom[:, None, None])
           & (j >= left[:, None, None]) & (j < right[:, None, None]))  # [groups, H, W]
    lam_x = lam[None, :, None, None, None]
    blended = lam_x * x + (1.0 - lam_x) * x_pair
    pasted = tf.where(box[None, :, :, :, None], x_pair, x)
    x = tf.where(use_cutmix[None, :, None, None, None], pasted, blended)
    return tf.reshape(x, tf.shape(images))
