"""Build: derive the keyframe and reuse graphs of one captured UNet graph.

Invariants:
- The captured graph is copied, never edited, and both copies share the captured module's attributes (the
  UNet's own parameters).
- Keyframe graph: `(*inputs, *caches, keyframe_out) -> out`. It computes exactly the captured graph and
  writes every cache point and `out` into the buffers it is given, with in-place `copy_` (impure, so
  dead-code elimination keeps it). `out` is a fresh tensor, never a buffer.
- Reuse graph: `(*inputs, *caches, keyframe_out, weight) -> score_blend(weight, out_fr, keyframe_out)`,
  through the blend op for the graph's device (`score_blend_op`), so AOTAutograd's cache can store it.
  Each cache point's uses read its buffer instead (a copy of it where the graph writes into the value later,
  so no graph ever writes a cache); dead-code elimination then removes everything only the cache points
  fed, in-place writes into tensors the graph made included when nothing reads them.
  `weight` is a 0-d tensor, so a new blend weight never recompiles a compiled graph.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
from torch import fx

from ..kernels.blend import score_blend_op
from .plan import CachePoint, Plan, alias_args, count_nodes

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class BuildReport:
    keyframe: dict[str, int]  # node counts of the keyframe graph
    reuse: dict[str, int]  # node counts of the reuse graph
    cache_points: int
    removed: dict[str, int]  # reuse-graph nodes removed, by the class of their innermost module

    def __str__(self) -> str:
        removed = ", ".join(f"{k}={v}" for k, v in sorted(self.removed.items(), key=lambda kv: -kv[1])[:8])
        return (
            f"BuildReport: {self.cache_points} cache points; keyframe {self.keyframe['ops']} ops / "
            f"{self.keyframe['conv']} conv / {self.keyframe['attention']} attention; reuse {self.reuse['ops']} ops"
            f" / {self.reuse['conv']} conv / {self.reuse['attention']} attention; removed {removed}"
        )


@dataclasses.dataclass
class GraphPair:
    keyframe: fx.GraphModule
    reuse: fx.GraphModule
    report: BuildReport


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """A new GraphModule over a copy of gm's graph, sharing gm's attributes; nodes indexed by name."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    return copy, {old.name: new for old, new in env.items()}


def _add_placeholders(gm: fx.GraphModule, names: list[str]) -> list[fx.Node]:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    added = []
    for name in names:
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(name)
        added.append(last)
    return added


def _is_impure(node: fx.Node) -> bool:
    # fx keeps ops tagged nondeterministic_seeded (sdpa, dropout) even when unused; in an inference graph
    # with eval-mode dropout they are pure, and keeping them would leave every attention in the reuse graph.
    return node.is_impure(impure_random=False)


# Ops whose output is new memory: a tensor they make can be written only through the graph's own nodes.
_FRESH = {aten.zeros, aten.empty, aten.ones, aten.full, aten.empty_strided, aten.zeros_like, aten.empty_like,
          aten.ones_like, aten.full_like, aten.new_zeros, aten.new_empty, aten.new_ones, aten.new_full, aten.clone}


def _remove_dead_writes(graph: fx.Graph) -> int:
    """Erase writes into tensors the graph made itself and nothing live reads; the number of nodes erased.

    Plain dead-code elimination keeps every in-place op, so a tensor filled slice by slice (diffusers'
    `SlicedAttnProcessor`, under `enable_attention_slicing()`, copies each attention slice into a `zeros`
    buffer) kept every attention of the reuse graph alive after its transformers' deltas were cached. A
    group is a fresh tensor (`_FRESH`) with every view of it and every write into it, found through the ops'
    alias annotations; when no node outside the group reads any of it, the whole group is dead.
    """
    root: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        while root.get(node, node) is not node:
            node = root[node]
        return node

    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            for arg in sum(alias_args(node), []):
                root[find(node)] = find(arg)
    grouped = set(root) | set(root.values())
    groups: dict[fx.Node, list[fx.Node]] = collections.defaultdict(list)
    for node in graph.nodes:  # in graph order, so each group's first member is the tensor the rest alias
        if node in grouped:
            groups[find(node)].append(node)
    erased = 0
    for members in groups.values():
        inside, base = set(members), members[0]
        fresh = base.op == "call_function" and getattr(base.target, "overloadpacket", None) in _FRESH
        known = all(m.op == "call_function" and isinstance(m.target, torch._ops.OpOverload) for m in members)
        if fresh and known and len(members) > 1 and all(u in inside for m in members for u in m.users):
            for member in reversed(members):
                graph.erase_node(member)
            erased += len(members)
    return erased


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    while _remove_dead_writes(gm.graph):  # what fed the erased writes may be dead now
        gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()


def build_keyframe_graph(captured: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    gm, nodes = _copy(captured)
    placeholders = _add_placeholders(gm, [f"cache_{i}" for i in range(len(plan.points))] + ["keyframe_out"])
    for point, buffer in zip(plan.points, placeholders):
        value = nodes[point.node]
        with gm.graph.inserting_after(value):
            gm.graph.call_function(aten.copy_.default, (buffer, value))
    output = gm.graph.find_nodes(op="output")[0]
    with gm.graph.inserting_before(output):
        gm.graph.call_function(aten.copy_.default, (placeholders[-1], output.args[0]))
    _finish(gm)
    return gm


def _read(gm: fx.GraphModule, point: CachePoint, source: fx.Node, after: fx.Node) -> fx.Node:
    """What the graph reads in place of the point's value: `source`, or a copy of it made after node `after`
    where the graph writes into the value later (FreeU's in-place scaling), so those writes land on a copy, as
    they did on the computed tensor, and never on a cache or memory that later steps read."""
    if not point.written:
        return source
    with gm.graph.inserting_after(after):
        return gm.graph.call_function(aten.clone.default, (source,))


def build_reuse_graph(captured: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    gm, nodes = _copy(captured)
    names = [f"cache_{i}" for i in range(len(plan.points))] + ["keyframe_out", "weight"]
    placeholders = _add_placeholders(gm, names)
    for point, buffer in zip(plan.points, placeholders):
        value = nodes[point.node]
        value.replace_all_uses_with(_read(gm, point, buffer, after=value))
    output = gm.graph.find_nodes(op="output")[0]
    with gm.graph.inserting_before(output):
        value = output.args[0].meta["val"]
        blend = score_blend_op(value.device, value.dtype)
        blended = gm.graph.call_function(blend, (placeholders[-1], output.args[0], placeholders[-2]))
    output.args = (blended,)
    _finish(gm)
    return gm


def build_search_graph(captured: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Auto-FR's soft graph: `(*inputs, *memory, gate) -> (out, *new_memory)`.

    Every cache point is computed, then blended with its memory, `new = gate * S + (1 - gate) * memory`,
    and the rest of the network reads `new`: gate 1 is the keyframe graph, gate 0 the reuse graph, and
    in between it is differentiable in the gate and the memory. The blend is the same `score_blend` op as
    the reuse graph's (fused kernel forward, torch-op backward), so autograd sees it.
    """
    gm, nodes = _copy(captured)
    placeholders = _add_placeholders(gm, [f"memory_{i}" for i in range(len(plan.points))] + ["gate"])
    gate = placeholders[-1]
    blended = []
    for point, memory in zip(plan.points, placeholders):
        value = nodes[point.node]
        users = list(value.users)
        blend = score_blend_op(value.meta["val"].device, value.meta["val"].dtype)
        with gm.graph.inserting_after(value):
            total = gm.graph.call_function(blend, (gate, value, memory))
        read = _read(gm, point, total, after=total)
        for user in users:
            user.replace_input_with(value, read)
        blended.append(total)
    output = gm.graph.find_nodes(op="output")[0]
    output.args = ((output.args[0], *blended),)
    _finish(gm)
    return gm


def _innermost_class(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    return list(stack.values())[-1][1].rsplit(".", 1)[-1]


def build_graphs(captured: fx.GraphModule, plan: Plan) -> GraphPair:
    keyframe = build_keyframe_graph(captured, plan)
    reuse = build_reuse_graph(captured, plan)
    kept = {n.name for n in reuse.graph.nodes}
    removed = collections.Counter(
        _innermost_class(n) for n in captured.graph.nodes if n.op == "call_function" and n.name not in kept
    )
    report = BuildReport(
        keyframe=count_nodes(keyframe.graph),
        reuse=count_nodes(reuse.graph),
        cache_points=len(plan.points),
        removed=dict(removed),
    )
    return GraphPair(keyframe=keyframe, reuse=reuse, report=report)
