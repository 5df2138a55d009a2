"""CUDA-graph buffer discipline, checked on CPU through the "emulate" backend of `StaticGraph`.

The emulation keeps one static output that every replay overwrites, exactly as a captured CUDA graph does,
so a runtime that handed that buffer to the caller, or skipped copying an input into its static buffer,
fails here without a GPU. The real capture is covered by the gpu-marked tests in test_cuda_runtime.py.
"""

import warnings

import pytest
import torch
from conftest import make_unet, unet_inputs
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.cudagraphs import SharedPool, StaticGraph

STEPS = 12


def test_static_graph_copies_inputs_and_returns_fresh_outputs():
    scale = torch.tensor(2.0)
    graph = StaticGraph(lambda x, s: x * s, [scale], "emulate")
    x = torch.arange(6.0).reshape(2, 3)
    first = graph([x])
    x.add_(100)  # the caller reusing its tensor must not change what was already returned
    second = graph([torch.ones(2, 3)])
    scale.fill_(3.0)  # persistent tensors are read by reference at every replay
    third = graph([torch.ones(2, 3)])
    assert torch.equal(first, torch.arange(6.0).reshape(2, 3) * 2)
    assert torch.equal(second, torch.full((2, 3), 2.0)) and torch.equal(third, torch.full((2, 3), 3.0))
    assert len({first.data_ptr(), second.data_ptr(), third.data_ptr()}) == 3 and graph.replays == 3


def test_static_graph_keeps_the_example_layout():
    x = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
    graph = StaticGraph(lambda t: t.clone(memory_format=torch.preserve_format), [], "emulate")
    graph([x])
    assert graph._inputs[0].stride() == x.stride()
    with pytest.raises(ValueError, match="backend"):
        StaticGraph(lambda t: t, [], "cudagraph")


def test_shared_pool_gets_a_new_handle_once_no_graph_holds_the_old_one():
    """CUDA refuses a capture into a pool that still exists but that no live graph uses (after a move or a
    clear dropped every graph), so the handle is renewed then, and only then."""
    handles = iter(range(10))
    pool = SharedPool(new_handle=lambda: next(handles))
    graphs = [StaticGraph(lambda x: x, [], "emulate", pool) for _ in range(3)]
    first = pool.handle()
    pool.add(graphs[0])
    assert pool.handle() == first  # a graph captured into it lives: the pair's second graph shares it
    pool.add(graphs[1])
    del graphs[0]
    assert pool.handle() == first  # one is left
    del graphs[0]
    renewed = pool.handle()
    assert renewed != first
    pool.add(graphs[0])
    assert pool.handle() == renewed


@pytest.mark.parametrize("interval", [1, 2, 3])
def test_emulated_replays_reproduce_the_eager_graphs_and_never_alias(interval):
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    config = FRDiffConfig(keyframe_interval=interval)
    expected = sample(optimized_fn(frdiff_compile.optimize(unet, config), cond), scheduler("sd15"), STEPS)
    fr = frdiff_compile.optimize(unet, config)
    fr.graph_backend_override = "emulate"
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_outputs(i, n, x, t):
        out = fr(x, t, **cond).sample
        kept.append((out, out.clone()))  # PNDM and multistep DPM hold earlier outputs like this
        return out

    got = sample(keep_outputs, scheduler("sd15"), STEPS)
    assert torch.equal(got, expected), f"M={interval}: emulated replays differ by {(got - expected).abs().max()}"
    assert all(torch.equal(out, copy) for out, copy in kept), "a later step overwrote an output already returned"
    assert len({out.data_ptr() for out, _ in kept}) == STEPS, "two steps returned the same storage"
    stats = fr.stats
    assert stats.cudagraph_captures == (1 if interval == 1 else 2) and stats.cudagraph_fallbacks == 0, stats
    assert (stats.full_replays, stats.reuse_replays) == (stats.full_calls, stats.reuse_calls), stats


def test_second_signature_gets_its_own_static_buffers():
    unet = make_unet("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig())
    fr.graph_backend_override = "emulate"
    eager = frdiff_compile.optimize(unet, FRDiffConfig())
    for batch, size in ((2, 8), (4, 16), (2, 8)):
        cond = unet_inputs("sd15", batch=batch)
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), 6, batch=batch, size=size)
        expected = sample(optimized_fn(eager, cond), scheduler("sd15"), 6, batch=batch, size=size)
        assert torch.equal(got, expected), (batch, size)
    assert fr.stats.captures == 2 and fr.stats.cudagraph_captures == 4, fr.stats


def test_offload_round_trips_keep_the_graphs_and_capture_again():
    """Model CPU offload: the UNet leaves the device after every generation and comes back at new addresses."""
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    fr.graph_backend_override = "emulate"
    eager = frdiff_compile.optimize(unet)
    run = lambda runtime: sample(optimized_fn(runtime, cond), scheduler("sd15"), 6)  # noqa: E731
    run(fr)
    for trip in range(2):
        fr.double()  # stands in for .to("cpu"): out of the layout the graphs were built for
        (entry,) = fr.graph_entries()
        assert entry.slots == []
        fr.float()
        assert torch.equal(run(fr), run(eager)), trip
    s = fr.stats
    assert s.captures == 1 and s.relinks == 2 and s.cudagraph_captures == 6, s


def test_graphs_compiled_through_dynamo_are_rebuilt_after_a_move_not_relinked():
    """torch.compile (compile_mode="reduce-overhead") guarded and captured its graphs over the old tensors."""
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    run = lambda runtime: sample(optimized_fn(runtime, cond), scheduler("sd15"), 4)  # noqa: E731
    run(fr)
    (entry,) = fr.graph_entries()
    entry.reuse.via_dynamo = True  # what CompiledGraph says of such a graph, without its slow compile
    fr.double()
    fr.float()
    assert fr.graph_entries() == []
    assert torch.equal(run(fr), run(frdiff_compile.optimize(unet))) and fr.stats.captures == 2, fr.stats


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA graph capture cannot start")
def test_failed_capture_falls_back_with_one_warning():
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    expected = sample(optimized_fn(frdiff_compile.optimize(unet), cond), scheduler("sd15"), STEPS)
    fr = frdiff_compile.optimize(unet)
    fr.graph_backend_override = "cuda"  # CPU tensors: creating the capture stream fails
    with pytest.warns(UserWarning, match="CUDA graph capture failed") as record:
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    assert len([w for w in record if "CUDA graph" in str(w.message)]) == 1
    assert torch.equal(got, expected)
    assert fr.stats.cudagraph_fallbacks == 1 and fr.stats.full_replays == fr.stats.reuse_replays == 0, fr.stats
    fr.double()
    fr.float()  # buffers made again after a move must not try the failed capture again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS), expected)
    assert fr.stats.cudagraph_fallbacks == 1 and fr.stats.relinks == 1, fr.stats


def test_cuda_graph_settings_are_checked():
    with pytest.raises(ValueError, match="reduce-overhead.*max-autotune-no-cudagraphs"):
        FRDiffConfig(compile_mode="reduce-overhead")
    FRDiffConfig(compile_mode="reduce-overhead", cuda_graphs=False)  # inductor's own CUDA graphs instead
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        FRDiffConfig(cuda_graphs="yes")
    unet = make_unet("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(cuda_graphs=True))
    fr.reset(num_inference_steps=2)
    with pytest.raises(ValueError, match="cuda_graphs=True but the UNet's inputs are on cpu"):
        fr(torch.randn(2, 4, 8, 8), torch.tensor(999), **unet_inputs("sd15"))


def test_a_two_step_generation_warms_both_graphs_for_every_step_count():
    """README's warm-up recipe: step 0 is a keyframe and step 1 a reuse step (lambda = 0.5 at i/N = b), so
    one 2-step generation captures both graphs, and a longer generation at that shape captures nothing."""
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    for interval in (2, 3):
        fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=interval))
        fr.graph_backend_override = "emulate"
        sample(optimized_fn(fr, cond), scheduler("sd15"), 2)
        assert (fr.stats.full_calls, fr.stats.reuse_calls, fr.stats.cudagraph_captures) == (1, 1, 2), fr.stats
        sample(optimized_fn(fr, cond), scheduler("sd15"), 50)
        assert fr.stats.cudagraph_captures == 2 and fr.stats.captures == 1, fr.stats
