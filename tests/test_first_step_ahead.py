"""A generation's first step replayed before the module state is read (`FRDiffUNet._first_step_ahead`).

On a GPU the replay runs while the host reads the module state, which kept the device waiting at every
generation's start (from the call to the launch, 4.2 to 4.7 ms for the SD 1.5 config and 12.8 ms for SDXL on
the CPU machine, `benchmarks/bench_host.py`). Checked here on CPU through the "emulate" CUDA-graph backend:
the replay comes first, the steps compute what they did before, and a module state that changed between
generations never lets the dropped replay's output or caches through.
"""

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_unet, unet_inputs
from diffusers.models.attention_processor import AttnProcessor
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
import frdiff_compile.unet as runtime_module
from frdiff_compile import FRDiffConfig

STEPS = 6


def emulated(unet, **config):
    fr = frdiff_compile.optimize(unet, FRDiffConfig(**config))
    fr.graph_backend_override = "emulate"
    return fr


def test_later_generations_replay_their_first_step_before_reading_the_module_state(monkeypatch):
    unet, cond = make_unet("sd15"), unet_inputs("sd15")
    fr = emulated(unet, keyframe_interval=2)
    reference = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=2))  # eager graphs, no replays
    expected = [sample(optimized_fn(reference, cond), scheduler("sd15"), STEPS, seed=seed) for seed in range(3)]
    replays_at_snapshot = []
    snapshot = runtime_module.module_snapshot

    def recording(*args, **kwargs):
        entries = fr.graph_entries()
        replays_at_snapshot.append(entries[0].slots[0].static_keyframe.replays if entries else None)
        return snapshot(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "module_snapshot", recording)
    for seed in range(3):
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS, seed=seed)
        assert torch.equal(got, expected[seed]), f"generation {seed}: max diff {(got - expected[seed]).abs().max()}"
    s = fr.stats
    assert (s.keyframes_ahead, s.keyframes_discarded, s.generations) == (2, 0, 3), s
    assert (s.full_replays, s.reuse_replays) == (s.full_calls, s.reuse_calls), s
    # The first generation read the state before building anything; each later one after its replay (3
    # keyframes a generation at M=2 over 6 steps, so the replay count read then is 3 and 6, plus the first).
    assert replays_at_snapshot == [None, 4, 7], replays_at_snapshot


def _freeu(unet):
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


def _processor(unet):
    unet.set_attn_processor(AttnProcessor())  # same math, new objects: other graphs


def _replaced_parameter(unet):
    unet.conv_in.weight = torch.nn.Parameter(unet.conv_in.weight.detach() * 1.5)


def _numerics_flag(unet):
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark  # in the fingerprint; no CPU effect


CHANGES = {"freeu": _freeu, "processor": _processor, "replaced-parameter": _replaced_parameter,
           "numerics-flag": _numerics_flag}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_module_change_between_generations_drops_the_replay(change):
    unet, cond = make_unet("sd15"), unet_inputs("sd15")
    fr = emulated(unet, keyframe_interval=1)  # every step a keyframe: the stock UNet is the expected result
    stock = lambda i, n, x, t: unet(x, t, **cond).sample  # noqa: E731
    flags = torch.backends.cudnn.benchmark
    try:
        assert torch.equal(sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS),
                           sample(stock, scheduler("sd15"), STEPS))
        CHANGES[change](unet)
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
        expected = sample(stock, scheduler("sd15"), STEPS)
    finally:
        torch.backends.cudnn.benchmark = flags
    assert torch.equal(got, expected), f"{change}: max diff {(got - expected).abs().max()}"
    s = fr.stats
    # A replaced Parameter too: the replay reads the old one (alive, at its address), the fingerprint drops it.
    assert (s.keyframes_ahead, s.keyframes_discarded, s.eager_calls) == (1, 1, 0), s
    assert s.full_replays == s.full_calls == 2 * STEPS, s  # the dropped replay served no step


def test_a_state_that_changes_every_generation_is_read_first_until_it_settles():
    """A server switching adapters (here FreeU) per request would drop a replay at every generation: after a
    change the first step waits for the read, and is replayed ahead again once a read finds no change."""
    unet, cond = make_unet("sd15"), unet_inputs("sd15")
    fr = emulated(unet, keyframe_interval=1)
    stock = lambda i, n, x, t: unet(x, t, **cond).sample  # noqa: E731
    seen = []
    for freeu in (False, False, True, False, True, True, True):  # generation by generation
        if freeu:
            _freeu(unet)
        else:
            unet.disable_freeu()
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
        assert torch.equal(got, sample(stock, scheduler("sd15"), STEPS)), f"after {len(seen)} generations"
        seen.append((fr.stats.keyframes_ahead, fr.stats.keyframes_discarded))
    # 1: built. 2: ahead. 3: changed, dropped. 4: changed, read first. 5: changed, read first. 6: unchanged,
    # read first. 7: ahead.
    assert seen == [(0, 0), (1, 0), (2, 1), (2, 1), (2, 1), (2, 1), (3, 1)], seen
    assert fr.stats.full_replays == fr.stats.full_calls == 7 * STEPS, fr.stats


def test_hooks_attached_between_generations_run_the_eager_unet_from_the_first_step():
    unet, cond = make_unet("sd15"), unet_inputs("sd15")
    fr = emulated(unet, keyframe_interval=2)
    sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    handle = unet.mid_block.register_forward_hook(lambda module, args, out: out * 2)
    expected = sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
        assert torch.equal(got, expected), f"max diff {(got - expected).abs().max()}"
        s = fr.stats
        assert (s.keyframes_ahead, s.keyframes_discarded, s.eager_calls) == (1, 1, STEPS), s
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)  # still hooked: nothing replayed ahead
        assert torch.equal(got, expected) and fr.stats.keyframes_ahead == 1, fr.stats
    handle.remove()


def test_tensors_at_new_addresses_are_never_replayed_ahead():
    """A `.data` swap (no `.to()` sees it) leaves a captured graph reading the old addresses: the addresses
    are compared before any replay, and the graphs get new buffers and captures first."""
    unet, cond = make_unet("sd15"), unet_inputs("sd15")
    fr = emulated(unet, keyframe_interval=2)
    reference = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=2))
    sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    with torch.no_grad():
        unet.conv_in.weight.data = unet.conv_in.weight.data * 0.5  # new storage, same layout
    got = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    expected = sample(optimized_fn(reference, cond), scheduler("sd15"), STEPS)
    assert torch.equal(got, expected), f"max diff {(got - expected).abs().max()}"
    s = fr.stats
    assert (s.keyframes_ahead, s.relinks, s.cudagraph_captures) == (0, 1, 4), s


def test_a_slot_replayed_ahead_holds_nothing_until_committed():
    unet, cond = make_unet("sd15"), unet_inputs("sd15")
    fr = emulated(unet, keyframe_interval=2)
    sample(optimized_fn(fr, cond), scheduler("sd15"), 2)  # built, and both graphs captured
    sched = scheduler("sd15")
    sched.set_timesteps(2)
    entry, tensors = fr.prepare(torch.randn(2, 4, 8, 8), sched.timesteps[0], **cond)  # the same signature
    assert entry.replays_full() and not entry.replays_full(slot=1) and entry.holds(fr.stats.generations, 0)
    entry.replay_full_ahead(tensors, step=0)
    assert not any(entry.holds(generation, 0) for generation in range(5))  # numbered from 1
    entry.commit_full(7, step=0)
    assert entry.holds(7, 0) and not entry.holds(7, 1)


def test_bench_host_times_every_step_kind_with_the_first_steps_replayed_ahead(tmp_path):
    out = tmp_path / "host.csv"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_host.py"
    result = subprocess.run([sys.executable, str(script), "--config", "tiny", "--steps", "6", "--generations", "3",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row["path"], row["item"]): row for row in csv.DictReader(out.open())}
    kinds = ("first step", "keyframe", "reuse", "skip")
    paths = ("runtime", "graphs called directly")
    assert set(rows) == {(p, k) for p in paths for k in kinds} | {("", "module_snapshot"), ("", "tensor_addresses")}
    first = rows["runtime", "first step"]
    assert first["calls"] == "3" and first["note"].startswith("3 of 3 first steps"), first
    assert all(float(rows[p, k]["to_launch_us"]) > 0 for p in paths for k in kinds[:3]), rows
    assert all(rows[p, "skip"]["to_launch_us"] == "" for p in paths), rows  # a skip step launches no graph
    assert float(rows["", "module_snapshot"]["call_us"]) > 0, rows
