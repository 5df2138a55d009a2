"""The fused blend kernel against its torch reference (Triton interpreter on CPU; GPU tests on CUDA)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from frdiff_compile.kernels import blend
from frdiff_compile.kernels.arena import BlendArena
from frdiff_compile.kernels.blend import arena_blend_reference, launch_blend, score_blend, score_blend_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerance per dtype against the reference computed the same way (fp32 math, one rounding at the store).
# The interpreter's bf16 cast truncates instead of rounding: one bf16 ulp (2^-7 relative). On CUDA the
# compiler contracts w*a + (1-w)*b into one FMA where eager torch rounds the product first, so the kernel
# may differ from the reference by one rounding of the storage dtype.
TOLERANCE = {
    "cpu": {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 2.0**-7},
    "cuda": {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7},
}[DEVICE]
SHAPES = [(1,), (7,), (1023,), (1024,), (1025,), (65537,), (2, 4, 8, 8), (2, 1280, 8, 8), (2, 640, 16, 16)]


def close(got, expected, dtype):
    tol = TOLERANCE[dtype]
    if tol == 0.0:
        return torch.equal(got, expected)
    return torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(DEVICE, dtype), torch.randn(shape, generator=g).to(DEVICE, dtype))


def test_kernel_runs_here():
    assert blend.kernel_available(torch.empty(1, device=DEVICE)), "tests must exercise the Triton kernel"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("w", [0.0, 1.0, 0.37])
def test_blend_matches_reference(shape, dtype, w):
    a, b = inputs(shape, dtype)
    weight = torch.tensor(w, device=DEVICE)
    got = score_blend(weight, a, b)
    expected = score_blend_reference(weight, a, b)
    assert got.dtype == dtype and got.data_ptr() not in (a.data_ptr(), b.data_ptr())
    assert close(got, expected, dtype), f"shape={shape} dtype={dtype} w={w}: max err {(got.float() - expected.float()).abs().max()}"
    if w in (0.0, 1.0):
        assert torch.equal(got, a if w == 1.0 else b), f"w={w} must return an input exactly ({dtype}, {shape})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_out_may_alias_an_input(dtype):
    a, b = inputs((3, 5, 7, 11), dtype)
    weight = torch.tensor(0.37, device=DEVICE)
    expected = score_blend_reference(weight, a, b)
    a2, b2 = a.clone(), b.clone()
    launch_blend(weight, a2, b, a2)
    launch_blend(weight, a, b2, b2)
    assert close(a2, expected, dtype) and close(b2, expected, dtype)


def test_channels_last_and_bad_layouts():
    a, b = inputs((2, 8, 5, 3), torch.float16)
    weight = torch.tensor(0.37, device=DEVICE)
    cl_a, cl_b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    got = score_blend(weight, cl_a, cl_b)
    assert close(got, score_blend_reference(weight, a, b), torch.float16)
    # The op takes operands of two layouts (a channels_last UNet's output and a contiguous keyframe output,
    # seen on an H200): the result is in a's layout, contiguous where a is not dense, as the fake op says.
    for x, y, layout in ((cl_a, b, torch.channels_last), (a, cl_b, torch.contiguous_format),
                         (a.transpose(1, 2), cl_b.transpose(1, 2), torch.contiguous_format)):
        got = score_blend(weight, x, y)
        assert got.is_contiguous(memory_format=layout), got.stride()
        assert close(got, score_blend_reference(weight, x.contiguous(), y.contiguous()), torch.float16)
        with torch._subclasses.FakeTensorMode() as mode:
            fake = score_blend(mode.from_tensor(weight), mode.from_tensor(x), mode.from_tensor(y))
        assert fake.stride() == got.stride()
    # A tensor that is both contiguous and channels_last (H = W = 1) is in one memory order either way.
    flat, flat_cl = a[:, :, :1, :1].contiguous(), a[:, :, :1, :1].contiguous(memory_format=torch.channels_last)
    out = launch_blend(weight, flat, flat_cl, torch.empty_like(flat))
    assert close(out, score_blend_reference(weight, flat, flat_cl), torch.float16)
    with pytest.raises(ValueError, match="dense layout"):
        launch_blend(weight, a.transpose(1, 2), b.transpose(1, 2), torch.empty_like(a.transpose(1, 2)))
    with pytest.raises(ValueError, match="dense layout"):
        launch_blend(weight, cl_a, b, torch.empty_like(b))
    with pytest.raises(ValueError, match="1-element tensor"):
        launch_blend(0.5, a, b, torch.empty_like(a))
    with pytest.raises(ValueError, match="one dtype"):
        launch_blend(weight, a, b.float(), torch.empty_like(a))
    with pytest.raises(ValueError, match="one dtype"):
        launch_blend(weight, a.double(), b.double(), torch.empty_like(a.double()))


def test_float64_blends_in_float64_through_the_op():
    """A UNet run in double precision: the ops take fp64 and blend it in fp64 (the kernel, fp32 math, never
    sees it); other dtypes get a clear error that names the supported ones."""
    a, b = inputs((3, 5, 7), torch.float64)
    weight = torch.tensor(0.37, dtype=torch.float64, device=DEVICE)
    got = score_blend(weight, a, b)
    assert got.dtype == torch.float64
    assert torch.equal(got, weight * a + (1 - weight) * b)
    fp32_math = score_blend(weight.float(), a.float(), b.float()).double()
    assert not torch.equal(got, fp32_math)  # the precision fp32 math would have thrown away
    assert str(blend.score_blend_op(torch.device("cuda"), torch.float64)) == "frdiff.score_blend.default"
    compiled = torch.compile(score_blend, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(weight, a, b), got)
    with pytest.raises(ValueError, match="float64.*got torch.int32"):
        score_blend(weight, a.int(), b.int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_arena_blend_equals_a_loop_of_single_blends(dtype):
    shapes = [(2, 320, 8, 8), (1,), (1023,), (2, 1280, 2, 2), (7, 3)]
    memory, fresh = BlendArena(shapes, dtype, DEVICE), BlendArena(shapes, dtype, DEVICE)
    for k, (m, s) in enumerate(zip(memory.views, fresh.views)):
        m.copy_(torch.randn(m.shape, generator=torch.Generator().manual_seed(k)))
        s.copy_(torch.randn(s.shape, generator=torch.Generator().manual_seed(100 + k)))
    weights = torch.tensor([0.0, 1.0, 0.37, 0.5, 0.9], device=DEVICE)
    expected = [score_blend_reference(weights[k], s, m) for k, (m, s) in enumerate(zip(memory.views, fresh.views))]
    flat = arena_blend_reference(weights, memory.segments, fresh.buffer, memory.buffer)
    memory.blend_(weights, fresh, memory)  # M <- h * S + (1 - h) * M, in place, one launch
    for k, (got, want) in enumerate(zip(memory.views, expected)):
        assert close(got, want, dtype), f"tensor {k} {tuple(got.shape)} {dtype}"
    assert close(memory.buffer, flat, dtype)
    with pytest.raises(ValueError, match="one per tensor"):
        memory.blend_(torch.ones(3, device=DEVICE), fresh, memory)
    with pytest.raises(ValueError, match="another layout"):
        memory.blend_(weights, BlendArena(shapes[:2], dtype, DEVICE), memory)


def test_op_compiles_without_graph_breaks():
    a, b = inputs((2, 4, 8, 8), torch.float32)

    def f(w, a, b):
        return score_blend(w, a * 2, b) + 1

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, fullgraph=True)
    for w in (0.0, 0.37, 1.0):  # a new weight value is a new tensor value, not a new graph
        weight = torch.tensor(w, device=DEVICE)
        assert torch.allclose(compiled(weight, a, b), f(weight, a, b), rtol=1e-6, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_autograd_of_the_reference(dtype):
    """Auto-FR differentiates through the op: the gate (weight), the fresh feature (a) and the memory (b)."""
    grads = []
    for fn in (score_blend, score_blend_reference):
        a, b = (t.requires_grad_(True) for t in inputs((2, 4, 9, 7), dtype))
        weight = torch.tensor(0.37, device=DEVICE, requires_grad=True)
        out = fn(weight, a, b)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
        grads.append(torch.autograd.grad(out, (weight, a, b), upstream))
    (gw, ga, gb), (ew, ea, eb) = grads
    assert ga.dtype == dtype and gb.dtype == dtype and gw.shape == ()
    assert close(ga, ea, dtype) and close(gb, eb, dtype), (ga - ea).abs().max()
    # The weight's gradient is a sum over every element: fp32 accumulation in a different order.
    assert torch.allclose(gw, ew, rtol=1e-3 if dtype == torch.float16 else 1e-5), (gw, ew)
    a, b = inputs((5,), dtype)
    weight = torch.tensor(0.37, device=DEVICE, requires_grad=True)
    (only_w,) = torch.autograd.grad(score_blend(weight, a, b).sum(), (weight,))
    assert torch.allclose(only_w, (a.float() - b.float()).sum(), rtol=1e-3)


def test_export_keeps_the_op_in_the_graph():
    class M(torch.nn.Module):
        def forward(self, w, a, b):
            return score_blend(w, a, b)

    a, b = inputs((2, 4, 8, 8), torch.float32)
    program = torch.export.export(M(), (torch.tensor(0.5, device=DEVICE), a, b), strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("frdiff" in t for t in targets), targets


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_compiled_kernel_matches_reference(dtype):
    a, b = inputs((2, 640, 32, 32), dtype)
    weight = torch.tensor(0.37, device="cuda")
    compiled = torch.compile(score_blend, fullgraph=True)
    got = compiled(weight, a, b)
    expected = score_blend_reference(weight, a, b)
    assert close(got, expected, dtype), f"{dtype}: max err {(got.float() - expected.float()).abs().max()}"


@pytest.mark.gpu
def test_cuda_graph_replay_reads_the_refilled_weight():
    a, b = inputs((2, 320, 64, 64), torch.float16)
    weight = torch.tensor(0.0, device="cuda")
    out = torch.empty_like(a)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch_blend(weight, a, b, out)  # warm-up (compiles the kernel) outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch_blend(weight, a, b, out)
    for w in (0.37, 1.0):
        weight.fill_(w)
        graph.replay()
        torch.cuda.synchronize()
        assert close(out, score_blend_reference(weight, a, b), torch.float16), f"replay with w={w}"


def test_interpreter_switched_on_after_import_runs_the_reference():
    # Kernels decorated without TRITON_INTERPRET cannot be interpreted later: triton finds no driver and
    # raised, so the ops must use the torch reference in a process that set the variable after importing.
    import os
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from frdiff_compile.kernels import blend\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "a, b, w = torch.randn(1000), torch.randn(1000), torch.tensor(0.37)\n"
        "assert not blend.kernel_available(a)\n"
        "assert torch.equal(blend.score_blend(w, a, b), blend.score_blend_reference(w, a, b))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
