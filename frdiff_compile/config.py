"""Typed, frozen configuration for `frdiff_compile.optimize`.

Invariants:
- A `FRDiffConfig` is immutable and validated on construction: every invalid field raises `ValueError`
  naming the field, the value and the allowed range (never an `assert`).
- It round-trips through JSON (`to_json` / `from_json`) with a `version` field, so a configuration can be
  stored next to a benchmark result or a tuned keyframe policy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

CONFIG_VERSION = 1
# The fields the built graphs depend on. The others only shape the host-side schedule, so a change of
# schedule keeps every compiled graph and CUDA graph (`FRDiffUNet.reconfigure`).
GRAPH_FIELDS = ("cache_point", "compile", "compile_mode", "conv_layout", "cuda_graphs")
CACHE_POINTS = ("features", "deep")  # what a keyframe caches (passes/plan.py finds them in the graph)
CONV_LAYOUTS = ("traced", "inductor")  # who picks the compiled convolutions' memory layout
MAX_KEYFRAME_PARTS = 8  # `keyframe_parts`: more parts than this would only add cuts and worker processes


@dataclasses.dataclass(frozen=True)
class FRDiffConfig:
    """How `optimize` accelerates a UNet.

    Attributes:
        keyframe_interval: M. Steps 0, M, 2M, ... of a generation run the full UNet and refresh the feature
            cache; the others reuse it. M=1 reproduces the UNet exactly; M=2 (default) is the paper's
            quality-preserving setting; M=3 is faster at a measurable quality cost.
        keyframes: an explicit per-step mask (True = keyframe), e.g. an Auto-FR policy. It overrides
            `keyframe_interval`, must start with True, and only applies to generations of exactly
            `len(keyframes)` steps (others raise at call time rather than silently using a wrong schedule).
        score_mixing: blend the reuse output with the last keyframe output by the weight
            lambda(i/N) = clip(mix_slope * (i/N - mix_bias) + 0.5, 0, 1); where lambda is 0 the UNet is not
            called at all. Off = pure feature reuse on every non-keyframe step (slower, sometimes sharper).
            None (default) means on with `cache_point="features"` and off with "deep", where the reuse call
            is so cheap that the no-call steps save little and the blend costs quality (README, DeepCache).
        mix_bias: b. Larger b keeps more early steps as "jumps" on the keyframe output (faster, blurrier);
            smaller b uses feature reuse earlier.
        mix_slope: how fast lambda goes from 0 to 1 around b (the paper's tau=30 is slope 7.5).
        cache_point: what a keyframe caches and a reuse step reads. "features" (default) is FRDiff's: every
            ResnetBlock2D's conv1 output and every Transformer2DModel's residual delta, so a reuse step
            recomputes everything else (about 0.27 of a full call's FLOPs for SD 1.5). "deep" is DeepCache's
            (its branch 0): one tensor, the hidden state the last up block's last layer concatenates with
            conv_in's output, so a reuse step computes only conv_in, the time embedding, that layer and
            conv_out (about 0.08 for SD 1.5, 0.015 for SDXL); the keyframe schedule is the same.
        compile: compile both graphs with inductor (torch.compile's compiler; the graphs go to it directly,
            since they are ATen graphs already). None (default) means on for CUDA models, off elsewhere;
            eager graphs are still the fast path on CPU because they skip the cached work.
        compile_mode: one of torch.compile's modes, whose inductor options the compilation takes. With CUDA
            graphs on, modes that make inductor capture its own CUDA graphs ("reduce-overhead",
            "max-autotune") are refused: they cannot nest inside the runtime's capture;
            "max-autotune-no-cudagraphs" is the autotuning one.
        conv_layout: the memory layout compiled convolutions run in. "traced" (default): the layout the UNet's
            tensors have (NCHW as diffusers loads a UNet, channels_last after
            `unet.to(memory_format=torch.channels_last)`), with every weight read where it lives. "inductor":
            inductor's layout optimization picks (channels_last for SD-class graphs in fp16 on CUDA), and
            copies every convolution weight not already in that layout at every call (1032 MiB read and as
            much written per SD 1.5 keyframe call in fp16), since the graphs take the parameters as arguments.
            "traced" was 6-12% faster on CPU; which is faster on a GPU is unmeasured (README, "Convolution
            layouts"), and converting the UNet to channels_last gets those convolutions without the copies.
        cuda_graphs: capture each graph as a CUDA graph over static input buffers and replay it every step.
            None (default) means on wherever the inputs are on a CUDA device; a capture failure falls back
            to the graphs without CUDA graphs, with one warning.
        background_compile: when both graphs are compiled, compile the reuse graph in a worker process
            while this one compiles the keyframe graph, so that the first generation at a new shape waits
            for the longer of the two compilations, not their sum (`background_compile.py`). The worker
            needs inductor's on-disk caches (on by default), a free CPU core, and as much device memory as
            the UNet's parameters (uninitialised) for the minute it runs. Off by default until measured on
            a GPU; a worker that fails costs a compile here, never a wrong result. A UNet with tensor-subclass
            weights (torchao's quantized ones) gets no worker: it rebuilds plain tensors in their place.
        keyframe_parts: with background_compile, compile the keyframe graph as this many consecutive parts
            (`passes/split.py`), all but the first in worker processes, so the first generation waits for
            about the largest part's compile, not the whole graph's: inductor's work on a graph runs on one
            core. 1 (default) compiles it whole. Each part is its own compiled graph, so no kernel fuses
            across a cut; a cut crosses few values (about ten for SD 1.5's). Each worker needs
            a free CPU core and the device memory of its part's parameters for the time it runs.
        max_cached_shapes: how many graph pairs, with their cache buffers, are kept: one per input
            signature (batch, resolution, text length, dtype, ...) and module setting (FreeU, LoRA
            adapters, attention processors); the least recently used is dropped past this.
        max_calls_per_step: how many calls with one input signature a step may make, each with its own
            feature caches (a call slot): MultiDiffusion's panorama pipeline calls the UNet once per view by
            default, and some loops call it for cond and uncond apart. Each slot holds a set of caches and a
            keyframe output (90 MiB for SD 1.5 at 512x512 with CFG in fp16); the call past this count
            runs the eager UNet for the rest of its generation, with a warning.
        policy_fingerprint: set by `from_policy`: the config fingerprint of the UNet the keyframe mask was
            tuned on; `optimize` refuses a UNet with another one.
        version: the configuration format version.
    """

    keyframe_interval: int = 2
    keyframes: tuple[bool, ...] | None = None
    score_mixing: bool | None = None
    mix_bias: float = 0.5
    mix_slope: float = 7.5
    cache_point: str = "features"
    compile: bool | None = None
    compile_mode: str | None = None
    conv_layout: str = "traced"
    cuda_graphs: bool | None = None
    background_compile: bool = False
    keyframe_parts: int = 1
    max_cached_shapes: int = 4
    max_calls_per_step: int = 32
    policy_fingerprint: str | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        # Guard clauses, one per field, so the message names exactly what is wrong.
        if isinstance(self.keyframe_interval, bool) or not isinstance(self.keyframe_interval, int):
            raise ValueError(f"keyframe_interval must be an int >= 1, got {self.keyframe_interval!r}")
        if self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")
        if self.keyframes is not None:
            mask = tuple(self.keyframes)
            if not mask or not all(isinstance(k, bool) for k in mask):
                raise ValueError(
                    f"keyframes must be a non-empty sequence of bools (True = keyframe), got {self.keyframes!r}"
                )
            if not mask[0]:
                raise ValueError("keyframes[0] must be True: step 0 always computes the full UNet")
            object.__setattr__(self, "keyframes", mask)
        for name, low, high in (("mix_bias", -1.0, 2.0), ("mix_slope", 1e-3, 1e3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float in [{low}, {high}], got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
            object.__setattr__(self, name, float(value))
        if self.score_mixing is not None and not isinstance(self.score_mixing, bool):
            raise ValueError(f"score_mixing must be None, True or False, got {self.score_mixing!r}")
        if self.cache_point not in CACHE_POINTS:
            raise ValueError(f"cache_point must be one of {CACHE_POINTS}, got {self.cache_point!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"compile must be None, True or False, got {self.compile!r}")
        if self.conv_layout not in CONV_LAYOUTS:
            raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS}, got {self.conv_layout!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None, True or False, got {self.cuda_graphs!r}")
        if not isinstance(self.background_compile, bool):
            raise ValueError(f"background_compile must be True or False, got {self.background_compile!r}")
        if isinstance(self.keyframe_parts, bool) or not isinstance(self.keyframe_parts, int):
            raise ValueError(f"keyframe_parts must be an int in [1, {MAX_KEYFRAME_PARTS}], got {self.keyframe_parts!r}")
        if not 1 <= self.keyframe_parts <= MAX_KEYFRAME_PARTS:
            raise ValueError(f"keyframe_parts must be in [1, {MAX_KEYFRAME_PARTS}], got {self.keyframe_parts}")
        if self.keyframe_parts > 1 and not self.background_compile:
            raise ValueError(
                f"keyframe_parts={self.keyframe_parts} needs background_compile=True: the parts after the first are "
                "compiled by worker processes; compiled one after the other here they would only lose the fusion "
                "across the cuts. Set background_compile=True, or keyframe_parts=1"
            )
        # Only a named mode imports inductor to look it up: building a default config stays cheap.
        options = inductor_mode_options(self.compile_mode) if self.compile_mode is not None else {}
        if self.cuda_graphs is not False and options.get("triton.cudagraphs"):
            raise ValueError(
                f"compile_mode={self.compile_mode!r} makes inductor capture its own CUDA graphs, which cannot nest "
                "inside frdiff_compile's; use compile_mode='max-autotune-no-cudagraphs' (or None), or set "
                "cuda_graphs=False to leave CUDA graphs to inductor"
            )
        if isinstance(self.max_cached_shapes, bool) or not isinstance(self.max_cached_shapes, int):
            raise ValueError(f"max_cached_shapes must be an int in [1, 64], got {self.max_cached_shapes!r}")
        if not 1 <= self.max_cached_shapes <= 64:
            raise ValueError(f"max_cached_shapes must be in [1, 64], got {self.max_cached_shapes}")
        if isinstance(self.max_calls_per_step, bool) or not isinstance(self.max_calls_per_step, int):
            raise ValueError(f"max_calls_per_step must be an int in [1, 1024], got {self.max_calls_per_step!r}")
        if not 1 <= self.max_calls_per_step <= 1024:
            raise ValueError(f"max_calls_per_step must be in [1, 1024], got {self.max_calls_per_step}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"version must be {CONFIG_VERSION} (this release's format), got {self.version!r}")

    @property
    def mixes_scores(self) -> bool:
        """Whether score mixing is on, its default resolved from the cache point."""
        return self.score_mixing if self.score_mixing is not None else self.cache_point == "features"

    def resolve(self, device_type: str) -> tuple[bool, bool]:
        """(compile, cuda_graphs) for graphs whose inputs live on a `device_type` device, defaults resolved.

        Resolved per input signature from where the inputs are, not at `optimize` time: `pipe.to("cuda")`
        after `optimize` is the common order.
        """
        on_cuda = device_type == "cuda"
        if self.cuda_graphs and not on_cuda:
            raise ValueError(f"frdiff_compile: cuda_graphs=True but the UNet's inputs are on {device_type}; "
                             "move the pipeline to a CUDA device or leave cuda_graphs at None")
        compile_graphs = self.compile if self.compile is not None else on_cuda
        cuda_graphs = self.cuda_graphs if self.cuda_graphs is not None else on_cuda
        return compile_graphs, cuda_graphs

    def same_graphs(self, other: FRDiffConfig) -> bool:
        """Whether graphs built under `self` serve `other` unchanged (only schedule fields differ)."""
        return all(getattr(self, name) == getattr(other, name) for name in GRAPH_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.keyframes is not None:
            data["keyframes"] = list(self.keyframes)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FRDiffConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FRDiffConfig fields {unknown}; known fields are {sorted(known)}")
        data = dict(data)
        if data.get("keyframes") is not None:
            data["keyframes"] = tuple(data["keyframes"])
        return cls(**data)

    @classmethod
    def from_policy(cls, path: str, **overrides: Any) -> FRDiffConfig:
        """The config of a saved Auto-FR policy: its keyframe mask and the score-mixing settings and cache
        point it was searched with (`overrides` replace any field but the cache point: a mask searched for
        one cache point is not tuned for the other)."""
        from .policy import KeyframePolicy

        policy = KeyframePolicy.load(path)
        searched_point = policy.settings.get("cache_point", "features")  # policies before the field: FRDiff's
        if overrides.get("cache_point", searched_point) != searched_point:
            raise ValueError(
                f"policy file {path} was searched with cache_point={searched_point!r}, not "
                f"{overrides['cache_point']!r}; search a policy for it (frdiff-compile tune --cache-point "
                f"{overrides['cache_point']}) or use keyframe_interval"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        searched = ("score_mixing", "mix_bias", "mix_slope", "cache_point")
        settings = {k: v for k, v in policy.settings.items() if k in searched}
        data = {**settings, "keyframes": policy.keyframes, "policy_fingerprint": policy.unet_fingerprint, **overrides}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown FRDiffConfig fields {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> FRDiffConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"FRDiffConfig JSON is malformed: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"FRDiffConfig JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)


def inductor_mode_options(mode: object) -> dict[str, Any]:
    """Inductor's options for a torch.compile mode (None: the default, no options); ValueError naming the
    modes this torch knows otherwise. Imports inductor, so the compile path may use it afterwards."""
    if mode is not None and not isinstance(mode, str):
        raise ValueError(f"compile_mode must be None or a torch.compile mode string, got {mode!r}")
    import torch._inductor  # here, not at module level: importing inductor takes a second

    if mode is None:
        return {}  # list_mode_options(None) lists every mode's options instead
    try:
        return torch._inductor.list_mode_options(mode)
    except RuntimeError as exc:
        raise ValueError(f"compile_mode={mode!r} is not a torch.compile mode: {exc}") from None
