"""Global state a call is made under (autocast, grad mode) against what the captured graphs bake in."""

import pytest
import torch
from conftest import make_unet, max_rel_error, unet_inputs
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig

STEPS = 6


def test_autocast_and_plain_generations_get_their_own_graphs():
    # diffusers' attention casts with `hidden_states.to(query.dtype)`, which export records as a cast to the
    # dtype autocast gave query, so a graph traced under autocast is wrong without it (it used to raise a
    # dtype mismatch in the next plain generation) and one traced without it is wrong under it.
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    for autocast in (True, False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            expected = sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), STEPS)
            got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
        assert torch.equal(got, expected), f"autocast={autocast}: max diff {(got - expected).abs().max()}"
    assert fr.stats.captures == 2 and fr.stats.eager_calls == 0, fr.stats


def test_a_loop_without_no_grad_runs_inference_graphs():
    # A user loop that forgot torch.no_grad(): parameters require grad, so the graphs would record autograd
    # history, and the keyframe's in-place cache writes would chain every later step to it.
    unet = make_unet("sd15")
    assert all(p.requires_grad for p in unet.parameters())
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=2, score_mixing=False))
    sched = scheduler("sd15")
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    for t in sched.timesteps:
        out = fr(x, t, **cond).sample
        outputs.append(out)
        x = sched.step(out, t, x).prev_sample
    entry = fr.graph_entries()[0]
    assert not any(o.requires_grad for o in outputs) and not any(c.requires_grad for c in entry.slots[0].caches)
    assert fr.stats.reuse_calls > 0 and fr.stats.eager_calls == 0, fr.stats
    expected = sample(optimized_fn(frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=2,
                                                                              score_mixing=False)), cond),
                      scheduler("sd15"), STEPS)
    assert torch.equal(x.detach(), expected)


def test_a_call_that_needs_gradients_runs_the_eager_unet():
    # Guidance by a loss on the UNet's output differentiates through the UNet: the graphs record no autograd
    # history, so such calls (an input that requires grad, grad mode on) run the eager UNet, with one warning.
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    sched = scheduler("sd15")
    sched.set_timesteps(STEPS)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with pytest.warns(UserWarning, match="requires grad") as record:
        outs = [fr(x, t, **cond).sample for t in sched.timesteps[:2]]
    assert len([w for w in record if "frdiff_compile" in str(w.message)]) == 1
    expected = unet(x, sched.timesteps[1], **cond).sample
    grads = [torch.autograd.grad(out.square().sum(), x)[0] for out in (outs[1], expected)]
    assert torch.equal(outs[1], expected) and torch.equal(grads[0], grads[1])
    assert fr.stats.eager_calls == 2 and fr.stats.captures == 0, fr.stats


def test_numerics_flags_set_between_generations_get_their_own_graphs():
    # Kernels compiled or captured under one set of TF32, determinism and attention-backend flags keep them:
    # a CUDA graph replays the cuBLAS kernel picked at capture, and inductor picks the SDPA kernel when it
    # compiles (a graph compiled under the defaults called the CPU flash kernel inside sdpa_kernel(MATH) too).
    # Set between generations, the flags select graphs built under them; set back, the first graphs.
    from test_module_values import tiny_runtime
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from frdiff_compile.numerics import apply_numerics_settings, numerics_settings

    unet, fr, stock, run = tiny_runtime()
    first = numerics_settings()
    try:
        assert torch.equal(run(), stock()) and fr.stats.captures == 1
        torch.backends.cuda.matmul.allow_tf32 = not torch.backends.cuda.matmul.allow_tf32
        assert torch.equal(run(), stock()) and fr.stats.captures == 2
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        assert torch.equal(run(), stock()) and fr.stats.captures == 3
        torch.backends.cuda.matmul.allow_fp16_accumulation = True  # fp16 matmuls that accumulate in fp16
        torch.backends.cudnn.benchmark = True  # cuDNN's algorithms timed, not picked by its heuristics
        assert torch.equal(run(), stock()) and fr.stats.captures == 4
        apply_numerics_settings(first)
        assert numerics_settings() == first
        assert torch.equal(run(), stock()) and fr.stats.captures == 4, "back to the first flags: their graphs"
        with sdpa_kernel(SDPBackend.MATH):  # around a whole generation, as around a pipeline call
            assert torch.equal(run(), stock()) and fr.stats.captures == 5
        assert torch.equal(run(), stock()) and fr.stats.captures == 5
    finally:
        apply_numerics_settings(first)


@pytest.mark.parametrize("builds", ["compile", "cuda_graphs"])
def test_numerics_flags_set_mid_generation_build_no_graph_under_the_old_flags(builds):
    # The reuse graph compiles, or is captured as a CUDA graph, at its first run, a step after the keyframe's.
    # A step callback that turned TF32 convolutions off in between had it built under the new flags and filed
    # under the generation's starting ones: later generations under those would replay the cuDNN kernels
    # picked without TF32. Such a graph is not built then; the rest of the generation runs the eager UNet.
    # (Which kernel gets picked shows on a GPU only; here the test checks when graphs are built.)
    from frdiff_compile.numerics import apply_numerics_settings, numerics_settings

    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    config = FRDiffConfig(keyframe_interval=2, score_mixing=False, compile=builds == "compile")
    fr, fresh = frdiff_compile.optimize(unet, config), frdiff_compile.optimize(unet, config)
    if builds == "cuda_graphs":  # CUDA graphs' capture-at-first-run discipline, on the CPU
        fr.graph_backend_override = fresh.graph_backend_override = "emulate"
    built = lambda: fr.stats.compiles if builds == "compile" else fr.stats.cudagraph_captures  # noqa: E731
    first = numerics_settings()

    def tf32_convolutions_off_after_the_keyframe(i, n, x, t):
        out = fr(x, t, **cond).sample
        torch.backends.cudnn.allow_tf32 = i != 0
        return out

    try:
        with pytest.warns(UserWarning, match="numerics flags .* changed during this generation"):
            sample(tf32_convolutions_off_after_the_keyframe, scheduler("sd15"), 4)
        assert built() == 1 and fr.stats.eager_calls == 3, fr.stats
        apply_numerics_settings(first)  # (`allow_tf32 = True` alone leaves fp32 precisions unlike the defaults)
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), 4)
        assert torch.equal(got, sample(optimized_fn(fresh, cond), scheduler("sd15"), 4))
        assert built() == 2 and fr.stats.reuse_calls == 2 and fr.stats.eager_calls == 3, fr.stats
    finally:
        apply_numerics_settings(first)


def test_flags_torch_sets_while_the_unet_is_traced_are_the_graphs_own(monkeypatch):
    # Seen on an H200: every first generation of a process ran the eager UNet (a "flags changed" warning) and
    # the next built everything again. By torch's source, on a Hopper GPU with cuDNN past 9.15 the first
    # attention dispatch of a process puts cuDNN first in the SDPA priority order, and in a fresh process that
    # dispatch is inside the runtime's first trace. Here the build changes the order.
    from frdiff_compile import unet as runtime_module
    from frdiff_compile.numerics import apply_numerics_settings, numerics_settings

    first = numerics_settings()
    order = dict(first["sdpa"]).get("priority")
    if order is None:
        pytest.skip("this torch has no SDPA priority order")
    build = runtime_module.build_entry

    def build_and_reorder(*args, **kwargs):
        entry = build(*args, **kwargs)
        torch._C._set_sdp_priority_order(list(reversed(order)))
        return entry

    monkeypatch.setattr(runtime_module, "build_entry", build_and_reorder)
    unet, cond = make_unet("sd15", layers_per_block=1), unet_inputs("sd15")
    config = FRDiffConfig(keyframe_interval=2, compile=False)
    fr, fresh = frdiff_compile.optimize(unet, config), frdiff_compile.optimize(unet, config)
    fr.graph_backend_override = fresh.graph_backend_override = "emulate"  # captured at first run, as on CUDA
    try:
        got = [sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS) for _ in range(2)]
        assert fr.stats.eager_calls == 0 and fr.stats.reuse_replays == fr.stats.reuse_calls > 0, fr.stats
        assert fr.stats.captures == 1 and fr.stats.cudagraph_captures == 2, fr.stats  # the second built nothing
        assert torch.equal(got[0], got[1])
        assert torch.equal(got[0], sample(optimized_fn(fresh, cond), scheduler("sd15"), STEPS))
    finally:
        apply_numerics_settings(first)


@pytest.mark.gpu
@pytest.mark.cpu_emulation
def test_tf32_set_between_generations_is_captured_anew():
    # A CUDA graph replays the cuBLAS and cuDNN kernels recorded at its capture: graphs captured with TF32
    # off would go on computing in full fp32 after the user turned it on. The graphs captured under TF32
    # must agree with the stock UNet under TF32 far better than those captured without it. (Emulated on
    # the CPU, where TF32 changes nothing, only the captures are checked.)
    from test_cuda_runtime import DEVICE, EMULATED, device_inputs, device_unet, trajectory

    from frdiff_compile.numerics import apply_numerics_settings, numerics_settings

    unet, cond = device_unet(torch.float32), device_inputs(torch.float32)
    # M=1, no compile: every step replays the captured keyframe graph, whose kernels are the stock UNet's.
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1, compile=False,
                                                    cuda_graphs=None if EMULATED else True))
    fr.graph_backend_override = "emulate" if EMULATED else None
    first = numerics_settings()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        full_fp32 = trajectory(fr, cond)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        tf32 = trajectory(fr, cond)
        expected = trajectory(unet, cond)
        assert fr.stats.captures == 2 and fr.stats.cudagraph_captures == 2, fr.stats
        assert fr.stats.full_replays == fr.stats.full_calls and fr.stats.cudagraph_fallbacks == 0, fr.stats
        if DEVICE == "cuda":
            kept, anew = max_rel_error(full_fp32, expected), max_rel_error(tf32, expected)
            assert kept > 0 and anew < kept / 10, f"TF32 graphs off stock by {anew:.2e}, fp32 ones by {kept:.2e}"
    finally:
        apply_numerics_settings(first)
