"""diffusers' features on the device (gpu-marked): LoRA hotswap under captured graphs, the CFG pipeline under
compiled graphs and CUDA graphs, model CPU offload moving the UNet off the GPU and back between generations, and
torchao's quantized weights moved under captured graphs.

Run with `pytest -m gpu tests` on a CUDA machine; with FRDIFF_EMULATE_GPU=1 they run on CPU (see
test_cuda_runtime.py, whose helpers they share).
"""

import copy

import numpy as np
import pytest
import torch
from conftest import make_unet, max_rel_error, needs_unet_method
from test_cuda_runtime import (
    DEVICE,
    EMULATED,
    STEPS,
    TOLERANCE,
    compiled,
    device_inputs,
    eager_graphs,
    trajectory,
    two_devices,
)
from test_module_state import load_lora, lora_layers
from test_quantized import move_subclass_weights
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import frdiff_compile
from frdiff_compile import FRDiffConfig

pytestmark = [pytest.mark.gpu, pytest.mark.cpu_emulation]


@needs_unet_method("enable_lora_hotswap", "0.33")
@pytest.mark.parametrize("load", ["after_to", "before_to"])
def test_lora_hotswap_under_captured_graphs(load):
    """diffusers' LoRA hotswap copies the new adapter's weights into the old ones and fills PEFT's scaling
    tensors in place. Loaded after `.to(device)`, the scalings live there and the CUDA graphs, which bake
    their addresses in, read the new values with no new capture. Loaded before, the scalings stay on the
    CPU, and CUDA kernels take a CPU scalar's value at launch: the new value must make new graphs (the
    fingerprint counts it), never replay the old one. The graphs run uncompiled here: addresses are what
    matter (inductor reads the scalings live too: checked on CPU)."""
    pytest.importorskip("peft", reason="LoRA adapters need peft (carry its wheel: see benchmarks/gpu_check.sh)")
    unet = make_unet("sd15", layers_per_block=1)
    unet.enable_lora_hotswap(target_rank=8)
    if load == "after_to":
        unet.to(DEVICE)
    load_lora(unet, 1, 4)
    unet.to(DEVICE)
    cond = device_inputs(torch.float32)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1, compile=False))  # M=1: exactly the UNet
    if EMULATED:
        fr.graph_backend_override = "emulate"
    first = trajectory(fr, cond)
    assert max_rel_error(first, trajectory(unet, cond)) < TOLERANCE[torch.float32]
    before = copy.copy(fr.stats)
    load_lora(unet, 2, 8, hotswap=True)
    swapped = trajectory(fr, cond)
    assert max_rel_error(swapped, trajectory(unet, cond)) < TOLERANCE[torch.float32]
    assert max_rel_error(swapped, first) > 1e-2  # the new adapter did change the result
    new = fr.stats.since(before)
    on_cpu = lora_layers(unet)[0].scaling["a"].is_cpu
    rebuilt = on_cpu and not EMULATED  # with CPU weights (emulation) the scalings are read live
    assert (new.captures, new.cudagraph_captures) == ((1, 1) if rebuilt else (0, 0)), new
    assert new.cudagraph_fallbacks == 0 and new.full_replays == new.full_calls == STEPS, new


def test_cfg_pipeline_on_the_device(sd_pipe):
    stock = sd_pipe.unet
    sd_pipe.to(DEVICE, torch.float16)
    try:
        def generate():
            return sd_pipe(["a digit", "a cat"], num_inference_steps=10, height=32, width=32, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(0), output_type="np").images

        sd_pipe.unet = eager_graphs(stock)
        expected = generate()
        sd_pipe.unet = compiled(stock)
        got = generate()
        assert np.abs(got - expected).max() < 2e-2
        assert sd_pipe.unet.stats.reuse_replays > 0 and sd_pipe.unet.stats.eager_calls == 0, sd_pipe.unet.stats
    finally:
        sd_pipe.unet = stock
        sd_pipe.to("cpu", torch.float32)


@two_devices
def test_model_cpu_offload_after_optimize_keeps_the_graphs(sd_pipe):
    """diffusers' model CPU offload takes the UNet off the GPU after each generation and back before the next:
    every generation is served by the graphs built once, with new CUDA-graph captures and no new build."""
    pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs accelerate (carry its wheel)")
    stock = sd_pipe.unet

    def generate():
        return sd_pipe(["a digit", "a cat"], num_inference_steps=10, height=32, width=32, guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(0), output_type="np").images

    try:
        sd_pipe.to(DEVICE)
        sd_pipe.unet = eager_graphs(stock)
        expected = generate()
        # Eager graphs under CUDA graphs: the relink logic is the same for compiled ones (test_compile.py).
        sd_pipe.unet = frdiff_compile.optimize(stock, FRDiffConfig(compile=False))
        sd_pipe.enable_model_cpu_offload()
        for _ in range(3):
            assert np.abs(generate() - expected).max() < 1e-3
            assert stock.device.type == "cpu"  # offloaded again after the generation
        s = sd_pipe.unet.stats
        assert s.captures == 1 and s.relinks == 2 and s.cudagraph_captures == 6, s
        assert s.eager_calls == 0 and s.cudagraph_fallbacks == 0 and s.reuse_replays > 0, s
    finally:
        sd_pipe.remove_all_hooks()
        sd_pipe.unet = stock
        sd_pipe.to("cpu")


def test_quantized_weights_moved_in_place_or_off_the_device_and_back_are_captured_again():
    """torchao's quantized weights keep their data in inner tensors (their own `data_ptr()` is 0), and a move
    swaps new inner tensors into the same Parameter. Moved on the device (new storage, same layout: only the
    inner tensors' addresses tell), then off it and back (`pipe.to("cpu")` raised "Couldn't swap" before), the
    CUDA graphs captured over the old tensors must be captured again, never replayed over the freed memory,
    which is filled with NaN here after each move."""
    quantization = pytest.importorskip("torchao.quantization", reason="needs torchao (carry torchao==0.18.0)")
    unet = make_unet("sd15", layers_per_block=1).to(DEVICE)
    quantization.quantize_(unet, quantization.Int8WeightOnlyConfig())
    cond = device_inputs(torch.float32)
    expected = trajectory(eager_graphs(unet), cond)
    fr = compiled(unet)
    assert max_rel_error(trajectory(fr, cond), expected) < TOLERANCE[torch.float32]
    inner = [getattr(p, name) for p in unet.parameters() if is_traceable_wrapper_subclass(p)
             for name in p.__tensor_flatten__()[0]]
    sizes = [t.nbytes for t in inner if t is not None]
    del inner
    # Emulated (one device), a float64 round trip stands in for the trip off the device, as in test_cudagraphs.py.
    away_and_back = (lambda: fr.double().float()) if EMULATED else (lambda: fr.to("cpu").to(DEVICE))
    for trip, move in enumerate([lambda: fr._apply(move_subclass_weights), away_and_back], 1):
        move()
        # Take the freed blocks back (the allocator reuses a block of the same size) and fill them with 0xFF
        # bytes, NaN as float32: a replay still reading the old weights reads garbage.
        poison = [torch.full((n,), 255, dtype=torch.uint8, device=DEVICE) for n in sizes]
        del poison
        got = trajectory(fr, cond)
        assert fr.stats.relinks == trip and fr.stats.compiles == 2 and fr.stats.cudagraph_captures == 2 * (trip + 1)
        assert torch.isfinite(got).all() and max_rel_error(got, expected) < TOLERANCE[torch.float32], trip
