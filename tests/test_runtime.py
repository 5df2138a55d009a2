"""FRDiffUNet over whole DDIM trajectories, against the UNet and an independent eager FRDiff."""

import warnings

import pytest
import torch
from conftest import make_unet, max_rel_error, unet_inputs
from diffusers import DDIMScheduler, UNet2DConditionModel
from frdiff_reference import EagerFRDiff

import frdiff_compile
from frdiff_compile import FRDiffConfig

STEPS = 20


def scheduler(kind):
    prediction = "v_prediction" if kind == "sd2" else "epsilon"
    return DDIMScheduler(prediction_type=prediction, clip_sample=False)


@torch.no_grad()
def sample(model_fn, sched, steps, batch=2, size=8, seed=0):
    """DDIM (eta=0) from seeded noise; model_fn(i, n, x, t) returns the model output."""
    sched.set_timesteps(steps)
    x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model_fn(i, steps, x, t), t, x).prev_sample
    return x


def optimized_fn(fr, cond):
    return lambda i, n, x, t: fr(x, t, **cond).sample


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_m1_trajectory_equals_unoptimized(kind):
    unet = make_unet(kind)
    cond = unet_inputs(kind)
    expected = sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler(kind), STEPS)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    got = sample(optimized_fn(fr, cond), scheduler(kind), STEPS)
    assert torch.equal(got, expected), f"{kind} M=1: max diff {(got - expected).abs().max()}"
    assert fr.stats.full_calls == STEPS and fr.stats.captures == 1


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("mixing", [True, False])
def test_trajectory_matches_eager_reference(kind, interval, mixing):
    unet = make_unet(kind)
    cond = unet_inputs(kind)
    ref = EagerFRDiff(unet, interval=interval, score_mixing=mixing)
    expected = sample(lambda i, n, x, t: ref.step(i, n, x, t, **cond), scheduler(kind), STEPS)
    ref.remove()
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=interval, score_mixing=mixing))
    got = sample(optimized_fn(fr, cond), scheduler(kind), STEPS)
    err = max_rel_error(got, expected)
    assert err < 2e-6, f"{kind} M={interval} mixing={mixing}: relative error {err:.2e} against eager FRDiff (fp32)"
    assert fr.stats.reuse_calls > 0 and fr.stats.forced_keyframes == 0


@pytest.mark.parametrize("mixing", [True, False])
def test_channels_last_unet(mixing):
    """`unet.to(memory_format=torch.channels_last)`, a common diffusers speed-up: caches keep its layout."""
    unet = make_unet("sd15").to(memory_format=torch.channels_last)
    cond = unet_inputs("sd15")
    ref = EagerFRDiff(unet, interval=2, score_mixing=mixing)
    expected = sample(lambda i, n, x, t: ref.step(i, n, x, t, **cond), scheduler("sd15"), STEPS)
    ref.remove()
    fr = frdiff_compile.optimize(unet, FRDiffConfig(score_mixing=mixing))
    got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    assert max_rel_error(got, expected) < 2e-6 and fr.stats.reuse_calls > 0
    entry = fr.graph_entries()[0]
    assert entry.slots[0].keyframe_out.is_contiguous(memory_format=torch.channels_last)
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in entry.slots[0].caches if c.dim() == 4)


def test_lora_on_the_resnet_convs_is_cached_as_the_method_caches_it():
    """A PEFT LoRA on `conv1` wraps the convolution (`conv1.base_layer`) and adds its own path and a dtype cast
    after it. The cache point is the wrapper's output, which the eager method's hook on `conv1` caches; before,
    every resnet was skipped, ran in full at each reuse step, and the result differed from the method's."""
    from peft import LoraConfig

    unet = make_unet("sd15")
    targets = ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "to_q", "to_v"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    cond = unet_inputs("sd15")
    ref = EagerFRDiff(unet, interval=2)
    expected = sample(lambda i, n, x, t: ref.step(i, n, x, t, **cond), scheduler("sd15"), STEPS)
    ref.remove()
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="frdiff_compile")
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    assert max_rel_error(got, expected) < 2e-6 and fr.stats.reuse_calls > 0
    plan = fr.graph_entries()[0].plan
    assert plan.count("resnet_conv1") == 12 and not plan.skipped, str(plan)


def test_a_unet_without_the_cached_modules_is_served_with_a_warning():
    """The latent upscaler's K-blocks hold neither ResnetBlock2D nor Transformer2DModel: nothing is cached, a
    reuse step costs a full one, and the user is told so rather than left to find it in a benchmark."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 32, 64, 64),
        conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32, mid_block_type=None, in_channels=4,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
        out_channels=4, resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
        sample_size=16,
    ).eval()
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=2))
    cond = {"encoder_hidden_states": torch.randn(2, 7, 32)}
    with pytest.warns(UserWarning, match="none of the modules FRDiff caches"):
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), 4, size=16)
    ref = EagerFRDiff(unet, interval=2)
    expected = sample(lambda i, n, x, t: ref.step(i, n, x, t, **cond), scheduler("sd15"), 4, size=16)
    ref.remove()
    assert max_rel_error(got, expected) < 2e-6 and fr.stats.reuse_calls == 1 and fr.stats.eager_calls == 0


def test_paper_counts_at_50_steps():
    unet = make_unet("sd15")
    fr = frdiff_compile.optimize(unet)
    sample(optimized_fn(fr, unet_inputs("sd15")), scheduler("sd15"), 50)
    s = fr.stats
    assert (s.full_calls, s.reuse_calls, s.skip_steps) == (25, 14, 11), s


@torch.no_grad()
def test_lambda_zero_is_ddim_over_keyframes_only():
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    interval = 2
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=interval, mix_bias=2.0))
    sched = scheduler("sd15")
    got = sample(optimized_fn(fr, cond), sched, STEPS)
    assert fr.stats.reuse_calls == 0 and fr.stats.skip_steps == STEPS // 2
    # Hand-written DDIM that jumps from one keyframe timestep to the next (the last one to the final alpha).
    sched.set_timesteps(STEPS)
    alphas, final = sched.alphas_cumprod, sched.final_alpha_cumprod
    timesteps = sched.timesteps.tolist()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for k in range(0, STEPS, interval):
        t = timesteps[k]
        eps = unet(x, t, **cond).sample
        a = alphas[t]
        a_next = alphas[timesteps[k + interval]] if k + interval < STEPS else final
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    err = max_rel_error(got, x)
    assert err < 2e-6, f"lambda=0 trajectory differs from keyframe-only DDIM by {err:.2e} (relative, fp32)"


@torch.no_grad()
def test_unsupported_arguments_fall_back_with_one_warning():
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    sched = scheduler("sd15")
    sched.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    # Options for attention processors (diffusers' own processor ignores this one) are Python state a graph
    # cannot see; only the LoRA scale is captured (test_module_state.py).
    options = {"scale": 0.5, "ip_adapter_masks": None}
    with pytest.warns(UserWarning, match="cross_attention_kwargs \\(\\['ip_adapter_masks', 'scale'\\]") as record:
        for t in sched.timesteps:
            out = fr(x, t, **cond, cross_attention_kwargs=options).sample
    assert len([w for w in record if "frdiff_compile" in str(w.message)]) == 1
    assert torch.equal(out, unet(x, sched.timesteps[-1], **cond, cross_attention_kwargs=options).sample)
    with pytest.raises(RuntimeError, match="ip_adapter_masks.*run the eager UNet"):
        fr.prepare(x, t, **cond, cross_attention_kwargs=options)


def test_graph_pairs_are_bounded_and_rebuilt_after_to():
    unet = make_unet("sd15", layers_per_block=1)  # many captures; depth is beside the point
    fr = frdiff_compile.optimize(unet, FRDiffConfig(max_cached_shapes=2))
    for size in (8, 16, 24):
        sample(optimized_fn(fr, unet_inputs("sd15")), scheduler("sd15"), 4, size=size)
    assert len(fr.graph_entries()) == 2 and fr.stats.captures == 3
    fr.to("cpu").float().eval()  # moves nothing: the graphs read the same storage and are kept
    assert len(fr.graph_entries()) == 2
    sample(optimized_fn(fr, unet_inputs("sd15")), scheduler("sd15"), 4, size=24)
    assert fr.stats.captures == 3
    fr.double()  # the graphs' buffers are freed at once; the graphs go at the first call in float64
    entries = fr.graph_entries()
    assert len(entries) == 2 and all(e.slots == [] for e in entries) and unet.dtype == torch.float64
    cond = {k: v.double() for k, v in unet_inputs("sd15").items()}
    sched = scheduler("sd15")
    sched.set_timesteps(3)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fr(x, sched.timesteps[0], **cond).sample, unet(x, sched.timesteps[0], **cond).sample)
    assert fr.stats.captures == 4 and len(fr.graph_entries()) == 1 and fr.stats.relinks == 0


def test_a_workload_past_max_cached_shapes_warns_once_when_it_rebuilds():
    """Three sizes in turn through two slots: every return exports and compiles again, which was silent."""
    unet = make_unet("sd15", layers_per_block=1)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(max_cached_shapes=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # new sizes, even past capacity, are not rebuilds
        for size in (8, 16, 24):
            sample(optimized_fn(fr, unet_inputs("sd15")), scheduler("sd15"), 2, size=size)
    assert fr.stats.evicted_rebuilds == 0
    with pytest.warns(UserWarning, match=r"again after max_cached_shapes=2 had dropped it") as caught:
        for size in (8, 16):
            sample(optimized_fn(fr, unet_inputs("sd15")), scheduler("sd15"), 2, size=size)
    ours = [w for w in caught if "frdiff_compile" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__  # at the line that called the UNet
    assert fr.stats.evicted_rebuilds == 2 and fr.stats.captures == 5, fr.stats


def test_reconfigure_keeps_graphs_for_a_new_schedule_only():
    unet = make_unet("sd15", layers_per_block=1)  # many captures; depth is beside the point
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    sched = scheduler("sd15")
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # a generation cut off after a keyframe: its cache must not serve the next one
        for t in sched.timesteps[:3]:
            x = sched.step(fr(x, t, **cond).sample, t, x).prev_sample
    entry = fr.graph_entries()[0]
    for config, forced in ((FRDiffConfig(keyframe_interval=3, score_mixing=False), 1), (FRDiffConfig(mix_bias=0.3), 1)):
        fr.reconfigure(config)
        # The loop goes on at step 4, a new generation: a reuse step under M=3, so it must be forced to a
        # keyframe (the cache is the cut-off generation's); a keyframe anyway under M=2.
        with torch.no_grad():
            fr(x, sched.timesteps[4], **cond)
        assert fr.stats.forced_keyframes == forced
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
        expected = sample(optimized_fn(frdiff_compile.optimize(unet, config), cond), scheduler("sd15"), STEPS)
        assert torch.equal(got, expected), config
        assert fr.graph_entries() == [entry] and fr.stats.captures == 1
    fr.reconfigure(FRDiffConfig(compile=True, max_cached_shapes=1))  # graphs built eagerly no longer apply
    assert fr.graph_entries() == [] and fr.frdiff_config.compile
    with pytest.raises(ValueError, match="config fingerprint"):
        fr.reconfigure(FRDiffConfig(keyframes=(True, False), policy_fingerprint="0" * 16))
    with pytest.raises(ValueError, match="takes an FRDiffConfig"):
        fr.reconfigure({"keyframe_interval": 3})
    assert fr.frdiff_config.compile, "a refused reconfigure must leave the config as it was"


def test_inference_mode_then_no_grad():
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    with torch.inference_mode():
        a = sample(optimized_fn(fr, cond), scheduler("sd15"), 6)
    b = sample(optimized_fn(fr, cond), scheduler("sd15"), 6)
    assert torch.equal(a, b)


def controlnet_residuals(t):
    """A ControlNet's residuals for the tiny SD 1.5 UNet at timestep t (new at every step)."""
    shapes = [(32, 8, 8)] * 3 + [(32, 4, 4)] + [(64, 4, 4)] * 2  # conv_in, block 0 (+ downsample), block 1
    g = torch.Generator().manual_seed(int(t))
    down = tuple(torch.randn(2, *s, generator=g) * 0.1 for s in shapes)
    mid = torch.randn(2, 64, 4, 4, generator=g) * 0.1
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


@pytest.mark.parametrize("interval", [1, 2])
def test_controlnet_residuals_stay_fresh(interval):
    # ControlNet residuals are graph inputs: recomputed paths add the current step's residuals.
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    residuals = controlnet_residuals
    ref = EagerFRDiff(unet, interval=interval)
    expected = sample(lambda i, n, x, t: ref.step(i, n, x, t, **cond, **residuals(t)), scheduler("sd15"), STEPS)
    ref.remove()
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=interval))
    got = sample(lambda i, n, x, t: fr(x, t, **cond, **residuals(t)).sample, scheduler("sd15"), STEPS)
    assert fr.stats.eager_calls == 0
    if interval == 1:
        assert torch.equal(got, expected)
    else:
        assert max_rel_error(got, expected) < 2e-6


# Past SD's blocks, both with scale-shift resnets that resample inside (ResnetDownsampleBlock2D) and simple
# cross-attention blocks with no Transformer2DModel, so only resnets are cached; both predict noise and variance.
NON_SD_UNETS = {
    # DeepFloyd IF: projected text embeddings, a text add-embedding and timestep class labels.
    "deepfloyd_if": (
        dict(in_channels=3, out_channels=6, resnet_skip_time_act=True, encoder_hid_dim=24, addition_embed_type="text",
             addition_embed_type_num_heads=2, class_embed_type="timestep", act_fn="gelu"),
        lambda: {"encoder_hidden_states": torch.randn(2, 7, 24), "class_labels": torch.tensor([100, 100])},
    ),
    # Kandinsky 2.2's decoder: no text at all; image embeddings come in through added_cond_kwargs and are
    # projected into the attention context, and the pipeline passes encoder_hidden_states=None.
    "kandinsky22": (
        dict(in_channels=4, out_channels=8, encoder_hid_dim=24, encoder_hid_dim_type="image_proj",
             addition_embed_type="image"),
        lambda: {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": torch.randn(2, 24)}},
    ),
}


def non_sd_unet(name):
    """(unet, conditioning) of a tiny NON_SD_UNETS model, random weights on every path."""
    config, make_cond = NON_SD_UNETS[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        resnet_time_scale_shift="scale_shift", norm_num_groups=8, attention_head_dim=8, cross_attention_dim=32,
        **config,
    ).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet, make_cond()


@pytest.mark.parametrize("name", sorted(NON_SD_UNETS))
def test_non_sd_unets_match_the_eager_reference(name):
    config, _ = NON_SD_UNETS[name]
    unet, cond = non_sd_unet(name)
    channels = config["in_channels"]

    @torch.no_grad()
    def run(step):  # the noise half of the output goes to the scheduler
        sched = DDIMScheduler(clip_sample=False)
        sched.set_timesteps(8)
        x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(sched.timesteps):
            x = sched.step(step(i, 8, x, t)[:, :channels], t, x).prev_sample
        return x

    for interval in (1, 2, 3):
        fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=interval))
        got = run(lambda i, n, x, t: fr(x, t, **cond).sample)
        ref = EagerFRDiff(unet, interval=interval)
        try:
            expected = run(lambda i, n, x, t: ref.step(i, n, x, t, **cond))
        finally:
            ref.remove()
        assert max_rel_error(got, expected) < 1e-5, interval
        assert fr.stats.eager_calls == 0 and (fr.stats.reuse_calls > 0) == (interval > 1), fr.stats
    plan = fr.graph_entries()[0].plan
    assert len(plan.points) == 10 and all(p.kind == "resnet_conv1" for p in plan.points), plan


@pytest.mark.parametrize("mixing", [True, False])
def test_float64_unet_matches_the_eager_reference(mixing):
    """A UNet run in double precision (numerical studies): the blend takes fp64 and blends in fp64."""
    unet, cond = make_unet("sd15").double(), {k: v.double() for k, v in unet_inputs("sd15").items()}
    ref = EagerFRDiff(unet, interval=2, score_mixing=mixing)
    expected = sample(lambda i, n, x, t: ref.step(i, n, x.double(), t, **cond), scheduler("sd15"), STEPS)
    ref.remove()
    fr = frdiff_compile.optimize(unet, FRDiffConfig(score_mixing=mixing))
    got = sample(lambda i, n, x, t: fr(x.double(), t, **cond).sample, scheduler("sd15"), STEPS)
    assert got.dtype == torch.float64 and fr.stats.reuse_calls > 0 and max_rel_error(got, expected) < 1e-12
