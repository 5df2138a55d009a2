"""The host-side step schedule: which kind of step each index of a generation is, and its blend weight.

Invariants:
- Decided on the host, once per generation, from the generation's real number of steps; nothing here reads
  a device value.
- Step 0 is always a keyframe; a mask (`FRDiffConfig.keyframes`) must have exactly one entry per step.
- lambda(i) = clip(slope * (i/N - bias) + 0.5, 0, 1). A non-keyframe step with lambda == 0 is `SKIP` (no
  network call, the last keyframe output is returned); with lambda > 0 it is `REUSE`. Without score mixing
  every non-keyframe step is `REUSE` with lambda == 1.
- With N=50, M=2, b=0.5 this gives 25 FULL, 14 REUSE and 11 SKIP steps (the method note's invariant 4).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections import Counter

from .config import FRDiffConfig


class StepKind(enum.Enum):
    FULL = "full"  # keyframe: the whole UNet runs and refreshes the cache
    REUSE = "reuse"  # the reuse graph runs on cached features, blended by lambda
    SKIP = "skip"  # lambda == 0: no network call, the last keyframe output is returned


def mix_weight(step: int, num_steps: int, bias: float, slope: float) -> float:
    """lambda(i/N) of score mixing: 0 means 'take the keyframe output', 1 means 'take feature reuse'."""
    r = step / num_steps
    return min(max(slope * (r - bias) + 0.5, 0.0), 1.0)


def keyframe_mask(num_steps: int, config: FRDiffConfig) -> tuple[bool, ...]:
    """The keyframe mask of a generation of `num_steps` steps; raises if a fixed mask does not fit."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if config.keyframes is not None:
        if len(config.keyframes) != num_steps:
            raise ValueError(
                f"FRDiffConfig.keyframes has {len(config.keyframes)} entries but this generation has "
                f"{num_steps} steps; use a mask made for {num_steps} steps (or keyframe_interval instead)"
            )
        return config.keyframes
    return tuple(i % config.keyframe_interval == 0 for i in range(num_steps))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-step kinds and blend weights of one generation."""

    kinds: tuple[StepKind, ...]
    weights: tuple[float, ...]

    @functools.cached_property  # read at every step; a frozen dataclass's __dict__ still takes it
    def last_keyframes(self) -> tuple[int, ...]:
        """Per step, the index of the latest keyframe at or before it (step 0 is always one)."""
        latest, out = 0, []
        for step, kind in enumerate(self.kinds):
            latest = step if kind is StepKind.FULL else latest
            out.append(latest)
        return tuple(out)

    @property
    def num_steps(self) -> int:
        return len(self.kinds)

    def counts(self) -> dict[str, int]:
        counter = Counter(kind.value for kind in self.kinds)
        return {kind.value: counter.get(kind.value, 0) for kind in StepKind}

    def cost(self, reuse_cost: float) -> float:
        """Cost in full-UNet-call equivalents, a reuse call costing `reuse_cost` of a full one."""
        counts = self.counts()
        return counts["full"] + reuse_cost * counts["reuse"]

    def __str__(self) -> str:
        counts = self.counts()
        return f"Schedule(N={self.num_steps}, full={counts['full']}, reuse={counts['reuse']}, skip={counts['skip']})"


def build_schedule(num_steps: int, config: FRDiffConfig) -> Schedule:
    mask = keyframe_mask(num_steps, config)
    kinds: list[StepKind] = []
    weights: list[float] = []
    for step, is_keyframe in enumerate(mask):
        if is_keyframe:
            kinds.append(StepKind.FULL)
            weights.append(1.0)
            continue
        weight = mix_weight(step, num_steps, config.mix_bias, config.mix_slope) if config.mixes_scores else 1.0
        kinds.append(StepKind.REUSE if weight > 0.0 else StepKind.SKIP)
        weights.append(weight)
    return Schedule(kinds=tuple(kinds), weights=tuple(weights))
