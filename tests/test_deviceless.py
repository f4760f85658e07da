"""rest_jax.deviceless: train.py's step compiled for a TPU slice on a CPU-only host (needs libtpu)."""

import importlib.util
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np

import pytest

from conftest import REPO
from rest_jax import deviceless, hlo_stats
from rest_jax.train import sharding

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu not installed (pip install -r requirements-tpu.txt)')
TARGET = 'v5e:2x2'  # 4 chips: the smallest slice with both a data and an fsdp axis
# A reduced restv2_tiny: every kind of layer, one block per stage; compiling it takes well under a minute.
REDUCED = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_classes=10)


def compile_reduced(fsdp: int, batch_per_chip: int):
    ct = deviceless.compile_for_target(TARGET, 'restv2_tiny', 'train', batch_per_chip, fsdp=fsdp, image_size=64,
                                       **REDUCED)
    return ct, deviceless.report(ct)


# 128 images per chip: with much fewer, the stage-4 activations are smaller than its weights and XLA
# rightly gathers activations instead of weights under fsdp (real batches are far past that point);
# and 128 fill the lanes of XLA's batch-minor layout, which the MLP kernels need.
PER_CHIP = 128


@pytest.fixture(scope='module')
def fsdp2():
    """The step on a 2 x 2 mesh: both the data axis and the fsdp axis have more than one chip."""
    # Compiled at XLA's default optimisation level, as for users (tests/conftest.py lowers it for the
    # suite's CPU programs).
    before = jax.config.values['jax_disable_most_optimizations']
    jax.config.update('jax_disable_most_optimizations', False)
    try:
        return compile_reduced(fsdp=2, batch_per_chip=PER_CHIP)
    finally:
        jax.config.update('jax_disable_most_optimizations', before)


def sharded_layers(ct) -> set[str]:
    """'stage4_0/attn/q'-style paths of the parameters the state shards over 'fsdp'."""
    state = jax.tree_util.tree_flatten_with_path(ct.compiled.input_shardings[0][0].params)[0]
    return {'/'.join(k.key for k in path[:-1]) for path, s in state if 'fsdp' in str(s.spec)}


def state_bytes(ct) -> tuple[int, int]:
    """(bytes of the train state per chip as the program stores it, bytes of the whole state)."""
    infos, shardings = jax.tree.leaves(ct.compiled.args_info[0][0]), jax.tree.leaves(ct.compiled.input_shardings[0][0])
    size = lambda shape, info: int(np.prod(shape)) * np.dtype(info.dtype).itemsize  # noqa: E731
    return (sum(size(s.shard_shape(i.shape), i) for i, s in zip(infos, shardings)),
            sum(size(i.shape, i) for i in infos))


@needs_libtpu
def test_train_step_for_a_tpu_slice(fsdp2):
    ct, r = fsdp2
    assert r['device_kind'] == 'TPU v5 lite' and r['chips'] == 4 and r['mesh'] == {'data': 2, 'fsdp': 2}
    # The kernel forms follow the target, not this CPU host: the TPU ones, no CPU fence in the program.
    assert ct.model.impl == r['impl'] == 'tpu' and 'reduce-precision' not in ct.compiled.as_text()
    # The batch is split over every chip (the fsdp chips take their own rows too).
    images = ct.compiled.input_shardings[0][1]['image']
    assert images.spec[0] == ('data', 'fsdp') and images.shard_shape((4 * PER_CHIP, 64, 64, 3))[0] == PER_CHIP
    # The gradients (and the BatchNorm statistics, taken over the global batch) are summed over the
    # chips; the sharded weights are gathered within an fsdp group, each in the forward pass and again in
    # the backward pass; nothing else crosses between chips.
    assert set(r['collectives']) <= {'all-gather', 'all-reduce', 'reduce-scatter'}
    assert 'all-reduce' in r['collectives'] and 4 in r['collectives']['all-reduce']['group_sizes']
    assert r['collectives']['all-reduce']['bytes'] >= 2 * r['params']  # at least a bfloat16 copy of every gradient
    gathers = r['collectives']['all-gather']
    assert gathers['group_sizes'] == [2]
    layers = sharded_layers(ct)
    gathered = {s.removeprefix('bwd ').rsplit('/', 1)[0] for s in gathers['sources']}
    assert layers and gathered == layers, (gathered, layers)
    # The attention, the upsample branch with its norm and the MLP (at most 128 channels: every stage of
    # this model) of every block, and the stem's and patch embeddings' pixel attention with its norm, run
    # as the Pallas kernels, forward and backward, on each chip's own
    # images (split by hand: XLA would gather a custom call's whole batch, which the check above
    # excludes); the MLP kernels (with norm2 inside) read XLA's batch-minor layout as it is: no op on an
    # activation around them, copy or other.
    rows = hlo_stats.op_bytes(ct.compiled.as_text())
    kernels = sorted(row['source'].split('/')[0] + ' ' + row['source'].split('/')[-2]
                     for row in rows if row['op'] == 'custom-call' and row['source'].endswith('/pallas_call'))
    embeddings = ['stem', 'patch_2', 'patch_3', 'patch_4']
    assert kernels == sorted([f'{p}stage{i}_0 {k}{b}' for i in range(1, 5)
                              for k in ('emsa_attention', 'mlp', 'upsample_norm')
                              for p, b in [('', ''), ('bwd ', '_backward')]]
                             + [f'{p}{e} pixel_attention{b}' for e in embeddings
                                for p, b in [('', ''), ('bwd ', '_backward')]]), kernels
    around = [row for row in rows if row['op'] != 'custom-call' and ('/mlp/' in row['source'] or '/norm2' in row['source'])
              and row['shape'].count(',') >= 2]
    assert around == [], around   # only the weights (2-D), cast to bfloat16 and transposed
    # The parameters, their EMA and the Adam moments are stored sharded: less state per chip.
    per_chip, whole = state_bytes(ct)
    assert per_chip < 0.75 * whole
    m = r['memory']
    assert m['argument'] >= per_chip and m['peak'] >= m['argument'] and m['alias'] > 0  # the state is donated
    assert 0.9 < r['flops_ratio'] < 1.5 and r['bytes_accessed'] > 0
    assert r['roofline']['step_s'] > 0 and 0 < r['mfu_roofline'] < 1 and len(r['top_bytes']) == 10


@needs_libtpu
def test_inference_over_several_chips_with_and_without_a_mesh_in_context(monkeypatch):
    """`jax.jit` inference of a batch split over four chips: under `jax.set_mesh` the attention kernels,
    the upsample branch's and pixel attention's run on each chip's own images (no collective), and the MLP is XLA's own
    form (one fusion, when it is not differentiated); with no mesh in context, on a host with several
    chips, the portable forms run (XLA's partitioner cannot split a Pallas call), so it compiles."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jax.numpy as jnp
    import rest_jax
    mesh = Mesh(np.array(deviceless.topology_devices(TARGET)), ('data',))
    model = rest_jax.create_model('restv2_tiny', **REDUCED, impl='tpu', dtype=jnp.bfloat16)
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
                             jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    images = jax.ShapeDtypeStruct((4 * 8, 64, 64, 3), jnp.float32, sharding=NamedSharding(mesh, P('data')))
    with jax.set_mesh(mesh):
        text = jax.jit(model.apply).lower(variables, images).compile().as_text()
    kernels = sorted(row['source'].split('/')[0] + ' ' + row['source'].split('/')[-2]
                     for row in hlo_stats.op_bytes(text) if row['op'] == 'custom-call')
    assert kernels == sorted([f'stage{i}_0 {k}' for i in range(1, 5) for k in ('emsa_attention', 'upsample_norm')]
                             + [f'{e} pixel_attention' for e in ('stem', 'patch_2', 'patch_3', 'patch_4')]), kernels
    assert hlo_stats.collectives(text) == {}
    monkeypatch.setattr(jax, 'device_count', lambda *a: 4)   # this host's four TPU chips
    text = jax.jit(model.apply).lower(variables, images).compile().as_text()
    assert 'tpu_custom_call' not in text


@needs_libtpu
def test_mlp_kernels_compile_for_tpu_in_both_layouts():
    """The MLP's gradient over four chips under `jax.set_mesh`: Mosaic compiles both kernels, with the
    LayerNorm inside, for the batch in the lanes (128 images per chip) and for rows of channels (8 per
    chip), and without it; the weight gradients are summed over the chips, and nothing else crosses
    between them."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jax.numpy as jnp
    from rest_jax.ops import tpu
    mesh = Mesh(np.array(deviceless.topology_devices(TARGET)), ('data',))
    replicated = NamedSharding(mesh, P())
    w1, w2 = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=replicated), jax.ShapeDtypeStruct(
        (128, 32), jnp.float32, sharding=replicated)
    b1, b2 = jax.ShapeDtypeStruct((128,), jnp.float32, sharding=replicated), jax.ShapeDtypeStruct(
        (32,), jnp.float32, sharding=replicated)

    def loss(x, w1, b1, w2, b2, *norm):
        return jnp.sum(tpu.mlp(x, w1, b1, w2, b2, jnp.bfloat16, (*norm, 1e-6) if norm else None).astype(jnp.float32) ** 2)
    for per_chip, norm in [(128, (b2, b2)), (8, (b2, b2)), (128, ())]:
        x = jax.ShapeDtypeStruct((4 * per_chip, 8, 8, 32), jnp.bfloat16, sharding=NamedSharding(mesh, P('data')))
        args = (x, w1, b1, w2, b2, *norm)
        with jax.set_mesh(mesh):
            text = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(*args).compile().as_text()
        kernels = sorted(row['source'].split('/')[-2] for row in hlo_stats.op_bytes(text) if row['op'] == 'custom-call')
        assert kernels == ['mlp', 'mlp_backward'], (per_chip, norm, kernels)
        assert set(hlo_stats.collectives(text)) == {'all-reduce'}


@needs_libtpu
def test_attention_kernels_take_the_queries_as_xla_lays_them_out():
    """A ResTv2 block's gradient with 16 images per chip: XLA lays its activations out tokens-major, and
    the attention kernels take q, k and v and give their results in that layout, so that no relayout
    copy of q, k, v, of the attention's output or of their gradients surrounds them. The upsample branch
    (ratio 2) and its LayerNorm run as kernels that write the token grid in that layout too: no copy of
    the branch, its output or its gradient (`tpu_upsample`)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jax.numpy as jnp
    from rest_jax import ops
    from rest_jax.models import rest_v2
    from rest_jax.ops import tpu_attention
    mesh = Mesh(np.array(deviceless.topology_devices(TARGET)), ('data',))
    block = rest_v2.Block(2, 2, 0.0, jnp.bfloat16)
    x = jax.ShapeDtypeStruct((4 * 16, 14, 14, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P('data')))
    params = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 14, 14, 128), jnp.bfloat16))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), params)
    assert tpu_attention.plan(16, 196, 128, 49, 2)[2]

    def loss(params, x):
        with ops.kernel_forms('tpu'):
            return jnp.sum(jnp.square(block.apply(params, x).astype(jnp.float32)))
    with jax.set_mesh(mesh):
        rows = hlo_stats.op_bytes(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text())
    kernels = sorted(row['source'].split('/')[-2] for row in rows if row['op'] == 'custom-call')
    assert kernels == ['emsa_attention', 'emsa_attention_backward', 'mlp', 'mlp_backward', 'upsample_norm',
                       'upsample_norm_backward'], kernels
    relayouts = [row for row in rows if row['op'] == 'copy' and (
        row['shape'].startswith('bf16[16,196,128]')                       # q, the output and their gradients
        or any(s in row['source'] for s in ('emsa_attention', 'attn/reshape', 'attn/add_any')))]
    assert not relayouts, relayouts     # nor of k and v (split from kv)
    # (only the branch's weights are copied, reordered for the kernels)
    shuffles = [row for row in rows if row['op'] == 'copy' and '/up_' in row['source']
                and '16' in re.search(r'\[([\d,]*)\]', row['shape']).group(1).split(',')]
    assert not shuffles, [(row['shape'], row['source']) for row in shuffles]


@needs_libtpu
def test_kernels_fit_the_vmem_of_a_v4_core():
    """v4's cores have 16 MiB of VMEM: the gradient of ResTv2's widest blocks (stages 3 and 4 of
    restv2_tiny, 384 and 768 channels) compiles there with every kernel (Mosaic refused the attention
    kernels' 16- and 8-image blocks, sized for later chips), the attention on smaller blocks than on
    v5p."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jax.numpy as jnp
    from rest_jax import ops
    from rest_jax.models import rest_v2
    from rest_jax.ops import tpu_attention
    mesh = Mesh(np.array(deviceless.topology_devices('v4:2x2x1')), ('data',))
    for heads, ratio, side, c in [(4, 2, 14, 384), (8, 1, 7, 768)]:
        block = rest_v2.Block(heads, ratio, 0.0, jnp.bfloat16)
        x = jax.ShapeDtypeStruct((4 * 32, side, side, c), jnp.bfloat16, sharding=NamedSharding(mesh, P('data')))
        params = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, side, side, c), jnp.bfloat16))
        replicated = NamedSharding(mesh, P())
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params)

        def loss(params, x):
            with ops.kernel_forms('tpu'):
                return jnp.sum(jnp.square(block.apply(params, x).astype(jnp.float32)))
        with jax.set_mesh(mesh):
            plan = tpu_attention.plan(32, side * side, c, 49, 2)
            rows = hlo_stats.op_bytes(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text())
        kernels = {row['source'].split('/')[-2] for row in rows if row['op'] == 'custom-call' and '/' in row['source']}
        assert {'emsa_attention', 'emsa_attention_backward', 'upsample_norm', 'upsample_norm_backward'} <= kernels
        assert plan != tpu_attention.plan(32, side * side, c, 49, 2)   # (v5p's, traced outside the mesh)


def test_kernels_ask_for_vmem_by_chip():
    """The Pallas kernels plan for 24 MB of VMEM and ask Mosaic for a 32 MiB limit on chips with more
    than 16 MiB per core (v5e here), and keep 8 MB under Mosaic's default limit on v4."""
    from jax.sharding import Mesh
    from rest_jax.ops import pallas_lowering
    for target, budget, limit in [(TARGET, pallas_lowering.VMEM_BUDGET, pallas_lowering.VMEM_LIMIT),
                                  ('v4:2x2x1', pallas_lowering.SMALL_VMEM_BUDGET, None)]:
        with jax.set_mesh(Mesh(np.array(deviceless.topology_devices(target)), ('data',))):
            assert pallas_lowering.vmem_budget() == budget
            assert pallas_lowering.compiler_params('parallel').vmem_limit_bytes == limit
    assert pallas_lowering.VMEM_BUDGET < pallas_lowering.VMEM_LIMIT


def test_sources_of_rematerialised_ops():
    """An op that jax.checkpoint recomputes (remat) is attributed to its layer, as the rest."""
    prefix = 'jit(train_step)/transpose(jvp(ResTV2))/ResTV2.forward_features/stage4_0/mlp/fc2'
    remat = f'{prefix}/jvp(ResTV2)/ResTV2.forward_features/stage4_0/mlp/fc2/checkpoint/rematted_computation/dot_general'
    sources = [hlo_stats._source(hlo_stats.Instruction('f', 'f32[2]', 'fusion', [], f'metadata={{op_name="{name}"}}'))
               for name in (remat, f'{prefix}/dot_general', 'jit(train_step)/jvp(ResTV2)/stage1_0/attn/attn/add')]
    assert sources == ['bwd stage4_0/mlp/fc2/dot_general'] * 2 + ['stage1_0/attn/attn/add']


@needs_libtpu
def test_pod_meshes():
    """Every fsdp size that divides a 64-chip v5p slice gives a mesh; 8 needs a split physical axis and
    still keeps each fsdp group on a compact block of neighbouring chips."""
    devices = deviceless.topology_devices('v5p:4x4x4')
    for fsdp in (1, 2, 4, 8, 16, 32, 64):
        mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': fsdp}), devices)
        assert dict(mesh.shape) == {'data': 64 // fsdp, 'fsdp': fsdp}
        for group in mesh.devices:
            coords = np.array([d.coords for d in group])
            assert np.prod(coords.max(0) - coords.min(0) + 1) == fsdp  # a box of exactly the group's chips
    with pytest.raises(ValueError, match='fsdp size of 1, 2, 4, 8, 16, 32, 64$'):
        sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 3}), devices)


@needs_libtpu
def test_a_step_that_does_not_fit_is_one_line(monkeypatch):
    """XLA refusing a program larger than the chip's HBM is reported in one line, with what to change."""
    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for '
                                         'HLO temporaries (18.07G) exceeds available HBM (15.75G).')
    monkeypatch.setattr(jax.stages.Lowered, 'compile', out_of_memory)
    with pytest.raises(deviceless.TargetError, match=r'does not fit v5e:2x2: .*18.07G.*use --remat block') as e:
        deviceless.compile_for_target('v5e:2x2', 'restv2_tiny', 'infer', 2, image_size=64,
                                      embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
    assert '\n' not in str(e.value)


@needs_libtpu
def test_bad_targets_and_batches():
    with pytest.raises(deviceless.TargetError, match='accepted forms') as bad:
        deviceless.topology_devices('v5p-16')
    assert '\n' not in str(bad.value)
    with pytest.raises(deviceless.TargetError, match='does not divide over the 4 devices') as bad:
        deviceless.compile_for_target(TARGET, 'restv2_tiny', batch_size=6, **REDUCED)
    assert '\n' not in str(bad.value)
    result = subprocess.run([sys.executable, '-m', 'rest_jax.deviceless', '--target', 'v9z:2x2'], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.startswith('error: unknown TPU topology') and len(result.stderr.splitlines()) == 1, result.stderr


def test_libtpu_missing(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'libtpu' else find_spec(name, *a))
    with pytest.raises(deviceless.TargetError, match=r'pip install -r requirements-tpu.txt$'):
        deviceless.topology_devices(TARGET)


def test_gpu_target_errors(monkeypatch):
    """A GPU target is kind:count; without jax's CUDA plugin the one-line error says what to install."""
    with pytest.raises(deviceless.TargetError, match='kind:count, e.g. h100:8') as bad:
        deviceless.topology_devices('h100:eight')
    assert '\n' not in str(bad.value)
    monkeypatch.setattr(deviceless, 'cuda_plugin_installed', lambda: False)
    with pytest.raises(deviceless.TargetError, match=re.escape(f"pip install 'jax[cuda12-local]=={jax.__version__}'")):
        deviceless.topology_devices('h100:8')


def test_gpu_target_config_is_a_device_description():
    """The description handed to XLA's GPU compiler carries the published figures of the GPU."""
    text = deviceless.GPUS['h100'].target_config()
    assert 'core_count: 132' in text and 'cuda_compute_capability { major: 9 minor: 0 }' in text
    assert 'device_memory_size: 84942979072' in text and 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    assert deviceless.CHIPS['NVIDIA H100 80GB HBM3'].hbm_bytes == 80e9


@pytest.mark.skipif(not deviceless.cuda_plugin_installed(),
                    reason="jax's CUDA plugin not installed (pip install 'jax[cuda12-local]==<jax version>'); "
                           'it is left out of the test set-up because it makes jax warn on every start without CUDA')
def test_gpu_train_step_memory():
    """The reduced model's training step compiled for two H100s without a GPU: portable forms, gradients
    all-reduced, memory figures against the GPU's 80 GB, no cost analysis."""
    ct = deviceless.compile_for_target('h100:2', 'restv2_tiny', 'train', 16, image_size=64, **REDUCED)
    r = deviceless.report(ct)
    assert r['device_kind'] == 'NVIDIA H100 80GB HBM3' and r['chips'] == 2 and ct.model.impl == 'xla'
    assert r['flops'] is None and 'roofline' not in r and r['bytes_by_layer'] == []
    assert 0 < r['memory']['peak'] < 2e9 and r['memory_fraction'] == r['memory']['peak'] / 80e9
    # The gradients are all-reduced; XLA's GPU partitioner also gathers the activations for the kernel
    # gradient of the upsample branch's depthwise conv (a batch-grouped convolution), and nothing else.
    assert 'all-reduce' in r['collectives'] and set(r['collectives']) <= {'all-reduce', 'all-gather'}
    assert all(s.startswith('bwd ') and '/attn/up_0/' in s for s in r['collectives'].get('all-gather', {}).get('sources', []))
    text = deviceless.describe(r)
    assert 'no cost analysis for NVIDIA H100 80GB HBM3 (memory only)' in text and 'bytes accessed' not in text
