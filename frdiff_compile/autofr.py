"""Auto-FR: learn which steps are keyframes by gradient descent through the sampling trajectory.

Invariants:
- Without a budget (the paper's search): one logit per step, initialised at 0.1 (sigma = 0.525 rounds to
  "compute", so the search starts from full compute); the gate is straight-through:
  h = round(s) + s - stopgrad(s). Step 0 always computes, in both searches.
- During the search every cache point is computed by the search graph and the network reads the soft
  memory M <- h * S + (1 - h) * M; score mixing enters exactly as at inference (lambda from the same
  schedule function), blending against a soft "last keyframe output" E <- h * eps + (1 - h) * E. With h
  binary this is exactly the runtime's keyframe / reuse / skip arithmetic, so the mask found is the one used.
- Loss = MSE(final latent, full-compute latent from the same noise and conditioning) + w * sum ReLU(2s - 1).
- With `target_keyframes=K` (past the paper) every mask evaluated has exactly K keyframes: the search
  starts on the uniform K-mask, the baseline to beat, and moves one keyframe at a time, ranked by the
  trajectory gradient of the MSE with respect to the gates; a move is kept only if it lowers the MSE on
  fixed validation draws, so on those draws the result is never worse than uniform. With `reuse_cost`
  no mask tried costs more than the uniform one either.
- The DDIM update is written out here (no scheduler state), so per-step activation checkpointing can
  recompute any step; memory stays bounded by one step's activations plus the carried state. It is
  exactly diffusers' `DDIMScheduler.step` as pipelines call it (eta = 0, previous timestep t - T // N,
  clip_sample clipping x0 only), so the mask is tuned on the sampler it will serve; other schedulers and
  dynamic thresholding are refused (`check_scheduler`).
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
from .schedule import build_schedule, mix_weight

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


def check_scheduler(scheduler: object) -> None:
    """Refuse a scheduler whose steps `ddim_step` would not reproduce (the mask would fit another sampler)."""
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"Auto-FR's search samples with DDIM (eta = 0), got {type(scheduler).__name__}; pass "
                         "DDIMScheduler.from_config(pipe.scheduler.config)")
    if scheduler.config.thresholding:
        raise ValueError("Auto-FR's search does not reproduce DDIM's dynamic thresholding (thresholding=True); "
                         "search with a DDIMScheduler configured with thresholding=False")
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"Auto-FR supports epsilon, sample and v_prediction schedulers, got prediction_type={kind!r}")


def ddim_step(scheduler, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from timestep `t`, as diffusers' DDIMScheduler.step computes it
    (after `set_timesteps`); differentiable, and free of scheduler state so a checkpointed step can rerun."""
    check_scheduler(scheduler)
    alphas = scheduler.alphas_cumprod
    # diffusers' previous timestep, which is not always the schedule's next entry ("trailing", "linspace")
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a = alphas[t].to(x)
    a_prev = (alphas[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod).to(x)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    elif kind == "sample":
        x0, eps = eps, (x - a.sqrt() * eps) / (1 - a).sqrt()
    else:  # v_prediction
        x0 = a.sqrt() * x - (1 - a).sqrt() * eps
        eps = a.sqrt() * eps + (1 - a).sqrt() * x
    if scheduler.config.clip_sample:  # x0 only: pipelines step with use_clipped_model_output=False
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
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
    scores: torch.Tensor  # per step: the logits (paper's search) or minus the mean gate gradient (budgeted)
    validation_mse: float | None = None  # budgeted search: the kept mask's MSE on the validation draws
    start_validation_mse: float | None = None  # ... and the uniform starting mask's on the same draws


def uniform_mask(num_steps: int, keyframes: int) -> torch.Tensor:
    """`keyframes` of `num_steps` spread evenly from step 0; equal to `keyframe_interval=M` where one has that count."""
    for interval in range(1, num_steps + 1):
        if -(-num_steps // interval) == keyframes:
            return torch.arange(num_steps) % interval == 0
    mask = torch.zeros(num_steps, dtype=torch.bool)
    # Round half up: with a spacing >= 1 no two keyframes land on the same step.
    mask[[int(j * num_steps / keyframes + 0.5) for j in range(keyframes)]] = True
    return mask


class _Trajectory:
    """Runs `num_steps` DDIM steps of the search graph with per-step gates (None: full compute)."""

    def __init__(self, unet, problem: SearchProblem, num_steps: int, config: FRDiffConfig, example) -> None:
        scheduler = problem.scheduler
        check_scheduler(scheduler)
        scheduler.set_timesteps(num_steps)
        self.problem, self.scheduler, self.config = problem, scheduler, config
        self.timesteps = [int(t) for t in scheduler.timesteps]
        self.lambdas = [mix_weight(i, num_steps, config.mix_bias, config.mix_slope) if config.mixes_scores else 1.0
                        for i in range(num_steps)]
        latents, kwargs = example
        layout, tensors = CallLayout.from_call(self._call(latents, self.timesteps[0], kwargs))
        captured = capture(unet, layout, tensors)
        self.plan = plan_cache_points(captured.graph_module, unet, cache_point=config.cache_point)
        self.graph = build_search_graph(captured.graph_module, self.plan)

    @staticmethod
    def _call(x: torch.Tensor, t: int, kw: dict) -> dict:
        return {"sample": torch.cat([x, x]), "timestep": torch.tensor(t), **kw}

    def __call__(self, x: torch.Tensor, kw: dict, gates: torch.Tensor | None) -> torch.Tensor:
        memory = [p.empty(x.device).zero_() for p in self.plan.points]
        last = torch.zeros_like(torch.cat([x, x]))
        timesteps, scale = self.timesteps, self.problem.guidance_scale
        for i, t in enumerate(timesteps):
            # On the latents' device: the blend op takes its weight where its data is (gates live on the host).
            h = torch.ones((), device=x.device) if gates is None or i == 0 else gates[i].to(x.device)
            lam = self.lambdas[i]

            def step(x, last, h, *memory, t=t, lam=lam):
                _, flat = CallLayout.from_call(self._call(x, t, kw))
                out, *new_memory = self.graph(*flat, *memory, h)
                eps = h * out + (1 - h) * (lam * out + (1 - lam) * last)
                uncond, cond = eps.chunk(2)
                guided = uncond + scale * (cond - uncond)
                return (ddim_step(self.scheduler, guided, t, x), h * out + (1 - h) * last, *new_memory)

            if gates is None or not torch.is_grad_enabled():
                x, last, *memory = step(x, last, h, *memory)
            else:  # recompute each step in the backward pass: memory stays one step's activations
                x, last, *memory = checkpoint(step, x, last, h, *memory, use_reentrant=False)
        return x


def search(
    unet: torch.nn.Module,
    problem: SearchProblem,
    num_steps: int,
    *,
    iterations: int = 100,
    lr: float = 5e-3,
    weight: float = 1e-3,
    target_keyframes: int | None = None,
    validation_draws: int = 4,
    config: FRDiffConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    reuse_cost: float | None = None,
) -> SearchResult:
    """Learn a keyframe mask for `num_steps`-step DDIM generations of `unet` on `problem`.

    Without `target_keyframes`, the paper's search: logits start at 0.1 (every step computes), Adam with
    learning rate `lr`, and `weight` trades quality for fewer keyframes. With `target_keyframes=K`, a
    budgeted search that starts on the uniform K-keyframe mask and moves one keyframe at a time where the
    trajectory's gradient says it helps most, keeping a move only if it lowers the MSE on
    `validation_draws` fixed draws (generator `seed + 1`); `lr` and `weight` do not apply there.
    With `reuse_cost` (a reuse call's time over a keyframe call's, as measured on the target machine) the
    budgeted search also holds the cost: a move that would make the mask cost more than the uniform one
    (keyframes + reuse_cost x reuse calls; no-call steps are free) is not tried, so the result is at most as
    slow as uniform keyframes. Without it, moves may trade no-call steps for reuse calls.
    """
    config = config or FRDiffConfig()
    if target_keyframes is not None and not 1 <= target_keyframes <= num_steps:
        raise ValueError(f"target_keyframes must be in [1, {num_steps}], got {target_keyframes}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if reuse_cost is not None and (target_keyframes is None or not 0.0 <= reuse_cost <= 1.0):
        raise ValueError(f"reuse_cost bounds the budgeted search (target_keyframes) and is a fraction of a "
                         f"keyframe call in [0, 1], got reuse_cost={reuse_cost} with "
                         f"target_keyframes={target_keyframes}")
    if target_keyframes is not None and validation_draws < 1:
        raise ValueError(f"the budgeted search compares masks on validation draws: validation_draws must be >= 1, "
                         f"got {validation_draws}")
    generator = torch.Generator().manual_seed(seed)
    first = problem.draw(generator)

    def draws():  # the first draw was used to capture the graph; every iteration then takes a fresh one
        yield first
        while True:
            yield problem.draw(generator)

    bar = range(iterations)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="Auto-FR search")
    with _frozen(unet):  # only the gates learn; the UNet's own requires_grad flags come back afterwards
        run = _Trajectory(unet, problem, num_steps, config, first)
        if target_keyframes is None:
            mask, scores, history = _penalty_search(run, zip(bar, draws()), num_steps, lr, weight, bar)
            best_mse = start_mse = None
        else:
            validation = _Validation(run, problem, validation_draws, seed + 1)
            mask, scores, history, best_mse, start_mse = _swap_search(
                run, zip(bar, draws()), num_steps, target_keyframes, validation, bar, reuse_cost)
    settings = {
        "method": "penalty" if target_keyframes is None else "swap", "iterations": iterations, "lr": lr,
        "weight": weight, "target_keyframes": target_keyframes, "reuse_cost": reuse_cost,
        "validation_draws": validation_draws, "seed": seed,
        "guidance_scale": problem.guidance_scale, "score_mixing": config.mixes_scores, "mix_bias": config.mix_bias,
        "mix_slope": config.mix_slope, "cache_point": config.cache_point,
    }
    policy = KeyframePolicy(num_steps, mask, unet_fingerprint(unet), settings, tuple(history))
    logger.info("Auto-FR: %d of %d steps are keyframes after %d iterations", policy.num_keyframes, num_steps,
                len(history))
    return SearchResult(policy, scores, best_mse, start_mse)


def _penalty_search(run, iterations, num_steps, lr, weight, bar):  # noqa: ANN001, ANN202 - internal
    """The paper's search: straight-through gates, MSE + w * sum ReLU(2 sigma(g) - 1), Adam."""
    logits = torch.full((num_steps,), 0.1, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    history: list[float] = []
    for iteration, (latents, kw) in iterations:
        with torch.no_grad():
            target = run(latents, kw, None)
        soft = torch.sigmoid(logits)
        final = run(latents, kw, torch.round(soft) + soft - soft.detach())
        loss = F.mse_loss(final, target) + weight * F.relu(2 * soft[1:] - 1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        keyframes = 1 + int((logits[1:] > 0).sum())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.2e}", keyframes=keyframes)
        logger.debug("iteration %d: loss %.3e keyframes %d", iteration, loss.item(), keyframes)
    scores = logits.detach()
    return tuple(i == 0 or bool(scores[i] > 0) for i in range(num_steps)), scores, history


def _swap_search(run, iterations, num_steps, budget, validation, bar, reuse_cost):  # noqa: ANN001, ANN202
    """Budgeted search: gradient-ranked keyframe moves, each kept only if the validation MSE drops.

    The gradient g of the MSE with respect to the gates at the current binary mask is averaged over the
    draws seen at that mask. Turning keyframe i into a reuse step and reuse step j into a keyframe changes
    the MSE by about g[j] - g[i]; the most promising untried move is validated, also once no move is
    predicted to help (the estimate is first order; a binary flip is not small). Moving one keyframe at a
    time matters: the first-order estimate of several moves at once was measured to be far off.
    """
    mask = uniform_mask(num_steps, budget).float()
    best = start = validation.score(mask)

    def cost(m: torch.Tensor) -> float:  # the runtime's schedule for this mask: keyframes + reuse_cost x reuse calls
        keyframes = tuple(bool(v) for v in m)
        return build_schedule(num_steps, dataclasses.replace(run.config, keyframes=keyframes)).cost(reuse_cost)

    max_cost = cost(mask) + 1e-9 if reuse_cost is not None else None  # the uniform mask's

    def affordable(i: int, j: int) -> bool:  # keyframe i moved to step j costs no more than uniform
        if max_cost is None:
            return True
        moved = mask.clone()
        moved[i], moved[j] = 0.0, 1.0
        return cost(moved) <= max_cost

    total, seen = torch.zeros(num_steps), 0
    tried: set[tuple[int, int]] = set()
    history: list[float] = []
    for iteration, (latents, kw) in iterations:
        with torch.no_grad():
            target = run(latents, kw, None)
        gates = mask.clone().requires_grad_(True)
        mse = F.mse_loss(run(latents, kw, gates), target)
        mse.backward()
        history.append(mse.item())
        total, seen = total + gates.grad, seen + 1
        g = total / seen
        moves = sorted((float(g[j] - g[i]), i, j) for i in range(1, num_steps) if mask[i]
                       for j in range(1, num_steps) if not mask[j] and (i, j) not in tried and affordable(i, j))
        if not moves:
            logger.info("iteration %d: every single move from this mask (within the cost cap, if any) was tried; "
                        "stopping", iteration + 1)
            break
        _, i, j = moves[0]
        candidate = mask.clone()
        candidate[i], candidate[j] = 0.0, 1.0
        score = validation.score(candidate)
        logger.info("iteration %d: keyframe %d -> %d, validation MSE %.3e (best %.3e, uniform %.3e)",
                    iteration + 1, i, j, score, best, start)
        if score < best:
            mask, best, total, seen = candidate, score, torch.zeros(num_steps), 0
            tried.clear()
        else:
            tried.add((i, j))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(mse=f"{mse.item():.2e}", validation=f"{best:.2e}", keyframes=budget)
    return tuple(bool(v) for v in mask), -g, history, best, start


class _Validation:
    """Fixed draws and their full-compute results, to score hard masks without gradients."""

    def __init__(self, run: _Trajectory, problem: SearchProblem, draws: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.run = run
        self.draws = [problem.draw(generator) for _ in range(draws)]
        with torch.no_grad():
            self.targets = [run(x, kw, None) for x, kw in self.draws]

    def score(self, mask: torch.Tensor) -> float:
        with torch.no_grad():
            errors = [F.mse_loss(self.run(x, kw, mask), target).item() for (x, kw), target in zip(self.draws, self.targets)]
        return sum(errors) / len(errors)


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
