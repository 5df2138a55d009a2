"""The CUDA path (gpu-marked): compiled graphs replayed as CUDA graphs against the eager graphs on the GPU.

Run with `pytest -m gpu tests` on a CUDA machine (benchmarks/gpu_check.sh does). With FRDIFF_EMULATE_GPU=1
the tests marked `cpu_emulation` run on CPU instead (gpu_check.sh --dry-run): the graphs compiled by CPU
inductor and replayed through the "emulate" backend, which keeps the CUDA-graph buffer discipline. That
checks the tests' own logic before device time is spent; it says nothing of CUDA itself.

Every trajectory case shares one compiled runtime per dtype: the graphs do not depend on the schedule, so a
case only `reconfigure`s it, and each test asserts that its steps compiled and captured nothing new.
"""

import copy
import dataclasses
import os
import threading

import pytest
import torch
from conftest import generated_code, make_unet, max_rel_error, unet_inputs
from test_concurrency import SEEDS, in_threads, keyframes_run, recorded_kinds
from test_concurrency import STEPS as STEPS_IN_THREADS
from test_runtime import scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig

EMULATED = os.environ.get("FRDIFF_EMULATE_GPU") == "1"
DEVICE = "cpu" if EMULATED else "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.cpu_emulation]
cuda_only = pytest.mark.skipif(EMULATED, reason="checks the Triton kernel on CUDA itself; nothing to emulate")
no_sync_check = pytest.mark.skipif(EMULATED, reason="CUDA's sync debug mode has no CPU counterpart")
two_devices = pytest.mark.skipif(EMULATED, reason="moves the UNet between the GPU and the CPU; emulation has one")

STEPS = 12
# Relative to the largest latent of a DDIM trajectory. The eager graphs and inductor's fused kernels round
# differently; fp16 trajectories of a random tiny UNet amplify that over the steps.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 3e-2}


def device_unet(dtype, layers_per_block=1):
    return make_unet("sd15", layers_per_block=layers_per_block).to(DEVICE, dtype)


def device_inputs(dtype, batch=2):
    return {k: v.to(DEVICE, dtype) for k, v in unet_inputs("sd15", batch=batch).items()}


def compiled(unet, **config):
    """The runtime as users get it on CUDA: compiled graphs and CUDA graphs (emulated on CPU)."""
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=True if EMULATED else None, **config))
    if EMULATED:
        fr.graph_backend_override = "emulate"
    return fr


def use_schedule(fr, keyframe_interval=2, score_mixing=True):
    """Switch a shared runtime's schedule, keeping its compile and CUDA-graph settings (and its graphs)."""
    fr.reconfigure(dataclasses.replace(fr.frdiff_config, keyframe_interval=keyframe_interval,
                                       score_mixing=score_mixing))


def eager_graphs(unet, **config):
    return frdiff_compile.optimize(unet, FRDiffConfig(compile=False, cuda_graphs=False, **config))


@torch.no_grad()
def trajectory(fr, cond, steps=STEPS, batch=2, size=8, seed=0, keep=None, device=DEVICE):
    """DDIM over scheduler.timesteps on the device (the timestep is a view, as pipelines pass it)."""
    sched = scheduler("sd15")
    sched.set_timesteps(steps, device=device)
    dtype = next(iter(cond.values())).dtype
    x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    for t in sched.timesteps:
        out = fr(x, t, **cond).sample
        if keep is not None:
            keep.append((out, out.clone()))
        x = sched.step(out, t, x).prev_sample
    return x.float()


@pytest.fixture(scope="module")
def warm():
    """dtype -> (unet, cond, runtime) with both graphs compiled and captured (built on first request)."""
    runtimes = {}

    def get(dtype):
        if dtype not in runtimes:
            unet, cond = device_unet(dtype), device_inputs(dtype)
            fr = compiled(unet, keyframe_interval=2, score_mixing=False)
            trajectory(fr, cond, steps=2)  # a keyframe step, then a reuse step
            assert fr.stats.compiles == 2 and fr.stats.cudagraph_captures == 2, fr.stats
            runtimes[dtype] = unet, cond, fr
        return runtimes[dtype]

    return get


def assert_nothing_new(fr, before):
    """Since `before`: no compile, no capture, no fallback, and every graph call a replay."""
    new = fr.stats.since(before)
    changes = (new.compiles, new.recompiles, new.captures, new.cudagraph_captures, new.cudagraph_fallbacks)
    assert changes == (0,) * 5, new
    assert (new.full_replays, new.reuse_replays) == (new.full_calls, new.reuse_calls), new
    assert new.keyframes_discarded == 0, new  # nothing changed the module state between generations


# One test per case, so each result is named; a failure in one case does not hide the others.
@pytest.mark.parametrize("mixing", [True, False], ids=["mixing", "no-mixing"])
@pytest.mark.parametrize("interval", [1, 2, 3], ids=["M1", "M2", "M3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_graph_trajectories_match_the_eager_graphs(warm, dtype, interval, mixing):
    unet, cond, fr = warm(dtype)
    schedule = {"keyframe_interval": interval, "score_mixing": mixing}
    expected = trajectory(eager_graphs(unet, **schedule), cond)
    use_schedule(fr, **schedule)
    before = copy.copy(fr.stats)
    got = trajectory(fr, cond)
    err = max_rel_error(got, expected)
    assert err < TOLERANCE[dtype], f"{dtype} M={interval} mixing={mixing}: relative error {err:.2e}"
    assert_nothing_new(fr, before)
    assert fr.stats.full_calls - before.full_calls == len(range(0, STEPS, interval)), fr.stats


def test_fifty_steps_without_recompiles_and_outputs_never_overwritten(warm):
    _, cond, fr = warm(torch.float16)
    use_schedule(fr)
    before = copy.copy(fr.stats)
    kept = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        trajectory(fr, cond, steps=50, keep=kept)
        trajectory(fr, cond, steps=50, seed=1)
    assert_nothing_new(fr, before)
    assert fr.stats.full_calls - before.full_calls == 50, fr.stats
    assert all(torch.equal(out, saved) for out, saved in kept), "a later replay overwrote an output already returned"
    assert len({out.data_ptr() for out, _ in kept}) == len(kept)


def test_keyframe_graph_in_parts_compiled_by_workers_under_cuda_graphs(tmp_path, monkeypatch):
    # Empty cache folders (the workers inherit them): a hit can only be a worker's. The parts run inside
    # one CUDA-graph capture of the keyframe step.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    unet, cond = device_unet(torch.float16), device_inputs(torch.float16)
    expected = trajectory(eager_graphs(unet), cond)
    fr = compiled(unet, background_compile=True, keyframe_parts=3)
    got = trajectory(fr, cond)
    err = max_rel_error(got, expected)
    assert err < TOLERANCE[torch.float16], f"relative error {err:.2e}"
    assert len(fr.graph_entries()[0].keyframe.parts) == 3
    stats = fr.stats
    assert (stats.background_compiles, stats.background_failures) == (3, 0), stats
    assert (stats.compiles, stats.recompiles) == (2, 0), stats
    assert (stats.cudagraph_captures, stats.cudagraph_fallbacks) == (2, 0), stats
    assert (stats.full_replays, stats.reuse_replays) == (stats.full_calls, stats.reuse_calls), stats


class _NoSync:
    """Calls the runtime with CUDA's sync debug mode at "error": any host sync inside a step raises."""

    def __init__(self, fr) -> None:
        self.fr = fr

    def __call__(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return self.fr(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@no_sync_check
def test_steps_never_sync_the_host(warm):
    """A step only queues work: a sync would put the host's per-step time (bind, schedule, copies into the
    static inputs, replay, output clone) on the GPU's critical path. The scheduler, outside, may sync."""
    _, cond, fr = warm(torch.float16)
    use_schedule(fr)
    before = copy.copy(fr.stats)
    trajectory(_NoSync(fr), cond)  # a new generation: the module state is read in it too
    new = fr.stats.since(before)
    assert new.full_replays > 0 and new.reuse_replays > 0 and new.skip_steps > 0, new
    assert (new.keyframes_ahead, new.keyframes_discarded) == (1, 0), new  # the state read during a replay


def test_second_generation_at_another_resolution_and_batch(warm):
    unet, _, fr = warm(torch.float16)  # built for batch 2 at 8x8 latents
    use_schedule(fr)
    before = copy.copy(fr.stats)
    cond = device_inputs(torch.float16, batch=4)
    got = trajectory(fr, cond, batch=4, size=16)
    expected = trajectory(eager_graphs(unet), cond, batch=4, size=16)
    assert max_rel_error(got, expected) < TOLERANCE[torch.float16]
    new = fr.stats.since(before)
    assert new.captures == 1 and new.cudagraph_captures == 2, new
    assert new.recompiles == 0 and new.cudagraph_fallbacks == 0, new


def test_moved_parameters_keep_the_graphs_and_are_never_read_stale(warm):
    """A CUDA graph bakes parameter addresses: parameters in new storage of the same layout (a "safe" LoRA
    fuse, model CPU offload's round trip) must get new captures, with no export and no compile."""
    unet, cond, fr = warm(torch.float32)
    use_schedule(fr)
    trajectory(fr, cond)
    conv = unet.down_blocks[0].resnets[0].conv1
    conv.weight.data = conv.weight.data * 0.5  # the old storage is freed and may be reused by anything
    before = copy.copy(fr.stats)
    got = trajectory(fr, cond)
    assert max_rel_error(got, trajectory(eager_graphs(unet), cond)) < TOLERANCE[torch.float32]
    new = fr.stats.since(before)
    assert new.captures == 0 and new.compiles == 0 and new.relinks == 1 and new.cudagraph_captures == 2, new
    assert new.cudagraph_fallbacks == 0 and new.reuse_replays == new.reuse_calls > 0, new  # captured again
    # Offload moves the UNet off the device after a generation (here: to float64 on CPU, when emulated);
    # the graphs' buffers go with it, and come back empty with the UNet.
    away, home = (torch.float64, torch.float32) if EMULATED else ("cpu", DEVICE)
    before = copy.copy(fr.stats)
    fr.to(away)
    entries = fr.graph_entries()
    assert entries and all(e.slots == [] for e in entries)
    with torch.no_grad():
        conv.weight.mul_(2.0)  # changed while away: the graphs must read it on return
    fr.to(home)
    got = trajectory(fr, cond)
    assert max_rel_error(got, trajectory(eager_graphs(unet), cond)) < TOLERANCE[torch.float32]
    new = fr.stats.since(before)
    assert new.captures == 0 and new.compiles == 0 and new.relinks == 1 and new.cudagraph_captures == 2, new
    assert new.cudagraph_fallbacks == 0 and new.reuse_replays == new.reuse_calls > 0, new  # captured again


@pytest.mark.parametrize("layout", ["channels_last_unet", "conv_layout_inductor"])
def test_channels_last_convolutions_under_compile_and_cuda_graphs(layout):
    """The layout users pick for speed (the UNet converted), and inductor's pick on an NCHW UNet
    (`conv_layout="inductor"`, weights copied per call): neither may break the blend's operands."""
    unet = device_unet(torch.float16)
    if layout == "channels_last_unet":
        unet = unet.to(memory_format=torch.channels_last)
    cond = device_inputs(torch.float16)
    expected = trajectory(eager_graphs(unet), cond)
    fr = compiled(unet, **({"conv_layout": "inductor"} if layout == "conv_layout_inductor" else {}))
    got = trajectory(fr, cond)
    assert max_rel_error(got, expected) < TOLERANCE[torch.float16]
    s = fr.stats
    assert s.cudagraph_fallbacks == 0 and s.recompiles == 0 and s.reuse_replays == s.reuse_calls > 0, s


@cuda_only
def test_threads_on_their_own_streams_share_one_runtime(warm):
    """A server's request threads, each on a CUDA stream of its own, step through one runtime: each thread's
    trajectory is its own generation (the step lock), and no step's buffers are written by the next step's
    stream before the last one's work on them is done (the stream order)."""
    unet, cond, fr = warm(torch.float32)
    use_schedule(fr)
    before = copy.copy(fr.stats)
    with recorded_kinds(fr.graph_entries()[-1]) as kinds:
        got = in_threads([fr] * len(SEEDS), cond, own_streams=True)
    for k, seed in enumerate(SEEDS):
        mask = keyframes_run(kinds, k)
        expected = trajectory(eager_graphs(unet, keyframes=mask), cond, steps=len(mask), seed=seed)
        err = max_rel_error(got[k].float(), expected)
        assert err < TOLERANCE[torch.float32], f"thread {k}, keyframes {mask}: relative error {err:.2e}"
    assert_nothing_new(fr, before)


@cuda_only
@pytest.mark.skipif(EMULATED or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_unet_on_another_gpu_than_the_current_one():
    """A server with a pipeline per GPU drives cuda:1 from threads whose current device is cuda:0: captures
    made on cuda:0 would hold none of the UNet's kernels, and every replay would return the capture's output."""
    unet = make_unet("sd15", layers_per_block=1).to("cuda:1")
    cond = {k: v.to("cuda:1") for k, v in unet_inputs("sd15").items()}
    schedule = {"keyframe_interval": 2, "score_mixing": False}
    got = trajectory(compiled(unet, **schedule), cond, device="cuda:1")
    expected = trajectory(eager_graphs(unet, **schedule), cond, device="cuda:1")
    assert torch.cuda.current_device() == 0
    assert max_rel_error(got, expected) < TOLERANCE[torch.float32]


@cuda_only
def test_two_runtimes_capture_at_once_beside_a_syncing_thread():
    """Two runtimes over two UNets build and capture their graphs in two threads at once while a third thread
    keeps syncing the device (as another request's scheduler step does): each capture records on a stream
    of its own, not torch's one default capture stream, and forbids unsafe calls on its own thread only."""
    unets = [device_unet(torch.float32) for _ in range(2)]
    cond = device_inputs(torch.float32)
    runtimes = [frdiff_compile.optimize(unet, FRDiffConfig(compile=False)) for unet in unets]  # eager graphs
    stop, bystander_errors = threading.Event(), []

    def bystander():
        try:
            while not stop.is_set():
                torch.ones(1, device=DEVICE).item()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            bystander_errors.append(exc)

    syncing = threading.Thread(target=bystander)
    syncing.start()
    try:
        got = in_threads(runtimes, cond)
    finally:
        stop.set()
        syncing.join()
    assert not bystander_errors, bystander_errors[0]
    for k, (unet, fr) in enumerate(zip(unets, runtimes)):
        expected = trajectory(eager_graphs(unet), cond, steps=STEPS_IN_THREADS, seed=SEEDS[k])
        err = max_rel_error(got[k].float(), expected)
        assert err < TOLERANCE[torch.float32], f"runtime {k}: relative error {err:.2e}"
        assert fr.stats.cudagraph_captures == 2 and fr.stats.cudagraph_fallbacks == 0, fr.stats


@cuda_only
def test_reuse_graph_code_holds_the_triton_blend_kernel():
    """Inductor sees the Triton kernel itself (triton_op), not an opaque call, in the reuse graph only."""
    unet = device_unet(torch.float16)
    cond = device_inputs(torch.float16)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(cuda_graphs=False, score_mixing=False))
    _, codes = generated_code(trajectory, fr, cond, steps=2)  # a keyframe step, then a reuse step
    assert len(codes) == 2, f"expected the keyframe and reuse graphs' code, got {len(codes)} graphs"
    assert sorted("_blend_kernel" in code for code in codes) == [False, True]


# Last in the file: on the first H100 run it had not finished when the stage's time limit ended pytest
# (cause not known), so the tests before it report first.
@cuda_only
def test_reuse_graph_runs_the_triton_blend():
    unet = device_unet(torch.float16)
    cond = device_inputs(torch.float16)
    # Without CUDA graphs the profiler sees each kernel of the compiled reuse graph.
    fr = frdiff_compile.optimize(unet, FRDiffConfig(cuda_graphs=False, score_mixing=False))
    trajectory(fr, cond, steps=2)  # a keyframe step, then a reuse step: compiles both graphs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trajectory(fr, cond, steps=2)
    names = {e.name for e in prof.events()}
    assert any("blend" in n for n in names), sorted(names)[:40]
