"""Capture -> plan -> build on tiny SD 1.5 / SD 2 / SDXL UNets, and the full SD 1.5 structure on meta."""

import sys
from pathlib import Path

import torch
from conftest import make_unet, unet_inputs
from diffusers import UNet2DConditionModel
from torch.fx.experimental.proxy_tensor import make_fx

from frdiff_compile.passes import CallLayout, build_graphs, capture, plan_cache_points
from frdiff_compile.passes.plan import RESNET_CONV1, TRANSFORMER_DELTA, CachePoint, Plan, alias_args, canonical_path
from frdiff_compile.passes.split import split_graph

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_flops import counted, frdiff_sample_independent, frdiff_skipped  # noqa: E402
from bench_offpath import conv2_shapes  # noqa: E402
from bench_offpath import gflop as offpath_gflop  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def _build(unet, kwargs):
    layout, tensors = CallLayout.from_call(kwargs)
    captured = capture(unet, layout, tensors)
    plan = plan_cache_points(captured.graph_module, unet)
    return captured, plan, build_graphs(captured.graph_module, plan), tensors


def _buffers(plan, out_like):
    return [torch.full(p.shape, float("nan"), dtype=p.dtype) for p in plan.points], torch.full_like(out_like, float("nan"))


def test_each_input_layout_gets_its_own_signature():
    # Compiled graphs assert their inputs' strides, so a layout the graphs were not built for must not find
    # them: contiguous, channels_last and a transposed view are three signatures.
    cond = unet_inputs("sd15")
    x = torch.randn(2, 4, 8, 8)
    samples = [x, x.to(memory_format=torch.channels_last), x.transpose(2, 3)]
    signatures = [CallLayout.from_call(dict(sample=s, timestep=torch.tensor(500), **cond))[0].signature for s in samples]
    assert len(set(signatures)) == 3
    # Strides of size-1 dimensions matter to neither: one channel, contiguous or channels_last, is one layout.
    one = torch.randn(2, 1, 8, 8)
    pair = [CallLayout.from_call(dict(sample=s, timestep=torch.tensor(500), **cond))[0] for s in (one, one.to(
        memory_format=torch.channels_last))]
    assert pair[0].signature == pair[1].signature


@torch.no_grad()
def test_keyframe_equals_unet_and_reuse_reproduces_it(kind):
    unet = make_unet(kind)
    kwargs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500), **unet_inputs(kind))
    captured, plan, pair, tensors = _build(unet, kwargs)
    expected = unet(**kwargs).sample
    caches, keyframe_out = _buffers(plan, expected)
    out = pair.keyframe(*tensors, *caches, keyframe_out)
    assert torch.equal(out, expected), f"{kind}: keyframe graph differs from the UNet by {(out - expected).abs().max()}"
    assert torch.equal(keyframe_out, expected), f"{kind}: keyframe_out buffer not written"
    assert all(torch.isfinite(c).all() for c in caches), f"{kind}: a cache buffer was not written"
    assert out.data_ptr() != keyframe_out.data_ptr(), "keyframe output aliases the keyframe_out buffer"
    weight = torch.tensor(1.0)
    reused = pair.reuse(*tensors, *caches, keyframe_out, weight)
    assert torch.equal(reused, expected), f"{kind}: reuse graph fed the keyframe inputs differs by {(reused - expected).abs().max()}"
    # weight 0 gives back the keyframe output exactly, weight 0.5 the midpoint; the output is never a buffer.
    other = pair.reuse(kwargs["sample"] * 0.5, *tensors[1:], *caches, keyframe_out, torch.tensor(0.0))
    assert torch.equal(other, expected) and other.data_ptr() != keyframe_out.data_ptr()
    # Only torch ops (and builtins such as getitem): AOTAutograd's cache bypasses a graph that calls a Python
    # function, so every new process would trace it again.
    for graph in (pair.keyframe.graph, pair.reuse.graph):
        targets = {n.target for n in graph.nodes if n.op == "call_function"}
        others = {t for t in targets
                  if not isinstance(t, torch._ops.OpOverload) and type(t).__name__ != "builtin_function_or_method"}
        assert not others, f"{kind}: graph calls {others}"


@torch.no_grad()
def test_keyframe_graph_in_parts_computes_what_it_computes_whole(kind):
    unet = make_unet(kind)
    kwargs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500), **unet_inputs(kind))
    _, plan, pair, tensors = _build(unet, kwargs)
    caches, keyframe_out = _buffers(plan, unet(**kwargs).sample)
    expected = pair.keyframe(*tensors, *caches, keyframe_out)
    total = sum(n.op == "call_function" for n in pair.keyframe.graph.nodes)
    for parts in (2, 3, 4):
        split = split_graph(pair.keyframe, parts)
        assert len(split) == parts, f"{kind}: {parts} parts asked, {len(split)} made"
        sizes = [sum(n.op == "call_function" for n in part.gm.graph.nodes) for part in split.parts]
        assert max(sizes) < 1.6 * total / parts, f"{kind}: unbalanced parts {sizes}"
        got_caches, got_out = _buffers(plan, expected)
        got = split.run([part.gm for part in split.parts], (*tensors, *got_caches, got_out))
        assert torch.equal(got, expected) and torch.equal(got_out, keyframe_out), f"{kind}, {parts} parts"
        assert all(torch.equal(a, b) for a, b in zip(got_caches, caches)), f"{kind}, {parts} parts: a cache differs"
        params = {id(p) for p in unet.parameters()}
        assert all(id(p) in params for part in split.parts for p in part.gm.parameters()), "a weight was copied"


def test_a_cut_never_separates_a_tensor_from_a_write_into_it():
    # The buffer is made first and written in the middle; a balanced cut would fall between them, and the
    # part that writes would get it as an input that its compile could take for unaliased.
    def fn(x):
        buffer = torch.zeros(4, 8)
        y = x
        for _ in range(12):
            y = torch.sin(y) * 1.5
        buffer.add_(y)
        out = buffer.view(-1)
        for _ in range(12):
            out = torch.cos(out) * 0.5
        return out

    x = torch.randn(4, 8)
    gm = make_fx(fn)(x)
    for parts in (2, 3):
        split = split_graph(gm, parts)
        assert torch.equal(split.run([p.gm for p in split.parts], (x,)), gm(x))
        for part in split.parts:
            inputs = set(part.gm.graph.find_nodes(op="placeholder"))
            for node in part.gm.graph.nodes:
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                    assert not set(alias_args(node)[0]) & inputs, f"{node} writes into an input of its part"
        # A cut still happens where one may: after the write.
        assert len(split) > 1


def test_plan_counts_and_report(kind):
    unet = make_unet(kind)
    kwargs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(10), **unet_inputs(kind))
    _, plan, pair, _ = _build(unet, kwargs)
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    n_resnets = sum(isinstance(m, ResnetBlock2D) for m in unet.modules())
    n_transformers = sum(isinstance(m, Transformer2DModel) for m in unet.modules())
    assert plan.count(RESNET_CONV1) == n_resnets and plan.count(TRANSFORMER_DELTA) == n_transformers, str(plan)
    assert not plan.skipped, str(plan)
    report = pair.report
    assert report.cache_points == n_resnets + n_transformers
    assert report.reuse["attention"] == 0 and report.keyframe["attention"] > 0, str(report)
    # every ResNet's conv1 is gone from the reuse graph; SD 1.5-style proj_in/proj_out convs go with them
    assert report.keyframe["conv"] - report.reuse["conv"] >= n_resnets, str(report)
    assert report.removed.get("GroupNorm", 0) >= n_resnets, str(report)
    text = str(plan)
    assert "MiB" in text and f"{len(plan.points)} cache points" in text


@torch.no_grad()
def test_a_module_shared_across_the_unet_leaves_no_cache_point_behind():
    """diffusers 0.30 to 0.32 give every resnet and the time embedding one shared SiLU instance. A module held
    under two names makes non-strict export record the path each module was reached by, so the mid block's
    loop over `self.resnets[1:]` traced its second resnet as "resnets.slice(1, None, None).0", and the planner
    skipped it (and warned): its conv1 ran at every reuse step. The shared SiLU is built here by hand."""
    unet = make_unet("sd15")
    shared = torch.nn.SiLU()
    unet.conv_act = unet.time_embedding.act = shared
    for module in unet.modules():
        if hasattr(module, "nonlinearity"):
            module.nonlinearity = shared
    kwargs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500), **unet_inputs("sd15"))
    captured, plan, pair, tensors = _build(unet, kwargs)
    assert not plan.skipped and "mid_block.resnets.1" in {p.module for p in plan.points}, str(plan)
    paths = {path for n in captured.graph_module.graph.nodes for path, _ in n.meta.get("nn_module_stack", {}).values()}
    assert any(".slice(1, None, None)." in path for path in paths), "the trace no longer names sliced lists so"
    expected = unet(**kwargs).sample
    caches, keyframe_out = _buffers(plan, expected)
    assert torch.equal(pair.keyframe(*tensors, *caches, keyframe_out), expected)
    assert torch.equal(pair.reuse(*tensors, *caches, keyframe_out, torch.tensor(1.0)), expected)


def test_canonical_path_names_sliced_list_items_by_their_place():
    assert canonical_path("unet.mid_block.resnets.slice(1, None, None).0.conv1") == "unet.mid_block.resnets.1.conv1"
    assert canonical_path("a.slice(1, None, None).slice(1, None, None).0") == "a.2"  # [1:][1:][0]
    assert canonical_path("a.slice(None, -1, None).1.b") == "a.1.b" and canonical_path("a.slice(2, 9, 3).1") == "a.5"
    # Negative starts and steps need the list's length: left as they are (the module is then reported skipped).
    assert canonical_path("a.slice(-2, None, None).0") == "a.slice(-2, None, None).0"
    assert canonical_path("a.slice(None, None, -1).0") == "a.slice(None, None, -1).0"
    assert canonical_path("down_blocks.1.resnets.10") == "down_blocks.1.resnets.10"


@torch.no_grad()
def test_reuse_graph_does_the_full_calls_flops_less_the_cached_modules(kind):
    """The speed claim counted: the keyframe graph does the UNet's matmul and conv FLOPs exactly, the reuse
    graph exactly those less every resnet's conv1 and every transformer, as benchmarks/bench_flops.py reports
    them at full size. Nothing cached is computed again, nothing that must be recomputed is dropped."""
    unet = make_unet(kind)
    kwargs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500), **unet_inputs(kind))
    _, plan, pair, tensors = _build(unet, kwargs)
    stock = counted(lambda: unet(**kwargs))
    caches, keyframe_out = _buffers(plan, kwargs["sample"])
    assert counted(lambda: pair.keyframe(*tensors, *caches, keyframe_out))["Global"] == stock["Global"]
    reuse = counted(lambda: pair.reuse(*tensors, *caches, keyframe_out, torch.tensor(0.5)))["Global"]
    cached = frdiff_skipped(unet, stock)
    assert 0 < cached < stock["Global"] and reuse == stock["Global"] - cached, (kind, stock["Global"], cached, reuse)


class _FlopsBySample(torch.fx.Interpreter):
    """Runs a graph and counts each node's FLOPs as on or off the path from its first input (the sample)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        # The first placeholder: CallLayout puts the sample first.
        self.on_path = {next(iter(gm.graph.find_nodes(op="placeholder")))}
        self.flops = {True: 0, False: 0}
        self.convolutions_off_path = 0

    def run_node(self, n: torch.fx.Node):
        if any(a in self.on_path for a in n.all_input_nodes):
            self.on_path.add(n)
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.flops[n in self.on_path] += counter.get_total_flops()
        if n not in self.on_path and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default):
            self.convolutions_off_path += counter.get_total_flops()
        return out


@torch.no_grad()
def test_reuse_flops_off_the_samples_path_are_the_resnets_second_convs_and_the_embeddings(kind):
    """bench_flops.py's split of the reuse call, checked on the graph itself: what never reads the sample is
    every resnet's time_emb_proj and conv2 and the time (and added) embeddings; the rest is on its path."""
    unet = make_unet(kind)
    kwargs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500), **unet_inputs(kind))
    _, plan, pair, tensors = _build(unet, kwargs)
    stock = counted(lambda: unet(**kwargs))
    caches, keyframe_out = _buffers(plan, kwargs["sample"])
    pair.keyframe(*tensors, *caches, keyframe_out)
    split = _FlopsBySample(pair.reuse)
    split.run(*tensors, *caches, keyframe_out, torch.tensor(0.5))
    independent = frdiff_sample_independent(unet, stock)
    assert split.flops[False] == independent > 0, (kind, split.flops, independent)
    assert split.flops[True] == stock["Global"] - frdiff_skipped(unet, stock) - independent > 0, (kind, split.flops)
    # bench_offpath.py times every resnet's conv2 as the reuse call's convolutions off the path: exactly those.
    shapes = conv2_shapes(unet, kwargs)
    assert split.convolutions_off_path == round(sum(offpath_gflop(x, w) for x, w in shapes) * 1e9) > 0, kind


@torch.no_grad()
def test_graphs_share_the_unet_parameters():
    unet = make_unet("sd15")
    kwargs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor(3), **unet_inputs("sd15", batch=1))
    captured, plan, pair, tensors = _build(unet, kwargs)
    graph_params = {id(p) for p in pair.keyframe.parameters()} | {id(p) for p in pair.reuse.parameters()}
    assert graph_params <= {id(p) for p in unet.parameters()}, "a graph holds a copy of a weight"
    unet.conv_out.weight.mul_(2.0)  # an in-place weight change must be seen by the eager graphs
    caches, keyframe_out = _buffers(plan, kwargs["sample"])
    assert torch.equal(pair.keyframe(*tensors, *caches, keyframe_out), unet(**kwargs).sample)


def test_full_size_sd15_structure_on_meta():
    # The real SD 1.5 config (860M parameters) built on the meta device: structure only, no memory, no compute.
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    kwargs = dict(
        sample=torch.empty(2, 4, 32, 32, device="meta"),
        timestep=torch.empty((), dtype=torch.int64, device="meta"),
        encoder_hidden_states=torch.empty(2, 77, 768, device="meta"),
    )
    _, plan, pair, _ = _build(unet, kwargs)
    assert len(plan.points) == 38, str(plan)
    assert plan.count(RESNET_CONV1) == 22 and plan.count(TRANSFORMER_DELTA) == 16, str(plan)
    report = pair.report
    assert report.reuse["attention"] == 0, str(report)
    assert report.reuse["conv"] < 0.5 * report.keyframe["conv"], str(report)
    assert report.reuse["ops"] < 0.3 * report.keyframe["ops"], str(report)
    assert plan.cache_bytes == 45 * 2**20, str(plan)


def test_plan_shortfall_names_the_modules_that_run_in_full():
    points = (CachePoint("mid_block.attentions.0", TRANSFORMER_DELTA, "add_1", (1, 4), torch.float32, (4, 1)),)
    skipped = tuple((f"down_blocks.0.resnets.{i}", "conv1 has 2 outputs in the graph, expected 1") for i in range(4))
    counts = {"ops": 1, "conv": 0, "attention": 0}
    assert Plan(points, (), counts).shortfall() is None
    text = Plan(points, skipped, counts).shortfall()
    assert text.startswith("4 of the modules") and "down_blocks.0.resnets.2: conv1 has 2" in text, text
    assert "resnets.3" not in text and "and 1 more" in text, text
    assert "none of the modules" in Plan((), (), counts).shortfall()


@torch.no_grad()
def test_attention_slicing_leaves_no_attention_in_the_reuse_graph(kind):
    """`enable_attention_slicing()` copies each slice of attention into a `zeros` buffer in place. Plain
    dead-code elimination keeps in-place ops, so every attention stayed in the reuse graph (SD 1.5 config,
    32x32 latents: 0.47 of a keyframe call's FLOPs instead of 0.30); writes nothing live reads now go too."""
    kwargs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500), **unet_inputs(kind))
    plain = _build(make_unet(kind), kwargs)[2].report
    unet = make_unet(kind)
    unet.set_attention_slice(1)
    _, plan, pair, tensors = _build(unet, kwargs)
    expected = unet(**kwargs).sample
    caches, keyframe_out = _buffers(plan, expected)
    assert torch.equal(pair.keyframe(*tensors, *caches, keyframe_out), expected)
    assert torch.equal(pair.reuse(*tensors, *caches, keyframe_out, torch.tensor(1.0)), expected)
    report = pair.report
    assert report.keyframe["attention"] > plain.keyframe["attention"], "the UNet did not slice its attention"
    assert report.reuse == plain.reuse, f"sliced: {report}; plain: {plain}"


def test_dead_writes_go_and_live_ones_stay():
    """Only a tensor the graph made, all of whose views and writes nothing outside them reads, is erased."""
    from torch import fx

    from frdiff_compile.passes.build import _finish

    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")
    for _ in range(2):  # the first buffer is dead, the second one is returned
        buffer = graph.call_function(aten.zeros.default, ([4],), {"dtype": torch.float32})
        graph.call_function(aten.copy_.default, (graph.call_function(aten.slice.Tensor, (buffer, 0, 0, 2)), x))
    graph.call_function(aten.mul_.Tensor, (x, 2.0))  # a write into an input: the caller sees it
    graph.output(buffer)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    _finish(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [aten.zeros.default, aten.slice.Tensor, aten.copy_.default, aten.mul_.Tensor], targets
    value = torch.tensor([1.0, 2.0])
    assert torch.equal(gm(value), torch.tensor([1.0, 2.0, 0.0, 0.0])) and torch.equal(value, torch.tensor([2.0, 4.0]))
