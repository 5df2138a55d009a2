"""Inductor's CUDA code generation on a machine without a GPU, for `bench_codegen.py --backend cuda-stub`.

The CPU-tensor Triton backend (bench_codegen's default) skips work that inductor's CUDA paths do: for SD 1.5's
keyframe graph it generates 126 kernels where the CUDA paths generate 142. This module lets the CUDA paths run
to the generated code with no GPU: the graphs are moved to the "cuda" device as fake tensors (shapes, strides
and dtypes only), and the few questions inductor asks of the device are answered from an H200's properties.

Invariants:
- Needs a CUDA build of torch (torch.version.cuda set) and no GPU: where there is one, a real compile is the
  measurement (bench_compile). Tried with torch 2.11.0+cu130 and triton 3.6.0, the GPU machine's versions, and
  torch 2.14.1 (CUDA 13.0) with triton 3.8.0; the patches reach torch internals, so another release may need
  them changed, and fails loudly if so.
- Nothing runs on a device. Where inductor would run something at compile time, that step is left out, and so its
  time: pad_mm's benchmarks of padded matmuls (`shape_padding` off), the SDPA fusion patterns' setup (the captured
  graphs hold SDPA ops already), and constant folding of values computed on the device (left unfolded).
- The graphs are the ones captured on CPU, moved: device arguments become "cuda"; attention becomes CUDA's flash
  attention op, which a GPU's trace picks for fp16 (or cuDNN's: an extern kernel either way), since the captured
  `scaled_dot_product_attention` would otherwise be decomposed by AOTAutograd on fake CUDA tensors into matmuls
  and a softmax (no device answers its backend choice): for SD 1.5's keyframe graph 171 Triton kernels and 570
  launches a call, against 142 and 405 with the flash op; the blend op becomes the `triton_op` a graph built on
  CUDA calls, whose kernel inductor generates into its code.
- Every patch is undone when the context exits.
"""

from __future__ import annotations

import contextlib
import operator
import types
from unittest import mock

import torch
from torch import fx

# What inductor reads of the device, an H200's: multiprocessors, L2 and memory as seen on the GPU machine
# (device README, the H200 run's log), the other fields Hopper's published limits and clocks.
H200 = types.SimpleNamespace(
    name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, total_memory=143771 * 2**20, warp_size=32,
    max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536, shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472, max_threads_per_block=1024, L2_cache_size=60 * 2**20,
    gcnArchName="", uuid="stub", is_integrated=False, clock_rate=1980000, memory_clock_rate=3201000,
    memory_bus_width=6144,
)
OPTIONS = {"shape_padding": False}  # pad_mm benchmarks matmuls on the device while it compiles


def unavailable() -> str | None:
    """Why the stub cannot run here, or None."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build; the cuda-stub backend needs a CUDA build of torch (it runs "
                "inductor's CUDA code paths without a GPU); use the default backend, or install a CUDA wheel")
    if torch.cuda.is_available():
        return "a GPU is present: time a real compile instead (benchmarks/bench_compile.py)"
    return None


class TritonDriver:
    """The active Triton driver, as far as inductor's code generation asks it (bench_codegen installs it for
    both backends, around `cuda_codegen_stub`)."""

    class utils:  # noqa: N801 - Triton's attribute name
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": H200.shared_memory_per_block_optin, "multiprocessor_count": 132,
                    "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": H200.clock_rate,
                    "mem_clock_rate": H200.memory_clock_rate, "mem_bus_width": H200.memory_bus_width}

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cuda", 0)


@contextlib.contextmanager
def cuda_codegen_stub():
    """Answer inductor's device questions from `H200`; leave out what would run on the device. The Triton
    driver (`TritonDriver`) is bench_codegen's `codegen_only`'s to install, for both backends."""
    import torch._inductor.constant_folding as constant_folding
    import torch._inductor.fx_passes.fuse_attention as fuse_attention
    import torch._subclasses.fake_tensor as fake_tensor
    from torch._dynamo.device_interface import CudaInterface
    from torch.utils._triton import has_triton

    answers = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
               "get_device_properties": lambda *a, **k: H200, "get_device_capability": lambda *a, **k: (9, 0),
               "get_device_name": lambda *a, **k: H200.name, "is_bf16_supported": lambda *a, **k: True,
               "synchronize": lambda *a, **k: None, "set_device": lambda *a, **k: None,
               "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
               "set_rng_state": lambda *a, **k: None, "_lazy_init": lambda: None,
               "_exchange_device": lambda index: 0, "_maybe_exchange_device": lambda index: 0}
    interface = {"current_device": lambda: 0, "device_count": lambda: 1, "synchronize": lambda *a: None,
                 "get_device_properties": lambda *a, **k: H200, "exchange_device": lambda index: 0,
                 "maybe_exchange_device": lambda index: 0, "is_bf16_supported": lambda *a, **k: True,
                 "set_device": lambda *a: None, "get_raw_stream": lambda *a: 0, "is_available": lambda: True,
                 "get_compute_capability": lambda *a: 90}
    fold = constant_folding.ConstantFolder.run_node

    def fold_on_host_only(self, node):  # a value computed on the device is left unfolded
        try:
            return fold(self, node)
        except RuntimeError as exc:
            if "NVIDIA driver" not in str(exc):
                raise
            return self.unknown_value

    with contextlib.ExitStack() as stack:
        # has_triton() is cached: asked before the stub (torchao asks it at import, and diffusers imports torchao
        # where it is installed), it holds "no device" and inductor raises TritonMissing. Ask again, and after.
        has_triton.cache_clear()
        stack.callback(has_triton.cache_clear)
        for name, answer in answers.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, answer))
        for name, answer in interface.items():
            stack.enter_context(mock.patch.object(CudaInterface, name, staticmethod(answer)))
        stack.enter_context(mock.patch.object(CudaInterface.Worker, "get_device_properties",
                                              staticmethod(lambda *a, **k: H200)))
        stack.enter_context(mock.patch.object(fake_tensor, "init_gpu_context", lambda device: None))
        stack.enter_context(mock.patch.object(fuse_attention, "_sfdp_init", lambda device=None: None))
        stack.enter_context(mock.patch.object(constant_folding.ConstantFolder, "run_node", fold_on_host_only))
        yield


def to_cuda(gm: fx.GraphModule, fake_mode) -> fx.GraphModule:
    """`gm` (captured on CPU) as a graph on "cuda": device arguments, the attention op, fake parameters."""
    from frdiff_compile.compiled_graph import copy_graph_module
    from frdiff_compile.kernels.blend import score_blend_op

    aten, cuda = torch.ops.aten, torch.device("cuda")
    gm = copy_graph_module(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.kwargs.get("device") is not None:
            node.kwargs = {**node.kwargs, "device": cuda}
        if node.target is aten.scaled_dot_product_attention.default:
            _to_flash_attention(gm.graph, node)
            continue
        if node.target is torch.ops.frdiff.score_blend.default:
            # The graphs were built for CPU, with the blend's opaque custom op; built for CUDA they call the
            # triton_op, whose kernel inductor generates into its own code.
            node.target = score_blend_op(cuda, node.args[1].meta["val"].dtype)
    gm.recompile()
    for owner in gm.modules():
        for name, parameter in list(owner._parameters.items()):
            if parameter is not None:
                owner._parameters[name] = torch.nn.Parameter(fake_cuda(parameter, fake_mode),
                                                             requires_grad=parameter.requires_grad)
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None:
                owner._buffers[name] = fake_cuda(buffer, fake_mode)
    return gm


def _to_flash_attention(graph: fx.Graph, node: fx.Node) -> None:
    """`scaled_dot_product_attention(q, k, v, ...)` as output 0 of CUDA's flash attention op."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = {**dict(zip(names, node.args)), **node.kwargs}
    if bound.get("attn_mask") is not None or bound.get("dropout_p", 0.0) != 0.0 or bound.get("enable_gqa"):
        raise NotImplementedError(f"attention with {bound}: the stub maps only mask-free, dropout-free attention")
    scale = {"scale": bound["scale"]} if bound.get("scale") is not None else {}
    with graph.inserting_before(node):
        flash = graph.call_function(torch.ops.aten._scaled_dot_product_flash_attention.default,
                                    (bound["query"], bound["key"], bound["value"], 0.0,
                                     bool(bound.get("is_causal", False))), scale)
        out = graph.call_function(operator.getitem, (flash, 0))
    out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def fake_cuda(t: torch.Tensor, fake_mode) -> torch.Tensor:
    """A fake tensor on "cuda" with `t`'s size, stride and dtype."""
    with fake_mode:
        return torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="cuda")
