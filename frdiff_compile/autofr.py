"""Auto-FR: learn which steps are keyframes by gradient descent through the sampling trajectory.

Invariants:
- One logit per step, initialised at 0.1 (sigma = 0.525 rounds to "compute", so the search starts from
  full compute); step 0 always computes. The gate is straight-through: h = round(s) + s - stopgrad(s).
- During the search every cache point is computed by the search graph and the network reads the soft
  memory M <- h * S + (1 - h) * M; score mixing enters exactly as at inference (lambda from the same
  schedule function), blending against a soft "last keyframe output" E <- h * eps + (1 - h) * E. With h
  binary this is exactly the runtime's keyframe / reuse / skip arithmetic, so the mask found is the one used.
- Loss = MSE(final latent, full-compute latent from the same noise and conditioning) + w * sum ReLU(2s - 1).
  With `target_keyframes`, w is adapted each iteration towards that many keyframes and the final mask keeps
  the top-scoring steps, so the budget is met exactly.
- The DDIM update is written out here (no scheduler state), so per-step activation checkpointing can
  recompute any step; memory stays bounded by one step's activations plus the carried state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import FRDiffConfig
from .passes import CallLayout, build_search_graph, capture, plan_cache_points
from .policy import KeyframePolicy, unet_fingerprint
from .schedule import mix_weight

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SearchProblem:
    """What to sample during the search.

    `draw(generator)` returns the initial latents (B, C, H, W) and the UNet keyword arguments for the CFG
    batch [unconditional, conditional] (batch 2B); `guidance_scale` combines the two halves.
    """

    draw: Callable[[torch.Generator], tuple[torch.Tensor, dict]]
    guidance_scale: float
    scheduler: object  # a diffusers DDIMScheduler (its alphas and prediction type are used)


def _ddim_step(scheduler, eps: torch.Tensor, t: int, t_prev: int | None, x: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0), as diffusers' DDIMScheduler computes it."""
    alphas = scheduler.alphas_cumprod
    a = alphas[t].to(x)
    a_prev = (alphas[t_prev] if t_prev is not None else scheduler.final_alpha_cumprod).to(x)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * eps
        eps = a.sqrt() * eps + (1 - a).sqrt() * x
    else:
        raise ValueError(f"Auto-FR supports epsilon and v_prediction schedulers, got prediction_type={kind!r}")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
        if kind == "epsilon":
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):  # noqa: ANN202 - a context manager
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclasses.dataclass
class SearchResult:
    policy: KeyframePolicy
    logits: torch.Tensor


def search(
    unet: torch.nn.Module,
    problem: SearchProblem,
    num_steps: int,
    *,
    iterations: int = 100,
    lr: float = 5e-3,
    weight: float = 1e-3,
    target_keyframes: int | None = None,
    config: FRDiffConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SearchResult:
    """Learn a keyframe mask for `num_steps`-step DDIM generations of `unet` on `problem`."""
    config = config or FRDiffConfig()
    if target_keyframes is not None and not 1 <= target_keyframes <= num_steps:
        raise ValueError(f"target_keyframes must be in [1, {num_steps}], got {target_keyframes}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    generator = torch.Generator().manual_seed(seed)
    scheduler = problem.scheduler
    scheduler.set_timesteps(num_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    lambdas = [mix_weight(i, num_steps, config.mix_bias, config.mix_slope) if config.score_mixing else 1.0
               for i in range(num_steps)]

    latents, kwargs = problem.draw(generator)
    layout, tensors = CallLayout.from_call({"sample": torch.cat([latents, latents]), "timestep": torch.tensor(timesteps[0]), **kwargs})
    captured = capture(unet, layout, tensors)
    plan = plan_cache_points(captured.graph_module, unet)
    graph = build_search_graph(captured.graph_module, plan)
    with _frozen(unet):  # only the logits learn; the UNet's own requires_grad flags come back afterwards

        def guided(out: torch.Tensor) -> torch.Tensor:
            uncond, cond = out.chunk(2)
            return uncond + problem.guidance_scale * (cond - uncond)

        def run(x: torch.Tensor, kw: dict, gates: list[torch.Tensor] | None) -> torch.Tensor:
            memory = [torch.zeros(p.shape, dtype=p.dtype) for p in plan.points]
            last = torch.zeros_like(torch.cat([x, x]))
            for i, t in enumerate(timesteps):
                t_prev = timesteps[i + 1] if i + 1 < num_steps else None
                h = torch.ones(()) if gates is None or i == 0 else gates[i]

                def step(x, last, h, *memory, i=i, t=t, t_prev=t_prev):
                    _, flat = CallLayout.from_call({"sample": torch.cat([x, x]), "timestep": torch.tensor(t), **kw})
                    out, *new_memory = graph(*flat, *memory, h)
                    eps = h * out + (1 - h) * (lambdas[i] * out + (1 - lambdas[i]) * last)
                    new_last = h * out + (1 - h) * last
                    return (_ddim_step(scheduler, guided(eps), t, t_prev, x), new_last, *new_memory)

                if gates is None:
                    x, last, *memory = step(x, last, h, *memory)
                else:
                    x, last, *memory = checkpoint(step, x, last, h, *memory, use_reentrant=False)
            return x

        logits = torch.full((num_steps,), 0.1, requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=lr)
        history: list[float] = []
        bar = range(iterations)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc="Auto-FR search")
        for iteration in bar:
            latents, kw = problem.draw(generator) if iteration else (latents, kwargs)
            with torch.no_grad():
                target = run(latents, kw, None)
            soft = torch.sigmoid(logits)
            gates = list(torch.round(soft) + soft - soft.detach())
            final = run(latents, kw, gates)
            penalty = F.relu(2 * soft[1:] - 1).sum()
            loss = F.mse_loss(final, target) + weight * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            keyframes = 1 + int((torch.sigmoid(logits[1:]) > 0.5).sum())
            if target_keyframes is not None:  # dual ascent on w towards the budget
                weight = weight * 1.3 if keyframes > target_keyframes else weight / 1.3 if keyframes < target_keyframes else weight
            history.append(loss.item())
            if progress:
                bar.set_postfix(loss=f"{loss.item():.2e}", keyframes=keyframes)
            logger.debug("iteration %d: loss %.3e keyframes %d w %.2e", iteration, loss.item(), keyframes, weight)

        scores = logits.detach()
        if target_keyframes is not None:
            chosen = set(torch.topk(scores[1:], target_keyframes - 1).indices.add(1).tolist()) if target_keyframes > 1 else set()
            mask = tuple(i == 0 or i in chosen for i in range(num_steps))
        else:
            mask = tuple(i == 0 or bool(scores[i] > 0) for i in range(num_steps))
        settings = {
            "iterations": iterations, "lr": lr, "weight": weight, "target_keyframes": target_keyframes, "seed": seed,
            "guidance_scale": problem.guidance_scale, "score_mixing": config.score_mixing, "mix_bias": config.mix_bias,
            "mix_slope": config.mix_slope,
        }
        policy = KeyframePolicy(num_steps, mask, unet_fingerprint(unet), settings, tuple(history))
        logger.info("Auto-FR: %d of %d steps are keyframes after %d iterations", policy.num_keyframes, num_steps, iterations)
        return SearchResult(policy=policy, logits=scores)


def digits_problem(embedding: torch.nn.Module, batch: int = 1, guidance_scale: float = 1.5) -> SearchProblem:
    """The shipped digits model's problem: random labels and noise per iteration."""
    from .digits.model import IMAGE_SIZE, NULL_LABEL
    from .digits.pipeline import default_scheduler

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        labels = torch.randint(0, 10, (batch,), generator=generator)
        noise = torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        with torch.no_grad():
            cond = embedding(torch.cat([torch.full_like(labels, NULL_LABEL), labels]))
        return noise, {"encoder_hidden_states": cond}

    return SearchProblem(draw=draw, guidance_scale=guidance_scale, scheduler=default_scheduler())


def embeddings_problem(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    latent_shape: tuple[int, ...],
    scheduler: object,
    guidance_scale: float = 7.5,
    added_cond_kwargs: dict | None = None,
) -> SearchProblem:
    """A Stable Diffusion problem from precomputed text embeddings (e.g. `pipe.encode_prompt` outputs).

    `uncond` and `cond` are (P, L, D) embeddings of P prompts; each iteration draws one prompt and fresh
    noise of `latent_shape` (C, H, W). `added_cond_kwargs` (SDXL) holds tensors batched like
    [uncond; cond] with 2P rows; the drawn prompt's two rows are used.
    """
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond {tuple(uncond.shape)} and cond {tuple(cond.shape)} embeddings must match")
    prompts = cond.shape[0]

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        k = int(torch.randint(0, prompts, (1,), generator=generator))
        noise = torch.randn(1, *latent_shape, generator=generator).to(cond)
        kwargs: dict = {"encoder_hidden_states": torch.cat([uncond[k : k + 1], cond[k : k + 1]])}
        if added_cond_kwargs:
            kwargs["added_cond_kwargs"] = {
                name: torch.cat([value[k : k + 1], value[prompts + k : prompts + k + 1]])
                for name, value in added_cond_kwargs.items()
            }
        return noise, kwargs

    return SearchProblem(draw=draw, guidance_scale=guidance_scale, scheduler=scheduler)
