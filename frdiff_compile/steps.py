"""Which step of which generation a UNet call is, without reading any device value.

Invariants:
- The step index never comes from a timestep's value (that would be a host sync per step on CUDA). It
  comes from the call's position in the generation: either a counter started by
  `FRDiffUNet.reset(num_inference_steps=N)`, or the layout of the timestep tensor itself.
- Layout: diffusers pipelines (and hand-written `for t in scheduler.timesteps` loops) pass each timestep as
  a 0-d view into the scheduler's timesteps tensor (or a view of that one entry: `t.expand(batch)`,
  `t[None]`, `timesteps[i:i + 1]`), so the view's storage offset is the step index and the
  storage's length is the generation's real number of steps (for img2img, which slices the schedule, the
  full schedule's length and the step's place in it). This is tensor metadata, read on the host.
- A new generation starts when the timesteps storage changes or the index does not move forward (a new
  pipeline call always makes a new timesteps tensor and starts at its first step). Storages are told apart
  by address, so the tracker holds the recent schedules' storages: a freed schedule's address handed to a
  new one (a cancelled generation, then an img2img start at a later index) would otherwise read as the
  same generation going on, and its reuse steps would read the cancelled generation's caches. The same
  index twice in a row is reported as `repeated` (a pipeline calling the UNet more than once per step),
  never as a new generation: the runtime gives each call of a step caches of its own (`call_slots`).
- A schedule that comes back, past where it left off, after another one's steps is a generation `resumed`
  (requests stepped in turn through one runtime): still a new generation, whose caches start empty. The
  last `RECENT` schedules are remembered, with their storages, for this and for the address rule above.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

RECENT = 8  # schedules remembered for `resumed`: more than the requests a server steps in turn


@dataclasses.dataclass(frozen=True)
class StepPosition:
    index: int
    num_steps: int
    new_generation: bool
    repeated: bool = False
    resumed: bool = False  # a new generation that goes on with a schedule another one's steps interrupted


def schedule_view(timestep: object) -> tuple[tuple, int, int] | None:
    """(storage key, number of steps, index) if `timestep` is a view of one schedule entry, else None."""
    if not isinstance(timestep, torch.Tensor):
        return None
    # A view of one entry: `t`, `t[None]`, `timesteps[i:i + 1]`, or a per-sample `t.expand(batch)` (stride
    # 0). One made by repeat() or a fresh tensor holds values of its own, not a place in the schedule.
    if any(size != 1 and stride != 0 for size, stride in zip(timestep.shape, timestep.stride())):
        return None
    storage = timestep.untyped_storage()
    num_steps = storage.nbytes() // timestep.element_size()
    index = timestep.storage_offset()
    if num_steps < 2 or not 0 <= index < num_steps:
        return None
    key = (storage.data_ptr(), num_steps, timestep.dtype, timestep.device)
    return key, num_steps, index


class StepTracker:
    """Turns a stream of UNet calls into (generation, step index) positions."""

    def __init__(self) -> None:
        self._explicit: list[int] | None = None  # [num_steps, next_index] after reset(num_inference_steps)
        self._key: tuple | None = None  # the current schedule's
        # key -> [storage, last index reached], the current schedule last. A storage held here keeps its
        # address from being handed to a new schedule, which would then pass for this one.
        self._recent: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self._current: list | None = None  # the current schedule's entry in `_recent`

    def reset(self, num_steps: int | None = None) -> None:
        """Forget the current generation; with `num_steps`, count the next `num_steps` calls as one."""
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_steps!r}")
        self._explicit = None if num_steps is None else [num_steps, 0]
        self._key = None
        self._recent.clear()
        self._current = None

    def locate(self, timestep: object) -> StepPosition | None:
        """The position of this call, or None when it cannot be told (no reset() and no schedule view)."""
        if self._explicit is not None:
            num_steps, index = self._explicit
            self._explicit[1] += 1
            if self._explicit[1] >= num_steps:
                self._explicit = None  # the counted generation is over; later calls go back to auto
            return StepPosition(index, num_steps, new_generation=index == 0)
        view = schedule_view(timestep)
        if view is None:
            return None
        key, num_steps, index = view
        same_schedule = key == self._key
        if same_schedule and index == self._current[1]:
            return StepPosition(index, num_steps, new_generation=False, repeated=True)
        new_generation = not same_schedule or index < self._current[1]
        resumed = False
        if not same_schedule:
            seen = self._recent.get(key)
            resumed = seen is not None and index > seen[1]
            if seen is None:
                self._recent[key] = seen = [timestep.untyped_storage(), index]
                if len(self._recent) > RECENT:
                    self._recent.popitem(last=False)  # the oldest; never the new one, moved to the end
            self._recent.move_to_end(key)
            self._key, self._current = key, seen
        self._current[1] = index
        return StepPosition(index, num_steps, new_generation=new_generation, resumed=resumed)
