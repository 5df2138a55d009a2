"""Which set of feature caches (call slot) a UNet call reads and writes, for pipelines that call the UNet
more than once per step.

MultiDiffusion's panorama pipeline calls the UNet once per view (window of the latents) at every step, by
default; some loops call it for the unconditional and the conditional half apart. Each such call is its own
denoising problem, so each keeps its own caches and keyframe output (`graph_cache.StepBuffers`).

Invariants:
- The k-th call of a step with a given input signature uses slot k of that signature's graph pair. A
  pipeline that calls the UNet once per step uses slot 0 only, exactly as with no slots at all.
- Calls are told apart by their order in the step, never by their inputs' addresses: the panorama pipeline
  makes fresh embeddings for every call, so addresses would tell nothing, and the caching allocator would
  make any rule built on them decide differently from run to run.
- Order pairs a call with its own caches only while every step makes the same calls. So the number of calls
  per step with a signature is fixed by the first step that makes them, and a step that makes more or fewer
  (cond and uncond apart with the uncond call dropped after an interval) is reported (`assign`, `new_step`),
  and the runtime runs the eager UNet from there. The call past the count is refused before it runs, but
  the calls before it in its step, and those of a step that made fewer (known only when the next step or
  generation begins), were already served by their order; the warning says so.
"""

from __future__ import annotations

CHANGED_CALLS = (
    "the number of UNet calls per step with one input signature changed during this generation ({before} "
    "calls, then {after}); each call keeps its own caches, matched to it by its place in the step, which only "
    "holds while every step makes the same calls, so the calls of that step were matched by their order: keep "
    "the number of calls per step fixed, or batch them into one"
)

TOO_MANY_CALLS = (
    "the UNet was called more than max_calls_per_step={limit} times with {calls} in one step; each call keeps "
    "its own caches ({mib:.0f} MiB): raise FRDiffConfig(max_calls_per_step=...), or batch the calls (for the "
    "panorama pipeline, a larger view_batch_size)"
)


class CallSlots:
    """Counts each step's calls per input signature and hands out their slots."""

    def __init__(self) -> None:
        self._calls: dict[tuple, int] = {}  # this step's calls so far, per signature
        self._per_step: dict[tuple, int] = {}  # the calls per step each signature made in this generation

    def new_generation(self) -> str | None:
        """Close the generation that ended; the reason to warn if its last step made fewer calls."""
        changed = self.new_step()
        self._per_step.clear()
        return changed

    def new_step(self) -> str | None:
        """Close the step that ended; the reason to stop serving calls if it made fewer than the others."""
        calls, self._calls = self._calls, {}
        for signature, count in calls.items():
            before = self._per_step.setdefault(signature, count)
            if count != before:
                return CHANGED_CALLS.format(before=before, after=count)
        return None

    def assign(self, signature: tuple) -> int | str:
        """The slot of this call, counted as made; or the reason not to serve it (more calls than before)."""
        index = self._calls.get(signature, 0)
        before = self._per_step.get(signature)
        if before is not None and index >= before:
            return CHANGED_CALLS.format(before=before, after=index + 1)
        self._calls[signature] = index + 1
        return index
