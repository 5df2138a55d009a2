"""Plan: find the feature-reuse cache points of a captured UNet graph (read-only).

Invariants:
- Cache points are found by module path, from each node's `nn_module_stack`, never by node order or name.
  FRDiff's points ("features"): the conv1 output of every `ResnetBlock2D` and the residual delta of every
  `Transformer2DModel` in the down, mid and up blocks. DeepCache's ("deep", its branch 0): one point, the
  hidden state the last up block's last layer concatenates with its skip, so a reuse step computes only
  conv_in, the time embedding, that last layer and conv_out.
- A transformer's delta is the operand its final residual add takes from inside the module, so
  `input + delta` at a reuse step is the same operation the keyframe performed (bit-identical when fed the
  keyframe's own input).
- A module whose graph does not have the expected shape is skipped with a one-line reason in
  `Plan.skipped` (it then simply runs in full at every step, which `Plan.shortfall` puts in words for the
  runtime's warning); planning never edits the graph.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from torch import fx

from ..config import CACHE_POINTS

logger = logging.getLogger(__name__)

aten = torch.ops.aten

RESNET_CONV1 = "resnet_conv1"
TRANSFORMER_DELTA = "transformer_delta"
DEEP_FEATURE = "deep_feature"

ATTENTION_TARGETS = (aten.scaled_dot_product_attention.default, aten.bmm.default, aten.baddbmm.default)
CONV_TARGETS = (aten.conv2d.default, aten.convolution.default)


@dataclasses.dataclass(frozen=True)
class CachePoint:
    module: str  # UNet module path, e.g. "down_blocks.0.resnets.1"
    kind: str  # RESNET_CONV1, TRANSFORMER_DELTA or DEEP_FEATURE
    node: str  # name of the graph node whose value is cached
    shape: tuple[int, ...]
    dtype: torch.dtype
    # The value's strides as traced: a channels_last UNet caches channels_last tensors, and the reuse graph
    # (and the blend, which takes one layout for both operands) must read them in that layout.
    stride: tuple[int, ...]
    # A later op writes into the value in place (FreeU scales half the channels of the hidden state the deep
    # point caches): the reuse graph then reads a copy of the cache, which those writes may change.
    written: bool = False

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def empty(self, device: torch.device | str) -> torch.Tensor:
        """An uninitialized buffer for this point: its shape, dtype and traced layout, on `device`."""
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device)


def count_nodes(graph: fx.Graph) -> dict[str, int]:
    ops = [n for n in graph.nodes if n.op == "call_function"]
    return {
        "ops": len(ops),
        "conv": sum(n.target in CONV_TARGETS for n in ops),
        "attention": sum(n.target in ATTENTION_TARGETS for n in ops),
    }


@dataclasses.dataclass(frozen=True)
class Plan:
    points: tuple[CachePoint, ...]
    skipped: tuple[tuple[str, str], ...]  # (module path, reason)
    node_counts: dict[str, int]
    cache_point: str = "features"

    @property
    def cache_bytes(self) -> int:
        return sum(p.nbytes for p in self.points)

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.points)

    def shortfall(self) -> str | None:
        """Why reuse steps save less on this graph than the method does, or None if they do not."""
        if self.cache_point == "deep" and self.skipped:
            module, reason = self.skipped[0]
            return (
                f"cache_point='deep' found no deep feature to cache ({module}: {reason}), so a reuse step runs the "
                "whole network and only the no-call steps of score mixing save time; use cache_point='features' "
                "for this UNet"
            )
        if self.skipped:
            shown = "; ".join(f"{module}: {reason}" for module, reason in self.skipped[:3])
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            return (
                f"{len(self.skipped)} of the modules FRDiff caches are not in a form the planner knows ({shown}"
                f"{more}), so they run in full at every step: reuse steps save less, and their results differ from "
                "the method's there; please report the UNet's config and adapters"
            )
        if not self.points:
            return (
                "this UNet has none of the modules FRDiff caches (ResnetBlock2D, Transformer2DModel), so a reuse step "
                "runs the whole network and only the no-call steps of score mixing save time"
            )
        return None

    def __str__(self) -> str:
        lines = [
            f"Plan: {len(self.points)} cache points ({self.count(RESNET_CONV1)} resnet conv1, "
            f"{self.count(TRANSFORMER_DELTA)} transformer delta, {self.count(DEEP_FEATURE)} deep feature), "
            f"cache {self.cache_bytes / 2**20:.2f} MiB, "
            f"graph {self.node_counts['ops']} ops / {self.node_counts['conv']} conv / "
            f"{self.node_counts['attention']} attention"
        ]
        for p in self.points:
            lines.append(f"  {p.kind:<18} {p.module:<40} {tuple(p.shape)} {str(p.dtype).replace('torch.', '')}")
        for module, reason in self.skipped:
            lines.append(f"  skipped {module}: {reason}")
        return "\n".join(lines)


# An item of a sliced ModuleList as non-strict export names it: "<list>.slice(start, stop, step).<k>".
_SLICE_ITEM = re.compile(r"\.slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)\.(\d+)(?=\.|$)")


def canonical_path(path: str) -> str:
    """`path` with every item of a sliced ModuleList named by its place in the list itself.

    Where the module tree holds one module under two names, non-strict export records the path a module was
    reached by, so a block that loops over `self.resnets[1:]` (diffusers' cross-attention mid blocks) has its
    second resnet traced as "resnets.slice(1, None, None).0", where `named_modules` says "resnets.1". diffusers
    0.30 to 0.32 share one SiLU instance across the UNet, so there every SD UNet's mid block was traced so.
    A slice whose mapping needs the list's length (negative start or step) is left as it is: its module is
    then not found, and is named in the planner's warning.
    """
    if ".slice(" not in path:  # nearly every path: the planner asks for each module's nodes, so this is hot
        return path

    def item(match: re.Match) -> str:
        start, _, step, k = match.groups()
        start_i = 0 if start == "None" else int(start)
        step_i = 1 if step == "None" else int(step)
        if start_i < 0 or step_i <= 0:
            return match.group(0)
        return f".{start_i + step_i * int(k)}"

    previous = None
    while previous != path:  # a slice of a slice: the one next to the item resolves first, one per pass
        previous, path = path, _SLICE_ITEM.sub(item, path)
    return path


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [canonical_path(path) for path, _ in stack.values()]


def _members(graph: fx.Graph, path: str, innermost: bool) -> set[fx.Node]:
    """Nodes traced inside module `path` (only those whose innermost module it is, if `innermost`)."""
    found = set()
    for node in graph.nodes:
        paths = _module_paths(node)
        if not paths:
            continue
        if innermost:
            if paths[-1] == path:
                found.add(node)
        elif any(p == path or p.startswith(path + ".") for p in paths):
            found.add(node)
    return found


def alias_args(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(inputs `node` writes into, inputs it returns a view of), by its op schema's alias annotations."""
    schema = node.target._schema
    returned = set().union(*(r.alias_info.before_set for r in schema.returns if r.alias_info is not None))
    writes: list[fx.Node] = []
    views: list[fx.Node] = []
    for i, argument in enumerate(schema.arguments):
        info = argument.alias_info
        if info is None or not (info.is_write or info.before_set & returned):
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
        found = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, fx.Node)]
        (writes if info.is_write else views).extend(found)
    return writes, views


def _written_in_place(node: fx.Node) -> bool:
    """Whether a later op writes into `node`'s tensor, directly or through a view of it."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user in seen or user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
                continue
            writes, views = alias_args(user)
            if current in writes:
                return True
            if current in views:
                seen.add(user)
                todo.append(user)
    return False


def _exits(members: set[fx.Node]) -> list[fx.Node]:
    return [n for n in members if any(user not in members for user in n.users)]


def _resnet_point(graph: fx.Graph, path: str) -> fx.Node | str:
    """The conv1 output node of a ResnetBlock2D at graph path `path`, or a reason it has none.

    The output of the `conv1` module as a whole, with whatever it holds: a PEFT LoRA wraps the convolution
    (`conv1.base_layer`) and adds its own path and a dtype cast after it, and FRDiff caches that sum, as the
    eager method (a hook on `conv1`) does.
    """
    members = _members(graph, path + ".conv1", innermost=False)
    exits = _exits(members)
    if len(exits) != 1:
        return f"conv1 has {len(exits)} outputs in the graph, expected 1"
    if not any(n.target in CONV_TARGETS for n in members):
        return f"conv1 has no convolution in the graph (its output is {exits[0].target})"
    return exits[0]


def _transformer_point(graph: fx.Graph, path: str) -> fx.Node | str:
    """The delta operand of a Transformer2DModel's final residual add, or a reason it has none."""
    members = _members(graph, path, innermost=False)
    exits = _exits(members)
    if len(exits) != 1:
        return f"module has {len(exits)} outputs in the graph, expected 1"
    out = exits[0]
    if out.target is not aten.add.Tensor or len(out.args) != 2:
        return f"module output is {out.target}, expected the residual add"
    inside = [a for a in out.args if isinstance(a, fx.Node) and a in members]
    outside = [a for a in out.args if isinstance(a, fx.Node) and a not in members]
    if len(inside) != 1 or len(outside) != 1:
        return "residual add does not take exactly one operand from outside the module"
    return inside[0]


def _deep_point(graph: fx.Graph, unet: torch.nn.Module, prefix: str) -> tuple[str, fx.Node | str]:
    """(module path, node or reason): the hidden state the last up block's last resnet takes, concatenated
    with the first skip (conv_in's output), as DeepCache's branch 0 reads it from its cache.

    The first operand of that concatenation, not the resnet's input: the skip is recomputed from the current
    input at every step, as DeepCache does.
    """
    blocks = getattr(unet, "up_blocks", None)
    if not blocks:
        return "up_blocks", "the UNet has no up blocks"
    resnets = getattr(blocks[-1], "resnets", None)
    if not resnets:
        return f"up_blocks.{len(blocks) - 1}", "the last up block has no resnets"
    path = f"up_blocks.{len(blocks) - 1}.resnets.{len(resnets) - 1}"
    members = _members(graph, prefix + path, innermost=False)
    if not members:
        return path, "the last resnet is not in the graph"
    cats = {arg for n in members for arg in n.all_input_nodes if arg not in members and arg.target is aten.cat.default}
    if len(cats) != 1:
        return path, f"its input is not one concatenation with a skip (found {len(cats)} concatenations)"
    operands = next(iter(cats)).args[0]
    if len(operands) != 2 or not all(isinstance(a, fx.Node) for a in operands):
        return path, f"its input concatenates {len(operands)} tensors, expected the hidden state and a skip"
    return path, operands[0]


def _feature_points(graph: fx.Graph, unet: torch.nn.Module, prefix: str) -> list[tuple[str, str, fx.Node | str]]:
    """(module path, kind, node or reason) for every module whose feature FRDiff caches."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    found: list[tuple[str, str, fx.Node | str]] = []
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            found.append((name, RESNET_CONV1, _resnet_point(graph, prefix + name)))
        elif isinstance(module, Transformer2DModel):
            found.append((name, TRANSFORMER_DELTA, _transformer_point(graph, prefix + name)))
    return found


def plan_cache_points(gm: fx.GraphModule, unet: torch.nn.Module, module_prefix: str = "unet.",
                      cache_point: str = "features") -> Plan:
    """Find the cache points of `unet` in its captured graph `gm` (whose module paths start with prefix):
    FRDiff's (`cache_point="features"`) or DeepCache's deep feature (`"deep"`)."""
    if cache_point not in CACHE_POINTS:
        raise ValueError(f"cache_point must be one of {CACHE_POINTS}, got {cache_point!r}")
    if cache_point == "deep":
        path, node = _deep_point(gm.graph, unet, module_prefix)
        candidates: list[tuple[str, str, fx.Node | str]] = [(path, DEEP_FEATURE, node)]
    else:
        candidates = _feature_points(gm.graph, unet, module_prefix)
    points: list[CachePoint] = []
    skipped: list[tuple[str, str]] = []
    for name, kind, found in candidates:
        if isinstance(found, str):
            logger.debug("no cache point in %s: %s", name, found)
            skipped.append((name, found))
            continue
        val = found.meta.get("val")
        if not isinstance(val, torch.Tensor):
            skipped.append((name, f"node {found.name} has no tensor metadata"))
            continue
        points.append(CachePoint(name, kind, found.name, tuple(val.shape), val.dtype, tuple(val.stride()),
                                 _written_in_place(found)))
    return Plan(points=tuple(points), skipped=tuple(skipped), node_counts=count_nodes(gm.graph),
                cache_point=cache_point)
