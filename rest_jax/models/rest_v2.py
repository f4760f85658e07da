"""ResTv2 (Zhang & Yang, "ResT V2: Simpler, Faster and Stronger", NeurIPS 2022).

A port of wofmanaf/ResT `models/rest_v2.py` (commit b9245d3f). EMSAv2 drops v1's head interaction
and adds an upsample branch: the reduced values go through a depthwise 3x3 conv to sr*sr*C channels,
PyTorch's PixelShuffle and a LayerNorm, and are added to the attention output before `proj`.
Numerics as the official code: LayerNorm eps 1e-6 everywhere, BatchNorm eps 1e-5, exact GELU.

Beyond the official code, any input size from 32 up works: token grids come from the convolutions'
actual outputs, and the upsampled branch (ceil(H/sr)*sr rows) is cropped to the H x W token grid.
Where the official code runs (H, W divisible by 32), the crop is a no-op and results are identical.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from rest_jax import ops
from rest_jax.models import layers
from rest_jax.models.backbone import Backbone
from rest_jax.models.registry import ModelInfo, register_model

LN_EPS = 1e-6  # v2 sets eps=1e-6 on every LayerNorm


class Attention(nn.Module):
    """EMSAv2: attention on reduced keys/values plus the pixel-shuffle upsample branch of v."""
    num_heads: int
    sr_ratio: int = 1
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads, hd, r = self.num_heads, c // self.num_heads, self.sr_ratio
        q, q_bias = layers.dense(c, dtype=self.dtype, name='q')(x, bias_apart=True)   # the bias: in ops.attention
        if r > 1:
            x = layers.DepthwiseConv(c, r + 1, r, r // 2, dtype=self.dtype, name='sr')(x)
            x = layers.LayerNorm(LN_EPS, self.dtype, name='sr_norm')(x)
        hr, wr = x.shape[1:3]
        kv = layers.dense(2 * c, dtype=self.dtype, name='kv')(x).reshape(b, hr * wr, 2 * c)
        k, v = kv[..., :c], kv[..., c:]     # channel i c + j: the official (2, heads, head_dim) order
        out = ops.attention(q, k, v, heads, hd ** -0.5, q_bias)

        # The official code reshapes v (B, heads, M, hd) to (B, C, H/sr, W/sr): channel = head * hd + d,
        # which is exactly the (heads, hd) order of our last axis.
        # The branch, its LayerNorm (up_norm) and the sum with the attention output, as one op; the norm
        # is per pixel, so the crop to the h x w token grid comes after it with the same pixels.
        up_norm = layers.LayerNormParams(name='up_norm')(c)
        out = layers.DepthwiseUpsample(r, dtype=self.dtype, name='up_0')(
            v.reshape(b, hr, wr, c), norm=(*up_norm, LN_EPS), add=out)
        return layers.dense(c, dtype=self.dtype, name='proj')(out)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), x + mlp(norm2(x)); MLP ratio 4, drop path."""
    num_heads: int
    sr_ratio: int = 1
    drop_path: float = 0.0
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        drop = layers.DropPath(self.drop_path)
        y = layers.LayerNorm(LN_EPS, self.dtype, name='norm1')(x)
        y = Attention(self.num_heads, self.sr_ratio, self.dtype, name='attn')(y)
        x = x + drop(y, deterministic=not train)
        norm2 = layers.LayerNormParams(name='norm2')(x.shape[-1])
        y = layers.Mlp(4 * x.shape[-1], dtype=self.dtype, name='mlp')(x, norm=(*norm2, LN_EPS))
        return x + drop(y, deterministic=not train)


class ConvStem(nn.Module):
    """conv3x3/2-BN-ReLU twice (no biases), conv1x1, PA, LayerNorm: stride 4.

    Submodule names follow the official `proj` nn.Sequential: proj.0, proj.1, proj.3, proj.4, proj.6.
    """
    out_ch: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        half = self.out_ch // 2
        kw = dict(dtype=self.dtype)
        x = layers.Conv(half, 3, 2, 1, use_bias=False, **kw, name='proj_0')(x)
        x = nn.relu(layers.BatchNorm(dtype=self.dtype, name='proj_1')(x, train))
        x = layers.Conv(self.out_ch, 3, 2, 1, use_bias=False, **kw, name='proj_3')(x)
        x = nn.relu(layers.BatchNorm(dtype=self.dtype, name='proj_4')(x, train))
        x, bias = layers.Conv(self.out_ch, 1, 1, 0, use_bias=True, **kw, name='proj_6')(x, bias_apart=True)
        norm = layers.LayerNormParams(name='norm')(self.out_ch)
        return layers.PA(self.dtype, name='pos')(x, norm=(*norm, LN_EPS), x_bias=bias)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: conv3x3/2 (pad 1) -> PA -> LayerNorm."""
    out_ch: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm here; same signature as ConvStem
        kw = dict(dtype=self.dtype)
        x, bias = layers.Conv(self.out_ch, 3, 2, 1, use_bias=True, **kw, name='proj')(x, bias_apart=True)
        norm = layers.LayerNormParams(name='norm')(self.out_ch)
        return layers.PA(self.dtype, name='pos')(x, norm=(*norm, LN_EPS), x_bias=bias)


class ResTV2(Backbone):
    """ResTv2. `__call__` gives logits; `forward_features` the four stage outputs (NHWC)."""
    num_classes: int = 1000
    embed_dims: Sequence[int] = (96, 192, 384, 768)
    num_heads: Sequence[int] = (1, 2, 4, 8)
    drop_path_rate: float = 0.0
    depths: Sequence[int] = (2, 2, 2, 2)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    dtype: layers.Dtype = jnp.float32   # computation dtype; parameters are float32
    impl: str = 'auto'                  # kernel forms: 'auto' | 'xla' | 'cpu' | 'tpu' (rest_jax.ops)
    conv_impl: str | None = None        # former name of `impl` ('lax' = 'xla', 'shift' = 'cpu')
    remat: str = 'none'                 # recompute blocks in the backward pass: 'none' | 'block' | a jax.checkpoint_policies name

    def setup(self):
        dims, kw = self.embed_dims, dict(dtype=self.dtype)
        self.stem = ConvStem(dims[0], **kw)
        self.patch_2 = PatchEmbed(dims[1], **kw)
        self.patch_3 = PatchEmbed(dims[2], **kw)
        self.patch_4 = PatchEmbed(dims[3], **kw)
        dpr = iter(layers.stochastic_depth_rates(self.drop_path_rate, self.depths))
        stages = [[self.rematerialized(Block)(self.num_heads[i], self.sr_ratios[i], next(dpr), **kw) for _ in range(self.depths[i])]
                  for i in range(4)]
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.norm = layers.LayerNorm(LN_EPS, self.dtype)
        if self.num_classes > 0:
            self.head = nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=layers.weight_init)

    def embeddings(self):
        return (self.stem, self.patch_2, self.patch_3, self.patch_4)


def _v2(name: str, top1: float, gflops: float, **arch) -> None:
    # The v2 release's main.py evaluates with --crop_pct 1.0 (its default; the README's eval command does
    # not set it): datasets.py resizes the shorter side to int(224 / 1.0) = 224 and centre-crops 224, and
    # warps to a square at >= 384.
    register_model(ModelInfo(name, ResTV2, dict(sr_ratios=(8, 4, 2, 1), **arch), top1=top1, gflops=gflops,
                             crop_pct=1.0))


#   name            top-1  GFLOPs  embed_dims                num_heads         depths
_v2('restv2_tiny',  82.3,  4.1, embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 2, 6, 2))
_v2('restv2_small', 83.2,  6.0, embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 2, 12, 2))
_v2('restv2_base',  83.7,  7.9, embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 3, 16, 3))
_v2('restv2_large', 84.2, 13.8, embed_dims=(128, 256, 512, 1024), num_heads=(2, 4, 8, 16), depths=(2, 3, 16, 2))
