"""An independent eager FRDiff, written for the tests from the method note with module hooks on the stock
UNet. It shares no code with frdiff_compile: its own schedule, its own cache, its own blend."""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel


def reference_lambda(i: int, n: int, bias: float, slope: float = 7.5) -> float:
    return float(min(1.0, max(0.0, slope * (i / n - bias) + 0.5)))


class EagerFRDiff:
    """Call `step(i, n, *args, **kwargs)` with the step index i of n; returns the model output tensor."""

    def __init__(self, unet, interval: int = 2, score_mixing: bool = True, bias: float = 0.5, mask=None):
        self.unet, self.interval, self.score_mixing, self.bias, self.mask = unet, interval, score_mixing, bias, mask
        self.mode = "full"
        self.cache: dict[str, torch.Tensor] = {}
        self.last_full: torch.Tensor | None = None
        self.handles = []
        for name, module in unet.named_modules():
            if isinstance(module, ResnetBlock2D):
                self.handles.append(module.conv1.register_forward_hook(self._conv1_hook(name)))
            elif isinstance(module, Transformer2DModel):
                self.handles.append(module.register_forward_hook(self._transformer_hook(name), with_kwargs=True))

    def _conv1_hook(self, name):
        def hook(module, args, output):
            if self.mode == "full":
                self.cache[name] = output.detach().clone()
                return None
            return self.cache[name]

        return hook

    def _transformer_hook(self, name):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output.sample
            if self.mode == "full":
                self.cache[name] = (out - hidden).detach().clone()
                return None
            new = hidden + self.cache[name]
            return (new,) if isinstance(output, tuple) else type(output)(sample=new)

        return hook

    def is_keyframe(self, i: int) -> bool:
        return self.mask[i] if self.mask is not None else i % self.interval == 0

    def step(self, i: int, n: int, *args, **kwargs) -> torch.Tensor:
        if self.is_keyframe(i):
            self.mode = "full"
            self.last_full = self.unet(*args, **kwargs, return_dict=False)[0]
            return self.last_full
        lam = reference_lambda(i, n, self.bias) if self.score_mixing else 1.0
        if lam == 0.0:
            return self.last_full
        self.mode = "reuse"
        fr = self.unet(*args, **kwargs, return_dict=False)[0]
        self.mode = "full"
        return lam * fr + (1.0 - lam) * self.last_full

    def hook_unet(self, scheduler) -> None:
        """Apply the reference inside a pipeline: the step index is looked up from the timestep's value in
        scheduler.timesteps (a host read is fine in a test); the UNet still runs at no-call steps and its
        output is replaced."""
        state = {}

        def pre(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            timesteps = scheduler.timesteps.tolist()
            i, n = timesteps.index(float(t)) if isinstance(timesteps[0], float) else timesteps.index(int(t)), len(timesteps)
            state["i"], state["n"] = i, n
            self.mode = "full" if self.is_keyframe(i) else "reuse"

        def post(module, args, kwargs, output):
            i, n = state["i"], state["n"]
            out = output[0] if isinstance(output, tuple) else output.sample
            if self.is_keyframe(i):
                self.last_full = out
                new = out
            else:
                lam = reference_lambda(i, n, self.bias) if self.score_mixing else 1.0
                new = lam * out + (1.0 - lam) * self.last_full if lam > 0 else self.last_full.clone()
            self.mode = "full"
            return (new,) if isinstance(output, tuple) else type(output)(sample=new)

        self.handles.append(self.unet.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(self.unet.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
