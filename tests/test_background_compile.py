"""The graphs found in inductor's caches: compiled there by a worker process while the keyframe graph compiles
here, or loaded from torch's portable cache artifacts.

Each test points inductor at an empty cache folder (the worker inherits it), so a hit can only come from
the worker or the artifacts. CPU inductor: what is checked is the hand-over (cache keys agree, numerics,
failure paths). The time it saves is `benchmarks/bench_compile.py --variants default,background` (and
`--phases cold,portable`) to measure.
"""

import logging
import os
import sys
import tempfile

import pytest
import torch
import torch._inductor.config
from conftest import make_unet, max_rel_error, unet_inputs
from test_compile import _Toy
from test_runtime import optimized_fn, sample, scheduler
from torch._dynamo.utils import counters

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.background_compile import BackgroundCompile
from frdiff_compile.compiled_graph import CompiledGraph
from frdiff_compile.graph_cache import RuntimeStats

STEPS = 4


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where job folders go
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    counters.clear()
    return tmp_path


def cache_events() -> dict:
    return {k: v for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items() if "cache" in k}


def move_to_a_fresh_machine(empty_caches, monkeypatch):
    """README's cold-start recipe across machines: save the portable cache artifacts, point inductor at empty
    cache folders, and load the artifacts there, with the counters cleared. What was saved (its info)."""
    saved = torch.compiler.save_cache_artifacts()
    assert saved is not None
    artifacts, info = saved
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(empty_caches / "fresh" / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(empty_caches / "fresh" / "triton"))
    counters.clear()
    torch.compiler.load_cache_artifacts(artifacts)
    return info


@pytest.fixture
def threads_not_the_default():
    """A thread count a new process would not start with: CPU kernels are generated for it (the worker must
    take it from the job, or its cache keys differ)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if (os.cpu_count() or 1) > 1 else 2)
    yield
    torch.set_num_threads(threads)


def test_the_worker_compiles_the_reuse_graph_and_the_portable_artifacts_serve_both_graphs(
        empty_caches, threads_not_the_default, monkeypatch, caplog):
    """The reuse graph compiled by a worker, found in the caches here; then README's cold-start recipe: torch's
    portable caches, saved after that generation and loaded into empty cache folders (a fresh machine), serve
    both graphs, the one compiled here and the one the worker compiled (recorded here when found in the
    caches). The graphs go to inductor directly, not through torch.compile, so this holds only while the
    runtime compiles them as a cache user."""
    # One cross-attention block (both cache kinds): CPU inductor compiles both graphs while the worker runs.
    unet = make_unet("sd15", layers_per_block=1, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                     up_block_types=("CrossAttnUpBlock2D",))
    cond = unet_inputs("sd15")
    expected = sample(optimized_fn(frdiff_compile.optimize(unet, FRDiffConfig(compile=False)), cond),
                      scheduler("sd15"), STEPS)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=True, background_compile=True))
    with caplog.at_level(logging.INFO, logger="frdiff_compile"):
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    assert fr.stats.background_compiles == 1 and fr.stats.background_failures == 0, fr.stats
    # Keyframe graph: compiled here from scratch. Reuse graph: both caches hit, filled by the worker
    # (keyed on a timestep view at step 1 here, on a fresh aligned tensor there).
    events = cache_events()
    assert events.get("fxgraph_cache_miss") == 1 and events.get("fxgraph_cache_hit") == 1, events
    assert events.get("autograd_cache_hit") == 1, events
    assert fr.stats.compiles == 2 and fr.stats.recompiles == 0, fr.stats
    assert "background compile finished" in caplog.text
    assert max_rel_error(got, expected) < 1e-4
    # The job folder is gone once the worker was waited for.
    assert not list((empty_caches / "tmp").glob("frdiff_compile_job_*"))

    info = move_to_a_fresh_machine(empty_caches, monkeypatch)
    assert len(info.inductor_artifacts) >= 2 and len(info.aot_autograd_artifacts) >= 2, info
    fresh = frdiff_compile.optimize(unet, FRDiffConfig(compile=True))
    again = sample(optimized_fn(fresh, cond), scheduler("sd15"), STEPS)
    events = cache_events()
    assert events.get("fxgraph_cache_hit") == 2 and not events.get("fxgraph_cache_miss"), events
    assert events.get("autograd_cache_hit") == 2 and not events.get("autograd_cache_miss"), events
    assert fresh.stats.compiles == 2 and torch.equal(again, got)


def test_keyframe_parts_compiled_by_workers_and_their_artifacts_serve_a_fresh_cache(empty_caches, monkeypatch,
                                                                                     caplog):
    """The keyframe graph's parts after the first are compiled by workers; the portable cache artifacts saved
    after that generation hold every part, so the same config on empty cache folders finds all four graphs
    there (one test: the generation both halves need is most of its time)."""
    # Two cross-attention blocks, so the keyframe graph has room for a cut; three workers' results found.
    unet = make_unet("sd15", layers_per_block=1, block_out_channels=(32, 32),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    cond = unet_inputs("sd15")
    expected = sample(optimized_fn(frdiff_compile.optimize(unet, FRDiffConfig(compile=False)), cond),
                      scheduler("sd15"), STEPS)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=True, background_compile=True, keyframe_parts=3))
    with caplog.at_level(logging.INFO, logger="frdiff_compile"):
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    keyframe = fr.graph_entries()[0].keyframe
    assert len(keyframe.parts) == 3 and all(part.fn is not None for part in keyframe.parts)
    # Part 1 compiled here from scratch; parts 2 and 3 (fed by the parts before them, whose outputs the
    # workers knew only from the trace's metadata) and the reuse graph found in the caches.
    assert fr.stats.background_compiles == 3 and fr.stats.background_failures == 0, fr.stats
    events = cache_events()
    assert events.get("fxgraph_cache_miss") == 1 and events.get("fxgraph_cache_hit") == 3, events
    # The keyframe graph counts as one compile, whatever its parts.
    assert fr.stats.compiles == 2 and fr.stats.recompiles == 0, fr.stats
    assert max_rel_error(got, expected) < 1e-4
    # The three workers were started before the export and given their graphs after it.
    assert caplog.text.count("started ahead of its job") == 3, caplog.text
    assert caplog.text.count("handed to worker") == 3, caplog.text
    assert not list((empty_caches / "tmp").glob("frdiff_compile_job_*"))

    # The parts the workers compiled were recorded here when found in the caches, so the artifacts hold them.
    info = move_to_a_fresh_machine(empty_caches, monkeypatch)
    assert len(info.inductor_artifacts) >= 4 and len(info.aot_autograd_artifacts) >= 4, info
    fresh = frdiff_compile.optimize(unet, FRDiffConfig(compile=True, background_compile=True, keyframe_parts=3))
    again = sample(optimized_fn(fresh, cond), scheduler("sd15"), STEPS)
    events = cache_events()
    assert events.get("fxgraph_cache_hit") == 4 and not events.get("fxgraph_cache_miss"), events
    assert events.get("autograd_cache_hit") == 4 and not events.get("autograd_cache_miss"), events
    assert fresh.stats.compiles == 2 and fresh.stats.background_failures == 0, fresh.stats
    assert torch.equal(again, got)


def test_a_worker_started_ahead_and_never_given_a_job_is_stopped(empty_caches):
    worker = BackgroundCompile.spawn((torch.randn(2, 4),), [torch.nn.Parameter(torch.randn(4))])
    assert worker is not None and worker.process.poll() is None and worker.folder.is_dir()
    process, folder = worker.process, worker.folder
    worker.cancel()
    assert process.poll() is not None and not folder.exists()


def test_a_failing_worker_costs_a_compile_here_and_one_log_line(empty_caches, monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the worker exits 1 at once
    gm = torch.fx.symbolic_trace(_Toy())
    x = torch.randn(4, 8)
    stats = RuntimeStats()
    compiled = CompiledGraph(gm, None, stats, kind="reuse")
    compiled.background = BackgroundCompile.start(gm, (x,), {})
    with caplog.at_level(logging.WARNING, logger="frdiff_compile"), torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x))
        torch.testing.assert_close(compiled(x), gm(x))
    assert (stats.background_failures, stats.background_compiles, stats.compiles) == (1, 0, 1), stats
    failures = [r for r in caplog.records if "background compile" in r.getMessage()]
    assert len(failures) == 1 and "exited with status 1" in failures[0].getMessage(), caplog.text
    assert cache_events().get("fxgraph_cache_miss") == 1, cache_events()  # compiled here, from scratch
    assert not list((empty_caches / "tmp").glob("frdiff_compile_job_*"))


def test_no_worker_where_it_could_not_help(caplog):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    args = (torch.randn(2, 4),)
    with caplog.at_level(logging.INFO, logger="frdiff_compile"):
        with torch._inductor.config.patch(fx_graph_cache=False):
            assert BackgroundCompile.start(gm, args, {}) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert BackgroundCompile.start(gm, args, {}) is None
    assert "cache is off" in caplog.text and "autocast is on" in caplog.text


def test_dropping_a_worker_kills_it_and_removes_its_folder(tmp_path, monkeypatch):
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nsleep 60\n")
    sleeper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(sleeper))  # a worker that runs until killed
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    job = BackgroundCompile.start(gm, (torch.randn(2, 4),), {})
    assert job is not None
    process, folder = job.process, job.folder
    assert process.poll() is None and folder.is_dir()
    del job  # an entry dropped before its reuse graph ever ran
    assert process.poll() is not None and not folder.exists()


def test_config_field_is_validated():
    with pytest.raises(ValueError, match="background_compile must be True or False"):
        FRDiffConfig(background_compile="yes")
    assert FRDiffConfig.from_json(FRDiffConfig(background_compile=True).to_json()).background_compile
    with pytest.raises(ValueError, match="keyframe_parts=2 needs background_compile=True"):
        FRDiffConfig(keyframe_parts=2)
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="keyframe_parts must be"):
            FRDiffConfig(keyframe_parts=bad, background_compile=True)
    config = FRDiffConfig(background_compile=True, keyframe_parts=3)
    assert FRDiffConfig.from_json(config.to_json()) == config
