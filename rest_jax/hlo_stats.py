"""Where a compiled program's bytes and collectives go, read from its optimized HLO text.

XLA's `cost_analysis()` gives one total for the whole program; a TPU executable has no per-op cost
table that JAX exposes. The optimized HLO (`compiled.as_text()`) has every instruction with its
result type, operands, fusion kind and the JAX source (`metadata={op_name=...}`), which is enough to
attribute bytes: an instruction reads its operands and writes its result, so its bytes are the sum of
their array sizes. This counts whole operands, where XLA's own analysis counts only what a fusion
actually reads (a slice of a larger array, say), so the per-op figures are upper bounds; their sum
is reported beside XLA's total to show how close they are.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# Instructions that move no data of their own: views, tuple plumbing, the ends of async pairs.
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all', 'partition-id',
         'replica-id', 'copy-done', 'all-reduce-done', 'all-gather-done', 'collective-permute-done',
         'async-done', 'send-done', 'recv-done', 'opt-barrier'}
_BITS = {'pred': 8, 's4': 4, 'u4': 4, 's8': 8, 'u8': 8, 's16': 16, 'u16': 16, 'f16': 16, 'bf16': 16,
         's32': 32, 'u32': 32, 'f32': 32, 's64': 64, 'u64': 64, 'f64': 64, 'c64': 64, 'c128': 128}
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\](?:\{([\d,]*):?([^}]*)\})?')
_ARRAY_TEXT = re.compile(r'\b((?:pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[[\d,]*\])(\{[^}]*\})?')
_HEADER = re.compile(r'^(ENTRY )?%([\w.\-]+) .*\{$')
_INSTR = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$')
_OPERAND = re.compile(r'%([\w.\-]+)')
_CALLED = re.compile(r'\b(?:body|condition|true_computation|false_computation|branch_computations)=\{?([^}]*?)\}?(?:, |$)')


@dataclasses.dataclass
class Instruction:
    name: str
    type: str            # the result type as printed, layouts included
    opcode: str
    operands: list[str]
    attrs: str           # everything after the operand list

    @property
    def result_bytes(self) -> int:
        return shape_bytes(self.type)

    def attr(self, key: str) -> str | None:
        match = re.search(rf'\b{key}=("[^"]*"|[^,\s]+)', self.attrs)
        return match.group(1).strip('"') if match else None


def shape_bytes(type_text: str, padded: bool = True) -> int:
    """Bytes of every array in an HLO type string (a tuple counts all its elements).

    padded: count the array as laid out in memory. A TPU layout such as `{3,2,1,0:T(8,128)(2,1)}`
    tiles the two most minor dimensions (8 x 128 here), so an image of 3 channels occupies 128 lanes
    and a row of 96 channels 128: that padding is read and written like data. False: the logical size.
    """
    total = 0
    for dtype, dims_text, minor_to_major, layout in _ARRAY.findall(type_text):
        dims = [int(d) for d in dims_text.split(',') if d]
        tile = re.search(r'T\(([\d,]+)\)', layout) if padded else None
        if tile:
            order = [int(i) for i in minor_to_major.split(',') if i] or list(range(len(dims)))[::-1]
            physical = [dims[i] for i in reversed(order)]            # major to minor
            sizes = [int(t) for t in tile.group(1).split(',')]
            physical = [1] * max(0, len(sizes) - len(physical)) + physical
            for j, t in enumerate(reversed(sizes), 1):
                physical[-j] = -(-physical[-j] // t) * t
            dims = physical
        count = 1
        for d in dims:
            count *= d
        total += count * _BITS.get(dtype, 8) // 8   # f8 variants: 8 bits
    return total


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: its instructions}, name of the ENTRY computation) of an HLO module's text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = '', None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(' '):
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        match = _INSTR.match(line) if current is not None else None
        if match:
            name, type_text, opcode, rest = match.groups()
            depth, end = 1, len(rest)
            for i, ch in enumerate(rest):   # the operand list ends at the parenthesis that closes it
                depth += (ch == '(') - (ch == ')')
                if depth == 0:
                    end = i
                    break
            current.append(Instruction(name, type_text, opcode, _OPERAND.findall(rest[:end]), rest[end + 1:]))
    return computations, entry


def _executed(computations: dict[str, list[Instruction]], entry: str) -> list[Instruction]:
    """The instructions the program runs as steps: ENTRY's, and those of the loops and conditionals it
    calls (a fusion's inner instructions are one step, its own)."""
    out, todo, seen = [], [entry], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for inst in computations[name]:
            out.append(inst)
            if inst.opcode in ('while', 'conditional', 'call'):
                for group in _CALLED.findall(inst.attrs):
                    todo.extend(_OPERAND.findall(group))
                called = inst.attr('to_apply') if inst.opcode == 'call' else None
                if called:
                    todo.append(called.lstrip('%'))
    return out


_REMAT_SCOPES = {'checkpoint', 'remat', 'rematted_computation'}


def _source(inst: Instruction) -> str:
    """The model path of an instruction's JAX source ('stage1_0/mlp/fc1/dot_general'); 'bwd ' marks the
    backward pass. Transform and module-class prefixes (jit(...), jvp(...), ResTV2.forward_features)
    are dropped, and so is what `jax.checkpoint` adds: its scope names and the module path that a
    rematerialised computation repeats ('stage1_0/mlp/fc2/stage1_0/mlp/fc2/checkpoint/...'), as in a
    step compiled with remat."""
    name = (inst.attr('op_name') or '').split(';')[0]
    parts = [p for p in name.split('/') if '(' not in p and not p.startswith('ResT') and p not in _REMAT_SCOPES]
    for k in range(1, len(parts) // 2 + 1):
        if parts[:k] == parts[k:2 * k]:
            parts = parts[k:]
            break
    return ('bwd ' if 'transpose(' in name else '') + '/'.join(parts)


def _short_type(type_text: str) -> str:
    """'bf16[8,56,56,64]', or the first array of a tuple and how many more follow."""
    arrays = [f'{d}[{s}]' for d, s, _, _ in _ARRAY.findall(type_text)]
    if not arrays:
        return type_text
    return arrays[0] + (f' (+{len(arrays) - 1} more)' if len(arrays) > 1 else '')


def _group_size(inst: Instruction) -> int | None:
    """Devices in each replica group, from any of the printed forms of replica_groups."""
    text = inst.attrs
    iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', text)
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)? \{([^}]*)\}", text)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        size = 1
        for axis in re.findall(r"'(\w+)'", mesh.group(2)):
            size *= int(sizes.get(axis, 1))
        return size
    explicit = re.search(r'replica_groups=\{\{([\d,]*)\}', text)
    return len(explicit.group(1).split(',')) if explicit else None


def collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
    """{kind: {'count', 'bytes', 'group_sizes', 'sources'}} over the compiled program's collectives.

    One collective is counted once: the TPU compiler splits some into pieces inside several async
    fusions that share the collective's channel_id, so (kind, channel_id) identifies it. Bytes are the
    array it works on, per chip (logical size, no layout padding): the gathered result of an all-gather, the full input of a
    reduce-scatter, the reduced array of an all-reduce. A collective inside a loop body counts once.
    """
    computations, _ = parse(hlo_text)
    defined = {i.name: i for insts in computations.values() for i in insts}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for insts in computations.values():
        for inst in insts:
            kind = inst.opcode.removesuffix('-start')
            if kind not in COLLECTIVES:
                continue
            if inst.opcode.endswith('-start'):  # (operand, result[, context]) tuple: the larger array
                size = max((shape_bytes(f'{d}[{s}]') for d, s, _, _ in _ARRAY.findall(inst.type)), default=0)
            elif kind == 'reduce-scatter':
                size = sum(shape_bytes(defined[o].type, padded=False) for o in inst.operands if o in defined)
            else:
                size = shape_bytes(inst.type, padded=False)
            key = (kind, inst.attr('channel_id') or inst.name)
            entry = seen.setdefault(key, {'bytes': 0, 'group': _group_size(inst), 'source': _source(inst)})
            entry['bytes'] = max(entry['bytes'], size)
    out: dict[str, dict[str, Any]] = {}
    for (kind, _), e in seen.items():
        row = out.setdefault(kind, {'count': 0, 'bytes': 0, 'group_sizes': set(), 'sources': []})
        row['count'] += 1
        row['bytes'] += e['bytes']
        if e['group']:
            row['group_sizes'].add(e['group'])
        row['sources'].append(e['source'])
    for row in out.values():
        row['group_sizes'] = sorted(row['group_sizes'])
    return out


def op_bytes(hlo_text: str) -> list[dict[str, Any]]:
    """Every executed instruction that moves data, with the bytes it reads and writes, largest first.

    Each row: {'name', 'op' (opcode, with the fusion kind), 'bytes', 'source' (JAX op_name, 'bwd ' for
    the backward pass), 'shape' (the result's first array)}. Instructions that move nothing of their
    own (parameters, tuples, bitcasts, the done halves of async pairs) are left out; the start half of
    an async pair (a copy to or from on-chip memory, a collective) counts its operand and the one array
    it writes, not the operand again that its result tuple repeats.
    """
    computations, entry = parse(hlo_text)
    defined = {i.name: i for insts in computations.values() for i in insts}
    rows = []
    for inst in _executed(computations, entry):
        if inst.opcode in _FREE or inst.opcode in ('while', 'conditional', 'call'):
            continue
        read = sum(defined[o].result_bytes for o in inst.operands if o in defined)
        if inst.opcode.endswith('-start'):
            written = max((shape_bytes(''.join(a)) for a in _ARRAY_TEXT.findall(inst.type)), default=0)
        else:
            written = inst.result_bytes
        kind = inst.attr('kind')
        rows.append({'name': inst.name, 'op': inst.opcode + (f' {kind[1:]}' if kind else ''), 'bytes': read + written,
                     'source': _source(inst), 'shape': _short_type(inst.type)})
    rows.sort(key=lambda r: -r['bytes'])
    return rows


def top_bytes(hlo_text: str, n: int = 10) -> tuple[list[dict[str, Any]], int]:
    """(the n rows of `op_bytes` with the most bytes, the sum over all rows)."""
    rows = op_bytes(hlo_text)
    return rows[:n], sum(r['bytes'] for r in rows)


def bytes_by_layer(rows: list[dict[str, Any]], n: int = 10) -> list[tuple[str, int]]:
    """[(layer, bytes)] summed over every block and both passes, largest first: 'mlp/fc1' gathers
    stage1_0/mlp/fc1 ... stage4_2/mlp/fc1, forward and backward. Sources outside a block keep their
    first component ('stem/norm'); instructions without a source go by opcode ('(copy, no source)')."""
    out: dict[str, int] = defaultdict(int)
    for row in rows:
        parts = row['source'].removeprefix('bwd ').split('/')[:-1]   # the last part is the op itself
        if parts and re.fullmatch(r'stage\d+_\d+', parts[0]):
            parts = parts[1:]
        elif parts and re.fullmatch(r'patch_\d+', parts[0]):
            parts = ['patch'] + parts[1:]
        out['/'.join(parts) or f"({row['op']}, no source)"] += row['bytes']
    return sorted(out.items(), key=lambda kv: -kv[1])[:n]
