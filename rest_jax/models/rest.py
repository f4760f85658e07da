"""ResT v1 (Zhang & Yang, "ResT: An Efficient Transformer for Visual Recognition", NeurIPS 2021).

A port of wofmanaf/ResT `models/rest.py` (commit b9245d3f). Submodules carry the official attribute
names (`stem.conv1`, `patch_embed_2`, `stage1_0.attn.sr`, ...) so that conversion is a rename and a
transpose. Numerics as the official code: LayerNorm eps 1e-5, BatchNorm eps 1e-5, exact GELU,
InstanceNorm eps 1e-5 without affine on the attention maps, symmetric explicit padding.
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

LN_EPS = 1e-5  # v1 uses nn.LayerNorm's default eps


class Attention(nn.Module):
    """EMSA: keys/values from a depthwise-strided reduction of x; optional head interaction."""
    num_heads: int
    qkv_bias: bool = False
    qk_scale: float | None = None
    sr_ratio: int = 1             # spatial reduction of keys/values (stride of the `sr` conv)
    apply_transform: bool = False  # 1x1 conv across heads + InstanceNorm (only when heads > 1)
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        scale = self.qk_scale or hd ** -0.5
        q, q_bias = layers.dense(c, use_bias=self.qkv_bias, dtype=self.dtype, name='q')(x, bias_apart=True)
        if self.sr_ratio > 1:
            r = self.sr_ratio
            x = layers.DepthwiseConv(c, r + 1, r, r // 2, dtype=self.dtype, name='sr')(x)
            x = layers.LayerNorm(LN_EPS, self.dtype, name='sr_norm')(x)
        kv = layers.dense(2 * c, use_bias=self.qkv_bias, dtype=self.dtype, name='kv')(x)
        kv = kv.reshape(b, -1, 2 * c)
        k, v = kv[..., :c], kv[..., c:]     # channel i c + j: the official (2, heads, head_dim) order
        if not (self.apply_transform and heads > 1):
            out = ops.attention(q, k, v, heads, scale, q_bias)   # the bias added (and differentiated) there
            return layers.dense(c, dtype=self.dtype, name='proj')(out)

        m = k.shape[1]
        q = q if q_bias is None else q + q_bias
        attn = jnp.einsum('bnhd,bmhd->bhnm', q.reshape(b, h * w, heads, hd), k.reshape(b, m, heads, hd),
                          preferred_element_type=jnp.float32) * scale
        attn = HeadTransform(heads, dtype=self.dtype, name='transform_conv')(attn)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1)
        # InstanceNorm2d(heads): each head's (N, M) map normalised, eps 1e-5, no affine.
        mean = attn.mean((2, 3), keepdims=True)
        var = jnp.square(attn - mean).mean((2, 3), keepdims=True)
        attn = (attn - mean) * jax.lax.rsqrt(var + 1e-5)
        out = jnp.einsum('bhnm,bmhd->bnhd', attn.astype(self.dtype), v.reshape(b, m, heads, hd)).reshape(b, h, w, c)
        return layers.dense(c, dtype=self.dtype, name='proj')(out)


class HeadTransform(nn.Module):
    """`nn.Conv2d(heads, heads, 1)` applied to (B, heads, N, M) attention logits: a mix of heads."""
    num_heads: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, attn: jax.Array) -> jax.Array:
        n = self.num_heads
        kernel = self.param('kernel', layers.weight_init, (1, 1, n, n))
        bias = self.param('bias', nn.initializers.zeros, (n,))
        out = jnp.einsum('bhnm,hg->bgnm', attn, kernel[0, 0].astype(self.dtype))
        return out + bias.astype(self.dtype)[:, None, None]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with drop path."""
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: float | None = None
    sr_ratio: int = 1
    apply_transform: bool = False
    drop_path: float = 0.0
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        drop = layers.DropPath(self.drop_path)
        y = layers.LayerNorm(LN_EPS, self.dtype, name='norm1')(x)
        y = Attention(self.num_heads, self.qkv_bias, self.qk_scale, self.sr_ratio, self.apply_transform,
                      dtype=self.dtype, name='attn')(y)
        x = x + drop(y, deterministic=not train)
        norm2 = layers.LayerNormParams(name='norm2')(c)
        y = layers.Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name='mlp')(x, norm=(*norm2, LN_EPS))
        return x + drop(y, deterministic=not train)


class BasicStem(nn.Module):
    """conv3x3/2-BN-ReLU, conv3x3-BN-ReLU, conv3x3/2 (no biases), then PA: stride 4."""
    out_ch: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        hidden = self.out_ch // 2
        kw = dict(dtype=self.dtype)
        x = layers.Conv(hidden, 3, 2, 1, use_bias=False, **kw, name='conv1')(x)
        x = nn.relu(layers.BatchNorm(dtype=self.dtype, name='norm1')(x, train))
        x = layers.Conv(hidden, 3, 1, 1, use_bias=False, **kw, name='conv2')(x)
        x = nn.relu(layers.BatchNorm(dtype=self.dtype, name='norm2')(x, train))
        x = layers.Conv(self.out_ch, 3, 2, 1, use_bias=False, **kw, name='conv3')(x)
        return layers.PA(self.dtype, name='pos')(x)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: conv (k=p+1, stride p, pad p//2) -> BatchNorm -> PA."""
    out_ch: int
    patch_size: int = 2
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        p = self.patch_size
        kw = dict(dtype=self.dtype)
        x = layers.Conv(self.out_ch, p + 1, p, p // 2, use_bias=True, **kw, name='conv')(x)
        x = layers.BatchNorm(dtype=self.dtype, name='norm')(x, train)
        return layers.PA(self.dtype, name='pos')(x)


class ResT(Backbone):
    """ResT v1. `__call__` gives logits; `forward_features` the four stage outputs (NHWC)."""
    num_classes: int = 1000
    embed_dims: Sequence[int] = (64, 128, 256, 512)
    num_heads: Sequence[int] = (1, 2, 4, 8)
    mlp_ratios: Sequence[float] = (4, 4, 4, 4)
    qkv_bias: bool = False
    qk_scale: float | None = None
    drop_path_rate: float = 0.0
    depths: Sequence[int] = (2, 2, 2, 2)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    apply_transform: bool = False
    dtype: layers.Dtype = jnp.float32   # computation dtype; parameters are float32
    impl: str = 'auto'                  # kernel forms: 'auto' | 'xla' | 'cpu' | 'tpu' (rest_jax.ops)
    conv_impl: str | None = None        # former name of `impl` ('lax' = 'xla', 'shift' = 'cpu')
    remat: str = 'none'                 # recompute blocks in the backward pass: 'none' | 'block' | a jax.checkpoint_policies name

    def setup(self):
        dims, kw = self.embed_dims, dict(dtype=self.dtype)
        self.stem = BasicStem(dims[0], **kw)
        self.patch_embed_2 = PatchEmbed(dims[1], **kw)
        self.patch_embed_3 = PatchEmbed(dims[2], **kw)
        self.patch_embed_4 = PatchEmbed(dims[3], **kw)
        dpr = iter(layers.stochastic_depth_rates(self.drop_path_rate, self.depths))
        stages = []
        for i in range(4):
            stages.append([
                self.rematerialized(Block)(self.num_heads[i], self.mlp_ratios[i], self.qkv_bias, self.qk_scale, self.sr_ratios[i],
                      self.apply_transform, next(dpr), **kw)
                for _ in range(self.depths[i])])
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.norm = layers.LayerNorm(LN_EPS, self.dtype)
        if self.num_classes > 0:
            self.head = nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=layers.weight_init)

    def embeddings(self):
        return (self.stem, self.patch_embed_2, self.patch_embed_3, self.patch_embed_4)


def _v1(name: str, top1: float, gflops: float, **arch) -> None:
    # The official v1 variants share these. The v1 release's datasets.py evaluates with
    # Resize(int(256 / 224 * size)) + CenterCrop(size), i.e. crop_pct 0.875 (the unused default_cfg of
    # models/rest.py says 0.9).
    arch = dict(mlp_ratios=(4, 4, 4, 4), qkv_bias=True, sr_ratios=(8, 4, 2, 1), apply_transform=True, **arch)
    register_model(ModelInfo(name, ResT, arch, top1=top1, gflops=gflops, crop_pct=0.875))


#   name          top-1  GFLOPs  embed_dims              num_heads      depths
_v1('rest_lite',  77.2,  1.4, embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2))
_v1('rest_small', 79.6,  1.9, embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), depths=(2, 2, 6, 2))
_v1('rest_base',  81.6,  4.3, embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(2, 2, 6, 2))
_v1('rest_large', 83.6,  7.9, embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(2, 2, 18, 2))
