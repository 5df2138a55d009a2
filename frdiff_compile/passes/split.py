"""Split: cut one graph into consecutive parts that compile apart and run one after the other.

Why: inductor's work on a graph (AOTAutograd's trace, lowering, scheduling, code generation) is
single-threaded Python, and for SD 1.5's keyframe graph it is most of the first generation's wait (85 of 97 s
on an H200). Parts of one graph can be compiled by separate processes at once (`background_compile`), so
the wait becomes about the largest part's compile instead of the whole graph's.

Invariants:
- Running the parts in order, each on the graph's arguments and the values earlier parts returned, computes
  exactly what the graph computes: the same nodes in the same order (bit-identical in eager), over the same
  `get_attr` targets (the UNet's own Parameters; no weight is copied).
- A value crosses a cut only if it is one tensor (never a tuple or a size), and never into a part that writes
  into it or into anything sharing its memory: a tensor is made and written within one part (writes into the
  graph's own inputs, the cache buffers, go to whichever part holds them, since inputs are passed as they
  are). So no part mutates an input that another input aliases, which its compile could not know.
- Cuts balance the parts' op counts (inductor's work grows with them) and, near each balanced point, cross as
  few values as they can; a graph that cannot be cut in as many parts as asked gets fewer, never a wrong cut.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from .plan import alias_args

# How far from the balanced point (as a share of one part's ops) a cut may move to cross fewer values. Small:
# the compile waits for the largest part, and SD 1.5's cuts cross 8-11 values anywhere near the middle.
WINDOW = 0.05


@dataclasses.dataclass(frozen=True)
class Part:
    gm: fx.GraphModule
    inputs: tuple[int | str, ...]  # each input: the graph's argument at that index, or an earlier part's value
    outputs: tuple[str, ...]  # the values this part returns, in order: those that later parts (or the output) read
    release: tuple[str, ...]  # values no later part reads: dropped once this part has run


@dataclasses.dataclass(frozen=True)
class SplitGraph:
    parts: tuple[Part, ...]
    output: str  # the value the whole graph returns

    def run(self, fns, args: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """The graph's result: `fns[k]` (part k, or what it compiled to) called in order."""
        values: dict[str, torch.Tensor] = {}
        for part, fn in zip(self.parts, fns, strict=True):
            outs = fn(*[args[i] if isinstance(i, int) else values[i] for i in part.inputs])
            values.update(zip(part.outputs, outs, strict=True))
            for name in part.release:  # free what only earlier parts needed (skip connections, once read)
                del values[name]
        return values[self.output]

    def __len__(self) -> int:
        return len(self.parts)


def _covers(spans: list[tuple[int, int]], length: int) -> list[int]:
    """For every cut position p in 0..length (a cut before order[p]), how many spans (first, last) have
    first < p <= last: a difference array and its prefix sums."""
    diff = [0] * (length + 2)
    for first, last in spans:
        if last > first:
            diff[first + 1] += 1
            diff[last + 1] -= 1
    counts, running = [], 0
    for value in diff[: length + 1]:
        running += value
        counts.append(running)
    return counts


def _forbidden_spans(order: list[fx.Node], index: dict[fx.Node, int]) -> list[tuple[int, int]]:
    """Spans no cut may fall in: a value that is not one tensor, from its making to its last reader; a tensor
    made in the graph, from its alias group's first member to a later write into it."""
    spans: list[tuple[int, int]] = []
    root: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        while root.get(node, node) is not node:
            node = root[node]
        return node

    writes: list[tuple[fx.Node, fx.Node]] = []
    for node in order:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            written, viewed = alias_args(node)
            for arg in written + viewed:
                root[find(node)] = find(arg)
            writes += [(node, arg) for arg in written]
        # A value that is not one tensor (a tuple, then read by getitem; a size) never crosses a cut.
        if node.op == "call_function" and not isinstance(node.meta.get("val"), torch.Tensor):
            spans.append((index[node], max((index.get(u, len(order)) for u in node.users), default=index[node])))
    first_made: dict[fx.Node, int] = {}
    for node in order:  # the first member of each alias group that the graph made (inputs are passed as is)
        if node.op == "call_function":
            first_made.setdefault(find(node), index[node])
    for writer, arg in writes:
        start = first_made.get(find(arg))
        if start is not None:
            spans.append((start, index[writer]))
    return spans


def _crossing_spans(order: list[fx.Node], index: dict[fx.Node, int]) -> list[tuple[int, int]]:
    """Each value the graph makes, from its making to its last reader: a cut in the span crosses it."""
    return [(index[n], max(index.get(u, len(order)) for u in n.users))
            for n in order if n.op == "call_function" and n.users]


def choose_cuts(gm: fx.GraphModule, parts: int) -> list[int]:
    """Positions in the graph's node order (cut before that node) for up to `parts` parts; sorted, distinct."""
    order = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(order)}
    forbidden = _covers(_forbidden_spans(order, index), len(order))
    allowed = [count == 0 and 0 < p < len(order) for p, count in enumerate(forbidden)]
    crossing = _covers(_crossing_spans(order, index), len(order))
    ops = [0]
    for node in order:
        ops.append(ops[-1] + (node.op == "call_function" and node.target is not operator.getitem))
    total, cuts = ops[-1], []
    for j in range(1, parts):
        ideal, window = total * j / parts, WINDOW * total / parts
        candidates = [p for p in range(len(order) + 1) if allowed[p] and abs(ops[p] - ideal) <= window
                      and (not cuts or p > cuts[-1])]
        if candidates:
            cuts.append(min(candidates, key=lambda p: (crossing[p], abs(ops[p] - ideal))))
    return cuts


def split_graph(gm: fx.GraphModule, parts: int) -> SplitGraph:
    """`gm` cut into up to `parts` consecutive parts (fewer where no allowed cut is near a balanced point)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    (output,) = gm.graph.find_nodes(op="output")
    result = output.args[0]
    if not isinstance(result, fx.Node) or result.op != "call_function":
        raise ValueError(f"split_graph takes a graph that returns one tensor it computes, found {result!r}")
    order = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(order)}
    placeholders = {n: i for i, n in enumerate(n for n in order if n.op == "placeholder")}
    bounds = [0, *choose_cuts(gm, parts), len(order)]
    part_of = {n: k for k in range(len(bounds) - 1) for n in order[bounds[k]:bounds[k + 1]]}
    last_part = len(bounds) - 2
    # The last part that reads each value made by a node (the output counts as the last part).
    reader = {n: max((part_of.get(u, last_part) for u in n.users), default=part_of[n]) for n in order}
    built = []
    for k in range(last_part + 1):
        body = [n for n in order[bounds[k]:bounds[k + 1]] if n.op == "call_function"]
        outside = {a for n in body for a in n.all_input_nodes if part_of[a] != k or a.op != "call_function"}
        graph, env = fx.Graph(), {}
        inputs: list[int | str] = []
        for node in sorted(outside, key=index.__getitem__):
            if node.op == "placeholder":
                inputs.append(placeholders[node])
            elif node.op == "call_function":
                inputs.append(node.name)
            else:
                continue
            env[node] = graph.placeholder(node.name)
            env[node].meta.update(node.meta)
        for node in sorted(outside, key=index.__getitem__):
            if node.op == "get_attr":  # parameters and constants: read in every part that uses them
                env[node] = graph.get_attr(node.target)
                env[node].meta.update(node.meta)
        for node in body:
            env[node] = graph.node_copy(node, env.__getitem__)
        exported = [n for n in body if reader[n] > k or n is result]  # in graph order, as `body` is
        graph.output(tuple(env[n] for n in exported))
        part = fx.GraphModule(gm, graph)
        part.graph.lint()
        release = tuple(n.name for n in order if n.op == "call_function" and part_of[n] < k and reader[n] == k
                        and n is not result)
        built.append(Part(part, tuple(inputs), tuple(n.name for n in exported), release))
    return SplitGraph(tuple(built), result.name)
