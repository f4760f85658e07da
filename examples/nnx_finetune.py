"""Fine-tune a converted ResT inside Flax NNX code: the Linen model wrapped with `flax.nnx.bridge.ToNNX`.

    python examples/nnx_finetune.py --checkpoint out/restv2_tiny --num-classes 5 --steps 10

The checkpoint's weights go into the NNX module as they are (no random init is computed), its logits
equal the Linen model's, and an `nnx.Optimizer` (AdamW) trains the whole network in NNX style, BatchNorm
statistics included. The data here are random images with random labels (the loss falls as the
network memorises them); put your own batches in their place.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

import rest_jax


def to_nnx(model, variables, seed: int = 0) -> nnx.Module:
    """The Linen `model` as an NNX module holding `variables` ({'params', 'batch_stats'})."""
    def wrapped():
        return nnx.bridge.ToNNX(model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    # The variable layout, from shapes only (eval_shape: no init FLOPs, no compile) ...
    abstract = nnx.eval_shape(lambda: wrapped().lazy_init(jnp.zeros((1, 32, 32, 3)), train=False))
    graphdef, weights, _ = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
    # ... filled with the loaded weights (NNX keeps parameters and statistics side by side, by path) ...
    flat = {**traverse_util.flatten_dict(variables['params']), **traverse_util.flatten_dict(variables['batch_stats'])}
    nnx.replace_by_pure_dict(weights, traverse_util.unflatten_dict(flat))
    # ... and real random streams (the drop-path rng) in place of the abstract ones.
    _, rngs = nnx.split(wrapped(), nnx.RngState)
    return nnx.merge(graphdef, weights, rngs)


@nnx.jit
def train_step(net, optimizer, images, labels):
    def loss_fn(net):
        # train=True: BatchNorm on batch statistics (updated in `net`), drop path from the module's rngs.
        logits = net(images, train=True, mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(net)
    optimizer.update(net, grads)
    return loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--checkpoint', required=True, help='a converted or saved directory, or a training workdir')
    parser.add_argument('--num-classes', type=int, default=5, help='classes of the new head')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--image-size', type=int, default=None, help="default: the checkpoint's")
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--impl', default='auto', help="kernel forms (rest_jax.ops): auto, xla or cpu")
    args = parser.parse_args(argv)

    model, variables = rest_jax.load_pretrained(args.checkpoint, impl=args.impl)
    model, variables = rest_jax.reset_classifier(model, variables, args.num_classes, key=jax.random.key(0))
    size = args.image_size or rest_jax.pretrained_cfg(model).input_size[1]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, args.num_classes, args.batch_size)

    net = to_nnx(model, variables)
    linen_logits = jax.jit(model.apply)(variables, images)
    nnx_logits = nnx.jit(lambda net, x: net(x))(net, images)
    difference = float(jnp.abs(nnx_logits - linen_logits).max())
    print(f'NNX vs Linen logits before training: max difference {difference:.3g}')

    optimizer = nnx.Optimizer(net, optax.adamw(args.lr, weight_decay=0.05), wrt=nnx.Param)
    # Commit the state to one device once: arrays from init are uncommitted and a step's outputs committed,
    # and jit compiles a program for each; committed from the start, the step compiles once.
    nnx.update((net, optimizer), jax.device_put(nnx.state((net, optimizer)), jax.devices()[0]))
    losses = []
    for step in range(args.steps):
        losses.append(float(train_step(net, optimizer, images, labels)))
        print(f'step {step + 1}: loss {losses[-1]:.4f}')
    return {'difference': difference, 'losses': losses, 'net': net, 'images': images}


if __name__ == '__main__':
    main()
    sys.exit(0)
