"""Multiply-accumulates per image, counted from the architecture (not from XLA's cost analysis).

What is counted, as fvcore/thop-style tables count it: one MAC per multiply-add of every convolution
(dense, depthwise, strided), every linear layer, the two attention matmuls (q @ k^T and attn @ v) and
v1's head-mixing 1x1 conv on the attention maps. Biases, norms, activations, softmax, the pixel-
attention gate's multiply, pooling and the pixel shuffle are not counted (together < 2% of the total).
Token grids follow the convolutions' actual output sizes, so any input size from 32 up is counted
as the model runs it.
"""

from __future__ import annotations

import flax.linen as nn

from rest_jax.ops import conv_output_size as _out


def _conv(h: int, w: int, cin: int, cout: int, kernel: int, stride: int, pad: int, groups: int = 1):
    """(MACs, output height, output width) of a Conv2d on an h x w input."""
    ho, wo = _out(h, kernel, stride, pad), _out(w, kernel, stride, pad)
    return ho * wo * cout * (cin // groups) * kernel * kernel, ho, wo


def count_macs(model: nn.Module, image_size: int | tuple[int, int] = 224) -> dict[str, int]:
    """MACs per image of a ResT or ResTV2 model (as `create_model` returns it), by kind.

    Args:
      model: a rest_jax.models.ResT or ResTV2 (any architecture overrides are honoured).
      image_size: the input side, or (height, width).

    Returns:
      {'conv': dense convs (stem, patch embeddings), 'depthwise': depthwise convs (pixel attention,
      the EMSA reduction `sr`, the v2 upsample branch `up`), 'linear': q, kv, proj, MLP, head,
      'attention': q @ k^T and attn @ v (plus v1's head-mixing conv), 'total': their sum}.
    """
    from rest_jax.models.rest import ResT
    from rest_jax.models.rest_v2 import ResTV2
    if not isinstance(model, (ResT, ResTV2)):
        raise ValueError(f'count_macs takes a ResT or ResTV2 model from create_model, got {type(model).__name__}')
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    v2 = isinstance(model, ResTV2)
    dims = model.embed_dims
    macs = dict(conv=0, depthwise=0, linear=0, attention=0)

    # Stem to stride 4. v1: conv3x3/2 (C/2), conv3x3 (C/2), conv3x3/2 (C); v2: conv3x3/2 (C/2),
    # conv3x3/2 (C), conv1x1 (C). Both end in pixel attention (a depthwise 3x3).
    half = dims[0] // 2
    m, h, w = _conv(h, w, 3, half, 3, 2, 1)
    macs['conv'] += m
    if v2:
        m, h, w = _conv(h, w, half, dims[0], 3, 2, 1)
        macs['conv'] += m + _conv(h, w, dims[0], dims[0], 1, 1, 0)[0]
    else:
        m2, h, w = _conv(h, w, half, half, 3, 1, 1)
        m3, h, w = _conv(h, w, half, dims[0], 3, 2, 1)
        macs['conv'] += m2 + m3
    macs['depthwise'] += _conv(h, w, dims[0], dims[0], 3, 1, 1, groups=dims[0])[0]

    mlp_ratios = (4, 4, 4, 4) if v2 else model.mlp_ratios
    for i, c in enumerate(dims):
        if i > 0:  # patch embedding: conv3x3/2 (k = p + 1, p = 2, pad 1), then pixel attention
            m, h, w = _conv(h, w, dims[i - 1], c, 3, 2, 1)
            macs['conv'] += m
            macs['depthwise'] += _conv(h, w, c, c, 3, 1, 1, groups=c)[0]
        r, heads, n = model.sr_ratios[i], model.num_heads[i], h * w
        for _ in range(model.depths[i]):
            macs['linear'] += 2 * n * c * c                      # q, proj
            hr, wr = h, w
            if r > 1:                                            # sr: depthwise (r+1)x(r+1), stride r
                m, hr, wr = _conv(h, w, c, c, r + 1, r, r // 2, groups=c)
                macs['depthwise'] += m
            kv_tokens = hr * wr
            macs['linear'] += kv_tokens * c * 2 * c              # kv
            macs['attention'] += 2 * n * kv_tokens * c           # q @ k^T and attn @ v over all heads
            if v2:                                               # up: depthwise 3x3, C -> r*r*C
                macs['depthwise'] += _conv(hr, wr, c, r * r * c, 3, 1, 1, groups=c)[0]
            elif model.apply_transform and heads > 1:            # transform_conv: 1x1, heads -> heads
                macs['attention'] += n * kv_tokens * heads * heads
            macs['linear'] += 2 * n * c * int(c * mlp_ratios[i])  # fc1, fc2
    if model.num_classes > 0:
        macs['linear'] += dims[-1] * model.num_classes
    macs['total'] = sum(macs.values())
    return macs
