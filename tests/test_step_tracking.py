"""How the runtime tells steps and generations apart: from the timestep's place in `scheduler.timesteps`.

A new generation never reads the last one's caches; img2img starts with a keyframe; schedules at a freed
one's address, interleaved generations, per-sample and one-element timestep views, plain-number timesteps
with `reset`, and timesteps it cannot place (which run the eager UNet, with one warning).
"""

import copy

import pytest
import torch
from conftest import make_unet, max_rel_error, unet_inputs
from frdiff_reference import EagerFRDiff
from test_runtime import STEPS, optimized_fn, sample, scheduler

import frdiff_compile


def test_new_generations_never_read_stale_caches():
    unet = make_unet("sd15", layers_per_block=1)  # many captures; depth is beside the point
    fr = frdiff_compile.optimize(unet)
    fresh = frdiff_compile.optimize(unet)
    sched = scheduler("sd15")
    # a cancelled generation, then generations at other batch sizes, resolutions, text lengths and steps
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for t in sched.timesteps[:5]:
            x = sched.step(fr(x, t, **unet_inputs("sd15")).sample, t, x).prev_sample
    for batch, size, text_len, steps in [(1, 8, 7, 12), (2, 16, 5, 15), (2, 8, 7, 10)]:
        cond = unet_inputs("sd15", batch=batch, size=size, text_len=text_len, seed=steps)
        run = lambda m: sample(optimized_fn(m, cond), scheduler("sd15"), steps, batch=batch, size=size, seed=steps)  # noqa: E731
        got, expected = run(fr), run(frdiff_compile.optimize(unet))
        assert torch.equal(got, expected), f"batch={batch} size={size} text_len={text_len} steps={steps}"
    assert fr.stats.forced_keyframes == 0 and fresh.stats.generations == 0


def test_img2img_start_forces_a_keyframe():
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    sched = scheduler("sd15")
    sched.set_timesteps(STEPS)
    start = 5  # an odd step: a reuse step in the schedule, but nothing is cached yet
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def trajectory(model):
        x = x0.clone()
        for i, t in enumerate(sched.timesteps[start:], start):  # a slice, as img2img pipelines take it
            x = sched.step(model(i, x, t), t, x).prev_sample
        return x

    got = trajectory(lambda i, x, t: fr(x, t, **cond).sample)
    # The reference after: while its hooks are on the UNet, the runtime runs it eagerly.
    ref = EagerFRDiff(unet, mask=[i % 2 == 0 or i == start for i in range(STEPS)])
    expected = trajectory(lambda i, x, t: ref.step(i, STEPS, x, t, **cond))
    ref.remove()
    assert fr.stats.forced_keyframes == 1 and fr.stats.eager_calls == 0, fr.stats
    assert max_rel_error(got, expected) < 2e-6


@torch.no_grad()
def test_a_schedule_at_a_freed_schedules_address_starts_a_new_generation():
    # Generations are told apart by the timesteps storage's address. A cancelled generation's schedule that
    # is freed and whose address goes to the next schedule, entered at a later step (an img2img start), must
    # still start a new generation: continuing the old one, its first step would return the old keyframe.
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    sched = scheduler("sd15")
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 4, 8, 8)
    # Schedules as schedulers make them on CPU (`torch.from_numpy`): numpy's allocator reuses a freed block
    # for the next request of its size at once, where torch's own CPU allocator does not.
    values = sched.timesteps.numpy()
    cancelled = torch.from_numpy(values.copy())
    for i in range(3):
        fr(x, cancelled[i], **cond)
    address = cancelled.data_ptr()
    del cancelled
    candidates = [torch.from_numpy(values.copy()) for _ in range(8)]
    timesteps = next((c for c in candidates if c.data_ptr() == address), candidates[0])
    start = 5  # a skip step at b = 0.5 (lambda = 0): it would return the cancelled generation's keyframe
    got = fr(x, timesteps[start], **cond).sample
    assert fr.stats.generations == 2 and fr.stats.forced_keyframes == 1, fr.stats
    assert torch.equal(got, unet(x, timesteps[start], **cond).sample)


@torch.no_grad()
def test_interleaved_generations_run_full_compute_and_copies_follow_one_each():
    # A server stepping two requests in turn through one runtime: each call's timesteps tensor differs from
    # the last one's, so every step starts a generation and runs the keyframe graph (correct, no reuse).
    # A shallow copy per request shares the UNet's parameters and follows its own request's generation.
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    steps = 8

    def interleaved(models):
        scheds = [scheduler("sd15") for _ in models]
        xs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(len(models))]
        for sched in scheds:
            sched.set_timesteps(steps)
        for i in range(steps):
            for k, (model, sched) in enumerate(zip(models, scheds)):
                t = sched.timesteps[i]
                xs[k] = sched.step(model(xs[k], t, **cond).sample, t, xs[k]).prev_sample
        return xs

    shared = frdiff_compile.optimize(unet)
    streams = [copy.copy(shared) for _ in range(2)]
    assert all(stream.unet is unet for stream in streams)
    full, one_each = interleaved([unet, unet]), interleaved(streams)
    with pytest.warns(UserWarning, match="generations are interleaved") as record:
        for got, expected in zip(interleaved([shared, shared]), full):
            assert torch.equal(got, expected)
    # Once per runtime, at the line that called the UNet (not inside torch or the runtime).
    assert [w.filename for w in record if "frdiff_compile" in str(w.message)] == [__file__]
    assert shared.stats.generations == 2 * steps and shared.stats.reuse_calls + shared.stats.skip_steps == 0
    assert shared.stats.resumed_generations == 2 * (steps - 1), shared.stats  # every step after the first
    alone = frdiff_compile.optimize(unet)  # the requests one after the other
    for seed, (stream, got) in enumerate(zip(streams, one_each)):
        expected = sample(optimized_fn(alone, cond), scheduler("sd15"), steps, seed=seed)
        assert torch.equal(got, expected), f"stream {seed}"
        assert stream.stats.generations == 1 and stream.stats.reuse_calls > 0
    assert alone.stats.reuse_calls == sum(stream.stats.reuse_calls for stream in streams)


@pytest.mark.parametrize("view", ["expand", "unsqueeze", "slice"])
def test_timesteps_viewed_per_sample_or_as_one_element_are_tracked(view):
    # Pipelines pass `t.expand(batch)`; hand-written loops `t[None]` or `timesteps[i:i + 1]`: each is still
    # one entry of the schedule, so the step is known without a reset() and the graphs serve every step.
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    steps = 6
    fr = frdiff_compile.optimize(unet)
    expected = sample(optimized_fn(frdiff_compile.optimize(unet), cond), scheduler("sd15"), steps)
    sched = scheduler("sd15")
    sched.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            passed = {"expand": t.expand(2), "unsqueeze": t[None], "slice": sched.timesteps[i:i + 1]}[view]
            x = sched.step(fr(x, passed, **cond).sample, t, x).prev_sample
    assert fr.stats.eager_calls == 0 and fr.stats.reuse_calls > 0, fr.stats
    assert torch.equal(x, expected)


def test_reset_counts_steps_for_plain_timesteps():
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    sched = scheduler("sd15")
    expected = sample(optimized_fn(frdiff_compile.optimize(unet), cond), sched, STEPS)
    fr = frdiff_compile.optimize(unet)

    def plain(i, n, x, t):
        if i == 0:
            fr.reset(num_inference_steps=n)
        return fr(x, int(t), **cond).sample  # a Python int: no schedule view to read

    got = sample(plain, sched, STEPS)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="num_inference_steps"):
        fr.reset(num_inference_steps=0)


@torch.no_grad()
def test_untracked_timesteps_warn_once_and_run_eager():
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    x = torch.randn(2, 4, 8, 8)
    with pytest.warns(UserWarning, match="reset\\(num_inference_steps=N\\)") as record:
        outs = [fr(x, torch.tensor(t), **cond).sample for t in (900, 800, 700)]
    assert len([w for w in record if "frdiff_compile" in str(w.message)]) == 1
    assert torch.equal(outs[2], unet(x, torch.tensor(700), **cond).sample)
    assert fr.stats.eager_calls == 3


@pytest.mark.parametrize("mixing, guided", [(False, range(5, 14)), (True, range(5, 7))])
def test_a_signature_coming_back_mid_generation_never_reads_its_older_caches(mixing, guided):
    # Guidance only in an interval of steps (Kynkaanniemi et al. 2024), written with a batched CFG: the batch
    # is 1 before and after the interval and 2 inside it. Back at batch 1, the batch-1 caches hold the step
    # before the interval, not the last keyframe (a batch-2 one): a reuse step there would read features
    # several steps old, a skip step would return an old keyframe's output. Each runs full compute instead.
    unet = make_unet("sd15", layers_per_block=1)
    text = unet_inputs("sd15")["encoder_hidden_states"]
    interval = 3

    def guided_interval(model):
        def fn(i, n, x, t):
            if i not in guided:
                return model(i, n, x, t, encoder_hidden_states=text[1:])
            uncond, cond = model(i, n, torch.cat([x, x]), t, encoder_hidden_states=text).chunk(2)
            return uncond + 3.0 * (cond - uncond)
        return fn

    fr = frdiff_compile.optimize(unet, frdiff_compile.FRDiffConfig(keyframe_interval=interval, score_mixing=mixing))
    got = sample(guided_interval(lambda i, n, x, t, **c: fr(x, t, **c).sample), scheduler("sd15"), STEPS, batch=1)
    back = guided[-1] + 1
    mask = [i % interval == 0 or i in (guided[0], back) for i in range(STEPS)]
    assert not any(i % interval == 0 for i in (guided[0], back))  # both are reuse or skip steps of the schedule
    ref = EagerFRDiff(unet, score_mixing=mixing, mask=mask)
    expected = sample(guided_interval(lambda i, n, x, t, **c: ref.step(i, n, x, t, **c)), scheduler("sd15"), STEPS,
                      batch=1)
    ref.remove()
    assert fr.stats.forced_keyframes == 2 and fr.stats.eager_calls == 0, fr.stats
    assert max_rel_error(got, expected) < 2e-6
