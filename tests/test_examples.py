"""The worked examples on a converted golden checkpoint: docs/backbone.md's blocks in order (stage outputs,
heads, saving, the command lines, serving) and examples/nnx_finetune.py."""

from __future__ import annotations

import re
import shlex
import sys

import numpy as np
import pytest
from PIL import Image

import rest_jax
from conftest import REPO, convert_golden

STEM = 'v2_reduced'
GUIDE = REPO / 'docs' / 'backbone.md'


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A directory with out/restv2_tiny (the golden v2 checkpoint, converted) and cat.jpg."""
    root = tmp_path_factory.mktemp('examples')
    convert_golden(root / 'out' / 'restv2_tiny', STEM)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), np.uint8)).save(root / 'cat.jpg')
    return root


def test_backbone_guide_runs(workspace, monkeypatch, capsys):
    from rest_jax.__main__ import main as cli
    monkeypatch.chdir(workspace)
    namespace: dict = {}
    ran = []
    for language, code in re.findall(r'```(\w+)\n(.*?)```', GUIDE.read_text(), re.S):
        if language == 'python':
            exec(compile(code, str(GUIDE), 'exec'), namespace)
            ran.append('python')
            continue
        for line in code.splitlines():
            command = shlex.split(line, comments=True)
            if command[:3] == ['python', '-m', 'rest_jax']:   # the tools, in this process
                assert cli(command[3:]) == 0, (line, capsys.readouterr().err)
                ran.append(command[3])
    assert ran == ['python', 'python', 'python', 'predict', 'export', 'python']
    ns = namespace
    info = ns['backbone'].feature_info
    assert [f.shape[-1] for f in ns['feats']] == info.channels() == [32, 64, 128]
    assert [(480 // f.shape[1], 640 // f.shape[2]) for f in ns['feats']] == [(r, r) for r in info.reduction()]
    assert ns['pooled'].shape == (2, 128) and ns['variables5']['params']['head']['kernel'].shape == (128, 5)
    assert ns['model_again'] == ns['model5'] and ns['cfg'].num_classes == 5 and ns['cfg'].input_size == (3, 224, 224)
    assert ns['probs'].shape == (3, 5) and np.allclose(np.asarray(ns['probs']).sum(-1), 1, atol=1e-5)
    assert ns['serve'].metadata['platforms'] == ['cpu', 'cuda', 'tpu']
    assert 'cat.jpg' in capsys.readouterr().out   # predict's report
    # The README's short form of this guide (its python blocks that load a backbone or an artifact) runs too.
    for code in re.findall(r'```python\n(.*?)```', (REPO / 'README.md').read_text(), re.S):
        if 'features_only=True' in code or 'load_exported' in code:
            readme: dict = {}
            exec(compile(code, 'README.md', 'exec'), readme)
            if 'feats' in readme:
                assert [f.shape[-1] for f in readme['feats']] == readme['backbone'].feature_info.channels()


def test_nnx_finetune_example(workspace):
    """Wrapped with flax.nnx.bridge: the Linen model's logits exactly, then NNX-style training steps."""
    assert 'python examples/nnx_finetune.py --checkpoint out/restv2_tiny' in GUIDE.read_text()
    sys.path.insert(0, str(REPO / 'examples'))
    try:
        import nnx_finetune
    finally:
        sys.path.remove(str(REPO / 'examples'))
    # XLA's grouped conv: its backward pass compiles in half the time of the CPU form.
    out = nnx_finetune.main(['--checkpoint', str(workspace / 'out' / 'restv2_tiny'), '--num-classes', '3',
                             '--steps', '3', '--batch-size', '2', '--image-size', '64', '--impl', 'xla'])
    assert out['difference'] == 0.0
    losses = out['losses']
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # BatchNorm's running statistics were updated in the NNX module, by path.
    from flax import nnx, traverse_util
    stats = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(out['net'], nnx.BatchStat)))
    _, loaded = rest_jax.load_pretrained(workspace / 'out' / 'restv2_tiny')
    before = traverse_util.flatten_dict(loaded['batch_stats'])
    assert stats.keys() == before.keys() and not all(np.array_equal(stats[k], before[k]) for k in stats)
