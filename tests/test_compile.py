"""Both graphs compiled by inductor (CPU): numerics against the eager graphs, two compilations, no dynamo."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import generated_code, make_unet, max_rel_error, needs_unet_method, unet_inputs
from test_runtime import optimized_fn, sample, scheduler
from torch import fx
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.compiled_graph import CompiledGraph
from frdiff_compile.graph_cache import RuntimeStats

STEPS = 12
BENCH_CODEGEN = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_codegen.py"


def test_compiled_graphs_match_eager_and_compile_once():
    # One layer per block keeps the CPU compile of both graphs to about a minute on 2 cores.
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    eager_fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=False))
    expected = sample(optimized_fn(eager_fr, cond), scheduler("sd15"), STEPS)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=True))
    counters.clear()
    got, codes = generated_code(sample, optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    # The graphs go to inductor directly: dynamo traces nothing, and each graph compiles exactly once.
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    assert fr.stats.compiles == 2 and fr.stats.recompiles == 0, fr.stats
    assert 0 < fr.stats.reuse_compile_seconds < fr.stats.compile_seconds, fr.stats
    # The reuse graph calls the blend op (on CPU the opaque custom op; inductor must not drop or decompose
    # it); the keyframe graph has no blend.
    assert len(codes) == 2 and sorted("torch.ops.frdiff.score_blend" in code for code in codes) == [False, True]
    # Compiled for the one signature each graph serves: no symbolic sizes (`ks0`, `s0`, ...) read at run time.
    # Through a shape environment without `ignore_shape_env`, every kernel was built for any shape (on an
    # H200 the reuse call took 0.47 of a keyframe call's time for 0.27 of its FLOPs).
    symbolic = [sorted(set(re.findall(r"\bk?s\d+\b", code))) for code in codes]
    assert symbolic == [[], []], symbolic
    # Every convolution reads its weight straight from the graph's arguments (`argN_1`): inductor's layout
    # optimization would copy each weight to channels_last at every call (1 GiB per SD 1.5 keyframe in fp16).
    weights = [re.findall(r"extern_kernels\.convolution\(\w+, (\w+),", code) for code in codes]
    assert all(weights) and all(re.fullmatch(r"arg\d+_1", w) for ws in weights for w in ws), weights
    assert fr.stats.reuse_calls > 1 and fr.stats.full_calls > 1, fr.stats
    err = max_rel_error(got, expected)
    assert err < 1e-4, f"compiled trajectory differs from eager graphs by {err:.2e} (relative, fp32, tiny sd15)"
    # A second generation with other noise and another step count: every weight value, nothing compiled.
    again = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS + 3, seed=7)
    assert fr.stats.compiles == 2 and counters["stats"]["unique_graphs"] == 0, fr.stats
    expected_again = sample(optimized_fn(eager_fr, cond), scheduler("sd15"), STEPS + 3, seed=7)
    assert max_rel_error(again, expected_again) < 1e-4
    # An offload-like round trip, weights changed while away: inductor's code takes the parameters as
    # call arguments, so it computes with the new storage and values, with nothing compiled again.
    fr.double()
    with torch.no_grad():
        unet.conv_in.weight.mul_(0.5)
    fr.float()
    moved = sample(optimized_fn(fr, cond), scheduler("sd15"), STEPS)
    assert fr.stats.compiles == 2 and fr.stats.captures == 1 and fr.stats.relinks == 1, fr.stats
    assert max_rel_error(moved, sample(optimized_fn(eager_fr, cond), scheduler("sd15"), STEPS)) < 1e-4


def test_inductors_conv_layout_matches_the_eager_graphs():
    # conv_layout="inductor": the graphs' convolutions run channels_last on copies of the weights, the cache
    # buffers and the blend keep the layouts the trace gave them (the runtime allocates them from the trace).
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    expected = sample(optimized_fn(frdiff_compile.optimize(unet, FRDiffConfig(compile=False)), cond),
                      scheduler("sd15"), 6)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=True, conv_layout="inductor"))
    got, codes = generated_code(sample, optimized_fn(fr, cond), scheduler("sd15"), 6)
    assert fr.stats.compiles == 2 and fr.stats.reuse_calls > 0, fr.stats
    weights = [re.findall(r"extern_kernels\.convolution\(\w+, (\w+),", code) for code in codes]
    # 3x3 weights are copied to channels_last; a 1x1 weight is channels_last as it is, and read where it lives.
    assert all(any(not re.fullmatch(r"arg\d+_1", w) for w in ws) for ws in weights), weights
    err = max_rel_error(got, expected)
    assert err < 1e-4, f"conv_layout='inductor' trajectory differs from eager graphs by {err:.2e} (fp32, tiny sd15)"


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight) + 1


@pytest.mark.parametrize("set_globally", [False, True], ids=["defaults", "freezing-and-cudagraphs-on"])
def test_only_modes_with_inductor_cuda_graphs_go_through_dynamo_and_all_use_the_caches(set_globally):
    # With inductor's `freezing` on (set for CPU inference), graphs compiled under it had the parameters
    # folded into constants: the in-place update below went unseen. The runtime's graphs never freeze, and
    # use inductor's CUDA graphs only where the mode asks for them, whatever the global settings say.
    import torch._inductor.config

    user_config = {"freezing": set_globally, "triton.cudagraphs": set_globally}
    gm = fx.symbolic_trace(_Toy())
    x = torch.randn(4, 8)
    for mode, dynamo_graphs in ((None, 0), ("max-autotune-no-cudagraphs", 0), ("reduce-overhead", 1)):
        stats = RuntimeStats()
        with torch._inductor.config.patch(user_config):
            compiled = CompiledGraph(gm, mode, stats)
        assert compiled.options["triton.cudagraphs"] == (mode == "reduce-overhead"), compiled.options
        counters.clear()
        with torch.no_grad(), torch._inductor.config.patch(user_config):
            for _ in range(3):
                torch.testing.assert_close(compiled(x), gm(x))
            gm.weight.mul_(2)  # parameters are read where they live, not baked in
            torch.testing.assert_close(compiled(x), gm(x))
        assert counters["stats"]["unique_graphs"] == dynamo_graphs, (mode, dict(counters["stats"]))
        # Inductor's on-disk caches serve the next process (a hit or a miss-and-store, never a bypass).
        caches = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
        assert not caches.get("fxgraph_cache_bypass") and sum(caches.values()) == 1, (mode, caches)
        assert (stats.compiles, stats.recompiles) == (1, 0) and stats.compile_seconds > 0, (mode, stats)


class _Convs(torch.nn.Module):
    def forward(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        conv = torch.nn.functional.conv2d
        return conv(torch.relu(conv(x, w1, padding=1)), w2, padding=1)


@pytest.mark.parametrize("conv_layout", ["traced", "inductor"])
def test_conv_layout_decides_whether_weights_reach_the_convolutions_as_they_are(conv_layout):
    # "traced": each convolution reads its weight argument where it lives. "inductor": inductor's layout
    # optimization runs them channels_last and copies the weights into new buffers at every call (CPU
    # inductor takes it for any convolution; on CUDA its heuristic picks, channels_last for SD in fp16).
    x, w1, w2 = torch.randn(2, 8, 16, 16), torch.randn(16, 8, 3, 3), torch.randn(8, 16, 3, 3)
    gm = make_fx(_Convs())(x, w1, w2)
    compiled = CompiledGraph(gm, None, RuntimeStats(), conv_layout=conv_layout)
    with torch.no_grad():
        out, codes = generated_code(compiled, x, w1, w2)
    torch.testing.assert_close(out, gm(x, w1, w2))
    weights = re.findall(r"extern_kernels\.convolution\(\w+, (\w+),", codes[0])
    assert len(weights) == 2 and all(re.fullmatch(r"arg[12]_1", w) for w in weights) == (conv_layout == "traced"), \
        weights


def test_a_failing_direct_compile_falls_back_to_torch_compile_with_one_warning(monkeypatch):
    from frdiff_compile import compiled_graph

    def broken(*args, **kwargs):  # inductor's entry point changed its API, say (torch.compile's still works)
        raise TypeError("compile_fx() got an unexpected keyword argument 'ignore_shape_env'")

    monkeypatch.setattr(compiled_graph, "compile_with_inductor", broken)
    gm = fx.symbolic_trace(_Toy())
    x = torch.randn(4, 8)
    stats = RuntimeStats()
    compiled = CompiledGraph(gm, None, stats)
    counters.clear()
    with pytest.warns(UserWarning, match="through torch.compile instead") as caught, torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), gm(x))
    ours = [w for w in caught if str(w.message).startswith("frdiff_compile")]  # not torch's own deprecations
    assert len(ours) == 1 and "unexpected keyword argument" in str(ours[0].message), [str(w.message) for w in ours]
    assert counters["stats"]["unique_graphs"] == 1 and (stats.compiles, stats.recompiles) == (1, 0), stats


def test_a_part_inductor_cannot_compile_sends_the_whole_graph_to_torch_compile(monkeypatch):
    from frdiff_compile import compiled_graph

    def broken(*args, **kwargs):
        raise TypeError("compile_fx() got an unexpected keyword argument 'ignore_shape_env'")

    x = torch.randn(4, 8)
    gm = make_fx(_Toy())(x)  # an ATen graph with the trace's values, which the split reads
    stats = RuntimeStats()
    compiled = CompiledGraph(gm, None, stats, parts=2)
    assert len(compiled.parts) == 2
    monkeypatch.setattr(compiled_graph, "compile_with_inductor", broken)
    counters.clear()
    with pytest.warns(UserWarning, match="through torch.compile instead") as caught, torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), gm(x))
    ours = [w for w in caught if str(w.message).startswith("frdiff_compile")]
    assert len(ours) == 1 and "unexpected keyword argument" in str(ours[0].message), [str(w.message) for w in ours]
    assert compiled.via_dynamo and counters["stats"]["unique_graphs"] == 1, counters["stats"]
    assert (stats.compiles, stats.recompiles) == (1, 0), stats


def test_an_outer_torch_compile_leaves_the_runtime_alone():
    """`pipe.unet = torch.compile(pipe.unet)` after optimize(): dynamo must not trace the host-side runtime.

    Traced, it broke the graph at every storage-metadata read and log call and compiled 13 fragments.
    """
    unet = make_unet("sd15")
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=False))
    expected = sample(optimized_fn(frdiff_compile.optimize(unet, FRDiffConfig(compile=False)), cond),
                      scheduler("sd15"), 6)
    wrapped = torch.compile(fr)
    counters.clear()
    got = sample(optimized_fn(wrapped, cond), scheduler("sd15"), 6)
    # The one break is dynamo skipping the disabled forward; nothing of the runtime is traced or compiled.
    breaks = dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 0 and all("disable" in k for k in breaks), breaks
    assert torch.equal(got, expected)
    assert fr.stats.reuse_calls > 0 and fr.stats.eager_calls == 0 and fr.stats.captures == 1, fr.stats


def test_an_outer_fullgraph_compile_says_what_to_do():
    """diffusers' docs compile the UNet with fullgraph=True, which cannot skip the runtime: the error says why."""
    fr = frdiff_compile.optimize(make_unet("sd15"), FRDiffConfig(compile=False))
    # Dynamo keys its frame cache on code objects: an earlier non-fullgraph compile of a runtime (another
    # test) would serve this call from that cache, without the error.
    torch._dynamo.reset()
    wrapped = torch.compile(fr, fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"(?s)frdiff_compile.*drop fullgraph=True"):
        sample(optimized_fn(wrapped, unet_inputs("sd15")), scheduler("sd15"), 2)
    assert fr.stats.generations == 0, fr.stats


@needs_unet_method("compile_repeated_blocks", "0.35")
def test_regional_compilation_of_the_unet_leaves_the_graphs_alone():
    """`pipe.unet.compile_repeated_blocks(...)` (diffusers' regional compilation), before or after optimize().

    After, the call reaches the wrapped UNet through attribute forwarding. Either way the export traces the
    blocks' own forward, so the graphs are the plain ones and dynamo compiles nothing.
    """
    cond = unet_inputs("sd15")
    expected = sample(optimized_fn(frdiff_compile.optimize(make_unet("sd15"), FRDiffConfig(compile=False)), cond),
                      scheduler("sd15"), 6)
    before = make_unet("sd15")
    before.compile_repeated_blocks(fullgraph=True)
    after = frdiff_compile.optimize(make_unet("sd15"), FRDiffConfig(compile=False))
    after.compile_repeated_blocks(fullgraph=True)
    for fr in (frdiff_compile.optimize(before, FRDiffConfig(compile=False)), after):
        counters.clear()
        got = sample(optimized_fn(fr, cond), scheduler("sd15"), 6)
        assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
        assert torch.equal(got, expected)
        assert fr.stats.reuse_calls > 0 and fr.stats.eager_calls == 0, fr.stats


def test_bench_codegen_stops_both_graphs_at_their_code_and_the_keyframe_parts(tmp_path):
    """benchmarks/bench_codegen.py times inductor's Python-side work (85 of the 97 s cold compile on the H200)
    without a GPU: both graphs through the Triton code generator, stopped before any kernel is built, as the
    library compiles them, and the keyframe graph's parts as `keyframe_parts` cuts it, each in a process of its
    own. Its "symbolic" shape mode (the path the library replaced, kept to compare with the H200 run of
    2026-11-28) is not run here: a process and ~25 s of the suite's time for a historical comparison."""
    out = tmp_path / "codegen.csv"
    result = subprocess.run([sys.executable, str(BENCH_CODEGEN), "--config", "tiny", "--latent", "8", "--dtype",
                             "float32", "--shapes", "static", "--keyframe-parts", "2", "--csv", str(out),
                             "--dump-code", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with out.open() as f:
        rows = {(r["shapes"], r["graph"]): r for r in csv.DictReader(f)}
    # --dump-code writes each graph's generated code, the code the row's kernels were counted in.
    code = (tmp_path / "cpu-triton_static_reuse.py").read_text()
    assert code.count("async_compile.triton(") == int(rows["static", "reuse"]["triton_kernels"]) > 0
    assert len(list(tmp_path.glob("cpu-triton_*.py"))) == 4  # both graphs, and the two parts
    parts = [rows.pop(("static", f"keyframe part {k}/2")) for k in (1, 2)]
    # Every op of the keyframe graph is in exactly one part, and each part is compiled to its code.
    assert sum(int(p["ops"]) for p in parts) == int(rows["static", "keyframe"]["ops"]), parts
    assert all(int(p["triton_kernels"]) > 0 and int(p["symbolic_sizes"]) == 0 for p in parts), parts
    assert set(rows) == {("static", "keyframe"), ("static", "reuse")}, rows
    for row in rows.values():
        assert int(row["triton_kernels"]) > 0 and float(row["codegen_s"]) > 0, row
        assert float(row["to_code_s"]) >= float(row["aot_s"]) > float(row["lowering_s"]) > 0, row
        assert int(row["symbolic_sizes"]) == 0, row  # static sizes: the code reads none at run time
    # The reuse graph is a part of the keyframe graph's work.
    assert int(rows["static", "reuse"]["triton_kernels"]) < int(rows["static", "keyframe"]["triton_kernels"])


def test_bench_codegen_cuda_stub_runs_inductors_cuda_paths_or_says_why_not(tmp_path):
    """`--backend cuda-stub` generates both graphs' CUDA code without a GPU on a CUDA build of torch (the GPU
    machine's torch 2.11 wheel, run on CPU); a CPU build of torch gets a clear refusal, not a wrong number."""
    out = tmp_path / "codegen.csv"
    result = subprocess.run([sys.executable, str(BENCH_CODEGEN), "--backend", "cuda-stub", "--config", "tiny",
                             "--latent", "8", "--csv", str(out), "--dump-code", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    if torch.cuda.is_available():
        assert result.returncode == 2 and "a GPU is present" in result.stderr, result.stderr[-2000:]
        return
    if torch.version.cuda is None:
        assert result.returncode == 2 and "is a CPU build" in result.stderr, result.stderr[-2000:]
        assert not out.exists()
        return
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with out.open() as f:
        rows = {r["graph"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"keyframe", "reuse"} and {r["backend"] for r in rows.values()} == {"cuda-stub"}, rows
    assert 0 < int(rows["reuse"]["triton_kernels"]) < int(rows["keyframe"]["triton_kernels"]), rows
    assert all(int(r["symbolic_sizes"]) == 0 and float(r["codegen_s"]) > 0 for r in rows.values()), rows
    # As the runtime builds it on CUDA, the reuse graph blends through the triton_op: its kernel is in the code.
    assert "_blend_kernel" in (tmp_path / "cuda-stub_static_reuse.py").read_text()
    # Attention stays one library call (CUDA's flash op, as a GPU's trace picks), not matmuls and a softmax.
    keyframe = (tmp_path / "cuda-stub_static_keyframe.py").read_text()
    assert "_scaled_dot_product_flash_attention" in keyframe and "extern_kernels.bmm" not in keyframe
