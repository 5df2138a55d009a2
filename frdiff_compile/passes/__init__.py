"""The graph pipeline: capture -> plan -> build (-> compile, in the runtime).

Invariants every stage keeps:
- Capture exports the stock UNet once per input signature with `torch.export(strict=False)` and normalizes
  the result into a plain-codegen ATen `GraphModule` whose `get_attr` nodes point at the UNet's own
  `Parameter` objects: no weight is copied, and an in-place weight change is seen by every graph.
- Capture leaves the UNet as it found it: whatever the traced call changed outside the graph (a module's
  tensor attribute, an attention processor's state) is put back, and the capture refused (`side_effects`).
- Plan is read-only: it names cache points by module path and graph node, and never edits the graph.
- Build never edits the captured graph either: it copies it twice. The keyframe graph computes exactly what
  the UNet computes (bit-identical in fp32 eager) and additionally writes every cache point and its own
  output into runtime-owned buffers with in-place `copy_`. The reuse graph reads those buffers in place of
  the cache points, so everything only they fed (ResNet norm1/SiLU/conv1, transformer internals) is removed
  by dead-code elimination, and blends its output with the keyframe output through `score_blend`.
- No graph output aliases a cache buffer or a graph input.
- The search graph (Auto-FR) computes every cache point and feeds the network a gate-weighted blend of
  it and a memory input; it returns the output and the blended memories, and is differentiable.
"""

from .build import BuildReport, GraphPair, build_graphs, build_search_graph
from .capture import CallLayout, Captured, capture
from .plan import CachePoint, Plan, plan_cache_points

__all__ = [
    "BuildReport",
    "CachePoint",
    "CallLayout",
    "Captured",
    "GraphPair",
    "Plan",
    "build_graphs",
    "build_search_graph",
    "capture",
    "plan_cache_points",
]
