"""Label smoothing and timm's Mixup / CutMix (mode 'batch', correct_lam) per group of images, in TF.

As timm does for each GPU's batch, a group of images draws one decision (mix or not, mixup or
cutmix) and one coefficient lam ~ Beta(alpha, alpha), and pairs row i with row g-1-i (the group
flipped). CutMix pastes a box whose side is sqrt(1 - lam) of the image, clipped at the border, and
then sets lam to the share of the image left unpasted, so that the labels match what the pixels show.
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


def mix_batch(images, labels, seed, *, num_classes, micro_batches=1, group_size=None, group_ids=None,
              total_groups=None, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
              smoothing=0.1):
    """Smoothed one-hot targets, mixed within each group of rows as timm's Mixup mixes a GPU's batch.

    Layout: with U = micro_batches and g = group_size, row r = (a * g + i) * U + m is row i of group
    c = a * U + m (block a of g * U rows, micro-batch m); it pairs with row g - 1 - i of its group.

    Args:
      images: float32 [L, H, W, C], L a multiple of g * U.
      labels: int [L].
      seed: int tensor [2]. The draws of all total_groups groups of the update come from it, and
        group c takes draw group_ids[c]: a group's mixing is a function of (seed, its global index),
        whichever host holds it.
      num_classes: number of classes.
      micro_batches: U, the micro-batches interleaved in the rows.
      group_size: g, rows per group (default L // U: one group per micro-batch).
      group_ids: int [L // g], the global index of each group c (default range(L // g)).
      total_groups: the number of draws made from seed (default L // g).
      mixup_alpha, cutmix_alpha: Beta parameters (0 turns that kind off; both 0: no mixing).
      prob: probability that a group is mixed at all.
      switch_prob: with both kinds on, probability of CutMix rather than Mixup.
      smoothing: label smoothing.

    Returns:
      (images float32 [L, H, W, C], targets float32 [L, num_classes]) and, for tests, a dict with
      each group's lam [L // g] and use_cutmix [L // g].
    """
    targets = smooth_one_hot(labels, num_classes, smoothing)
    n, height, width = images.shape[0], images.shape[1], images.shape[2]
    group_size = group_size or n // micro_batches
    if n % (group_size * micro_batches):
        raise ValueError(f'{n} rows do not split into groups of {group_size} x {micro_batches} micro-batches')
    groups = n // group_size
    total_groups = total_groups or groups
    s = tf.random.experimental.stateless_split(seed, 5)
    mixed = tf.random.stateless_uniform([total_groups], s[0]) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([total_groups], s[1]) < switch_prob
        lam = tf.where(use_cutmix, sample_beta(s[2], cutmix_alpha, [total_groups]),
                       sample_beta(s[3], mixup_alpha, [total_groups]))
    elif mixup_alpha > 0:
        use_cutmix = tf.zeros([total_groups], tf.bool)
        lam = sample_beta(s[3], mixup_alpha, [total_groups])
    elif cutmix_alpha > 0:
        use_cutmix = tf.ones([total_groups], tf.bool)
        lam = sample_beta(s[2], cutmix_alpha, [total_groups])
    else:
        return images, targets, dict(lam=tf.ones([groups]), use_cutmix=tf.zeros([groups], tf.bool))
    use_cutmix &= mixed
    lam = tf.where(mixed, lam, 1.0)
    (top, bottom, left, right), box_lam = cutmix_box(s[4], lam, height, width)
    lam = tf.where(use_cutmix, box_lam, lam)
    if group_ids is not None or total_groups != groups:
        ids = tf.range(groups) if group_ids is None else tf.convert_to_tensor(group_ids, tf.int32)
        lam, use_cutmix, top, bottom, left, right = (
            tf.gather(v, ids) for v in (lam, use_cutmix, top, bottom, left, right))

    layout = (n // (group_size * micro_batches), group_size, micro_batches)
    if groups <= _MAX_LOOPED_GROUPS:
        x = _mix_looped(images, layout, lam, use_cutmix, (top, bottom, left, right))
    else:
        x = _mix_vectorized(images, layout, lam, use_cutmix, (top, bottom, left, right))
    blocks, _, micro = layout
    y = tf.reshape(targets, [*layout, num_classes])
    lam_y = tf.reshape(lam, [blocks, 1, micro, 1])
    y = lam_y * y + (1.0 - lam_y) * tf.reverse(y, [1])
    return x, tf.reshape(y, [n, num_classes]), dict(lam=lam, use_cutmix=use_cutmix)


# Up to this many groups, each is mixed on its own, computing only the kind it draws: a scalar lam,
# and CutMix by slicing; several times cheaper than the vectorized form, which computes both kinds
# for every pixel and selects with broadcast masks. Both give identical results.
_MAX_LOOPED_GROUPS = 8


def _mix_looped(images, layout, lam, use_cutmix, box):
    blocks, _, micro = layout
    height, width = images.shape[1], images.shape[2]
    # [blocks, g, U, ...]: group (a, m) is x[a, :, m]; reversing its rows pairs row i with g-1-i.
    x = tf.reshape(images, [*layout, height, width, -1])
    out = []
    for a in range(blocks):
        row = []
        for m in range(micro):
            c = a * micro + m
            top, bottom, left, right = (b[c] for b in box)

            def blend(x=x[a, :, m], lam=lam[c]):
                return lam * x + (1.0 - lam) * tf.reverse(x, [0])

            def paste(x=x[a, :, m], top=top, bottom=bottom, left=left, right=right):
                pair = tf.reverse(x[:, top:bottom, left:right], [0])
                band = tf.concat([x[:, top:bottom, :left], pair, x[:, top:bottom, right:]], axis=2)
                return tf.concat([x[:, :top], band, x[:, bottom:]], axis=1)

            # lam == 1 (not mixed) blends to the image itself; skip the work.
            row.append(tf.case([(use_cutmix[c], paste), (lam[c] < 1.0, blend)],
                               default=lambda x=x[a, :, m]: x, exclusive=False))
        out.append(tf.stack(row, axis=1))
    return tf.reshape(tf.stack(out, axis=0), tf.shape(images))


def _mix_vectorized(images, layout, lam, use_cutmix, box):
    blocks, _, micro = layout
    top, bottom, left, right = box
    height, width = images.shape[1], images.shape[2]
    x = tf.reshape(images, [*layout, height, width, -1])
    x_pair = tf.reverse(x, [1])
    i = tf.range(height)[None, :, None]
    j = tf.range(width)[None, None, :]
    inside = ((i >= top[:, None, None]) & (i < bottom[:, None, None])
              & (j >= left[:, None, None]) & (j < right[:, None, None]))  # [groups, H, W]
    inside = tf.reshape(inside, [blocks, 1, micro, height, width, 1])
    lam_x = tf.reshape(lam, [blocks, 1, micro, 1, 1, 1])
    blended = lam_x * x + (1.0 - lam_x) * x_pair
    pasted = tf.where(inside, x_pair, x)
    x = tf.where(tf.reshape(use_cutmix, [blocks, 1, micro, 1, 1, 1]), pasted, blended)
    return tf.reshape(x, tf.shape(images))
