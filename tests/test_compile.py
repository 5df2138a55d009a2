"""Both graphs under torch.compile (CPU inductor): numerics against the eager graphs, zero recompiles."""

import torch
import torch._dynamo
from conftest import generated_code, make_unet, max_rel_error, unet_inputs
from test_runtime import optimized_fn, sample, scheduler
from torch._dynamo.utils import counters

import frdiff_compile
from frdiff_compile import FRDiffConfig

STEPS = 12


def test_compiled_graphs_match_eager_with_zero_recompiles():
    # One layer per block keeps the CPU compile of both graphs to about a minute on 2 cores.
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    eager_fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=False))
    expected = sample(optimized_fn(eager_fr, cond), scheduler("sd15"), STEPS)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=True))
    counters.clear()
    got, codes = generated_code(sample, optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # keyframe + reuse, nothing else
    # The reuse graph calls the blend op (on CPU the opaque custom op; inductor must not drop or decompose
    # it); the keyframe graph has no blend.
    assert len(codes) == 2 and sorted("torch.ops.frdiff.score_blend" in code for code in codes) == [False, True]
    assert fr.stats.reuse_calls > 1 and fr.stats.full_calls > 1, fr.stats
    err = max_rel_error(got, expected)
    assert err < 1e-4, f"compiled trajectory differs from eager graphs by {err:.2e} (relative, fp32, tiny sd15)"
    # A second generation with other noise and another step count: every weight value, no recompile.
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS + 3, seed=7)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    expected_again = sample(optimized_fn(eager_fr, cond), scheduler("sd15"), STEPS + 3, seed=7)
    assert max_rel_error(again, expected_again) < 1e-4
