"""A small diffusers-style sampler for the digits model: scheduler, classifier-free guidance, labels, seed.

Invariants:
- Works with any callable UNet that takes (sample, timestep, encoder_hidden_states) like diffusers' and
  returns `.sample` (the stock UNet or an `FRDiffUNet`), and calls it once per step with the CFG batch
  [unconditional, conditional], iterating `scheduler.timesteps` exactly as diffusers pipelines do.
- Guidance 1.5 is the default: the shipped model's samples are recognised 98-99% of the time there (20 and
  50 DDIM steps), while guidance 3 over-saturates this small pixel-space model.
- The initial noise comes from a CPU generator seeded by `seed`, so the same seed gives the same noise for
  every UNet: quality comparisons are sample-for-sample.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .model import IMAGE_SIZE, NULL_LABEL, LabelEmbedding


def default_scheduler() -> DDIMScheduler:
    """The schedule the model was trained with (cosine betas, epsilon), sampled with DDIM (eta = 0)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True, set_alpha_to_one=True
    )


class DigitsPipeline:
    def __init__(self, unet, embedding: LabelEmbedding, scheduler: SchedulerMixin | None = None) -> None:
        self.unet = unet
        self.embedding = embedding
        self.scheduler = scheduler if scheduler is not None else default_scheduler()

    @torch.no_grad()
    def __call__(
        self,
        labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.5,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images (batch, 1, 16, 16) in [-1, 1] for `labels` (ints 0-9)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device = self.embedding.table.weight.device
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        if labels.dim() != 1 or labels.numel() == 0 or labels.min() < 0 or labels.max() >= NULL_LABEL:
            raise ValueError(f"labels must be a non-empty 1-D sequence of digits 0-9, got {labels.tolist()}")
        batch = labels.numel()
        if noise is None:
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        x = noise.to(device)
        cond = self.embedding(torch.cat([torch.full_like(labels, NULL_LABEL), labels]))
        scheduler = copy.deepcopy(self.scheduler)  # per-call state: concurrent pipelines never share it
        scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps
        if progress:
            from tqdm.auto import tqdm

            timesteps = tqdm(timesteps, desc="sampling", leave=False)
        for t in timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            uncond, cond_out = self.unet(model_in, t, encoder_hidden_states=cond).sample.chunk(2)
            eps = uncond + guidance_scale * (cond_out - uncond)
            x = scheduler.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)
