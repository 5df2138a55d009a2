"""LoRA adapters managed in a pipeline whose UNet is the wrapper.

diffusers' pipeline-level LoRA methods (`set_adapters`, `disable_lora`, `enable_lora`, `fuse_lora`,
`unfuse_lora`, `delete_adapters`, `unload_lora_weights`, `get_list_adapters`) act on a component only if
`issubclass(model.__class__, ModelMixin)`, which neither this wrapper nor torch.compile's passes (diffusers issues
11408 and 11766), so they skip the UNet without a word. `load_lora_weights` does reach it (it calls the UNet's own
`load_lora_adapter`), and so does every method called on `pipe.unet`, which the wrapper passes to the UNet. These
tests pin both halves: what README tells users to call works and gives the stock UNet's images (the methods on
`pipe.unet`, or the pipeline's own inside `frdiff_compile.unwrapped(pipe)`), and the pipeline-level skip is still
diffusers' behaviour (when a diffusers release unwraps such modules, that test fails and README's advice can be
relaxed).
"""

import copy

import numpy as np
import pytest
import torch

import frdiff_compile
from frdiff_compile import FRDiffConfig

pytest.importorskip("peft", reason="LoRA adapters need peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


def lora_weights(unet, seed: int) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA for `unet`, keyed as `pipe.load_lora_weights` takes a diffusers-format state dict."""
    from peft import LoraConfig, get_peft_model_state_dict

    donor = copy.deepcopy(unet)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), "x")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in donor.named_parameters():  # adapter "x" only: the same values whatever `unet` holds
            if ".x." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return {f"unet.{k}": v for k, v in get_peft_model_state_dict(donor, adapter_name="x").items()}


def generate(pipe):
    return pipe("a digit", num_inference_steps=4, height=16, width=16, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture
def lora_pipe(sd_pipe):
    """`sd_pipe` with adapters "a" and "b" loaded into its (stock) UNet; unloaded afterwards, since it is shared."""
    stock = sd_pipe.unet
    weights = {name: lora_weights(stock, seed) for seed, name in ((1, "a"), (2, "b"))}  # before any is loaded
    for name, state in weights.items():
        sd_pipe.load_lora_weights(state, adapter_name=name)
    try:
        yield sd_pipe
    finally:
        sd_pipe.unet = stock
        sd_pipe.unload_lora_weights()


def test_lora_managed_through_pipe_unet_gives_the_stock_unets_images(lora_pipe):
    pipe, stock = lora_pipe, lora_pipe.unet
    states = {  # each state set on the stock UNet, then through the wrapper, in the same order
        "mix": lambda unet: unet.set_adapters(["a", "b"], [0.5, 0.8]),
        "a": lambda unet: unet.set_adapters(["a"], [1.0]),
        "mix again": lambda unet: unet.set_adapters(["a", "b"], [0.5, 0.8]),
        "off": lambda unet: unet.disable_lora(),
        "a again": lambda unet: (unet.enable_lora(), unet.set_adapters(["a"], [1.0])),
        "fused": lambda unet: unet.fuse_lora(adapter_names=["a"]),
        "unfused": lambda unet: unet.unfuse_lora(),
        "unloaded": lambda unet: unet.unload_lora(),
    }
    unet_copy = copy.deepcopy(stock)  # the stock images come from a copy, so the wrapper starts from "a, b at 1"
    expected = {}
    pipe.unet = unet_copy
    for name, change in states.items():
        change(pipe.unet)
        expected[name] = generate(pipe)
    fr = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=1, compile=False))  # M=1: exactly the UNet
    pipe.unet = fr
    for name, change in states.items():
        change(pipe.unet)
        got = generate(pipe)
        assert np.abs(got - expected[name]).max() < 1e-5, f"after {name!r} the image differs from the stock UNet's"
    assert not np.allclose(expected["mix"], expected["off"], atol=1e-3), "the LoRA did not change the image"
    assert np.abs(expected["fused"] - expected["a"]).max() < 1e-5  # fused or not: the same adapter at 1.0
    assert np.array_equal(expected["a again"], expected["a"])
    # "mix again" and "a again" are served by the graphs built before. Unfused is not "a" again: fuse_lora
    # leaves attributes on the UNet (lora_scale, _safe_fusing), which the state check counts. Eight states, six
    # captures.
    assert fr.stats.eager_calls == 0 and fr.stats.captures == 6, fr.stats
    assert np.array_equal(expected["mix again"], expected["mix"])


def test_pipeline_loads_lora_into_an_optimized_unet(sd_pipe):
    """The usual server order: optimize once, then `pipe.load_lora_weights` per style. Each load reaches the UNet
    through the wrapper, and the images are the stock UNet's with the same adapters."""
    stock = sd_pipe.unet
    weights = {name: lora_weights(stock, seed) for seed, name in ((1, "a"), (2, "b"))}
    expected = [generate(sd_pipe)]
    try:
        for name, state in weights.items():
            sd_pipe.load_lora_weights(state, adapter_name=name)
            expected.append(generate(sd_pipe))
        stock.unload_lora()
        fr = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=1, compile=False))
        sd_pipe.unet = fr
        got = [generate(sd_pipe)]
        for name, state in weights.items():
            sd_pipe.load_lora_weights(state, adapter_name=name)
            got.append(generate(sd_pipe))
        for i, (g, e) in enumerate(zip(got, expected)):
            assert np.abs(g - e).max() < 1e-5, f"after {i} adapters the image differs from the stock UNet's"
        assert not np.allclose(expected[0], expected[1], atol=1e-3), "the LoRA did not change the image"
        assert fr.stats.captures == 3 and fr.stats.eager_calls == 0, fr.stats
    finally:
        sd_pipe.unet = stock
        stock.unload_lora()


def test_pipeline_level_lora_methods_still_skip_the_wrapper(lora_pipe):
    """What README warns of: with the wrapper in `pipe.unet`, `pipe.disable_lora()` and
    `pipe.unload_lora_weights()` leave the UNet's adapters on, and `pipe.get_list_adapters()` does not list them."""
    pipe, stock = lora_pipe, lora_pipe.unet
    fr = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=1, compile=False))
    pipe.unet = fr
    assert "unet" not in pipe.get_list_adapters()
    with_lora = generate(pipe)
    try:  # the adapters are the UNet's alone: diffusers 0.42.1 raises that they are not present, 0.30.0 skips
        pipe.set_adapters(["a"], [0.5])
    except ValueError as error:
        assert "not in the list of present adapters" in str(error)
    assert np.array_equal(generate(pipe), with_lora), "diffusers now sets adapters through the wrapper"
    pipe.disable_lora()
    assert np.array_equal(generate(pipe), with_lora), "diffusers now disables LoRA through the wrapper"
    pipe.unload_lora_weights()
    assert set(stock.peft_config) == {"a", "b"}, "diffusers now unloads LoRA through the wrapper"
    pipe.unet.unload_lora()  # what README says to call
    assert not getattr(stock, "peft_config", None)


def test_pipeline_level_lora_methods_work_inside_unwrapped(lora_pipe):
    """`frdiff_compile.unwrapped(pipe)` registers the stock UNet for the block, so diffusers' own methods reach
    it; after the block the wrapper serves the state they left, with the stock UNet's images."""
    pipe, stock = lora_pipe, lora_pipe.unet
    changes = {  # pipeline-level calls, each made on the stock pipeline and then inside unwrapped()
        "mix": lambda: pipe.set_adapters(["a", "b"], [0.5, 0.8]),
        "off": pipe.disable_lora,
        "on": pipe.enable_lora,
        "unloaded": pipe.unload_lora_weights,
    }
    state = copy.deepcopy(stock.state_dict())
    expected = {}
    for name, change in changes.items():
        change()
        expected[name] = generate(pipe)
    for seed, name in ((1, "a"), (2, "b")):  # back to the fixture's two adapters, as loaded
        pipe.load_lora_weights(lora_weights(stock, seed), adapter_name=name)
    assert all(torch.equal(v, state[k]) for k, v in stock.state_dict().items())
    fr = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=1, compile=False))  # M=1: exactly the UNet
    pipe.unet = fr
    for name, change in changes.items():
        with frdiff_compile.unwrapped(pipe) as same:
            assert same is pipe and pipe.unet is stock and pipe.config.unet == ("diffusers", "UNet2DConditionModel")
            change()
        assert pipe.unet is fr and pipe.config.unet == ("frdiff_compile.unet", "FRDiffUNet")
        assert np.abs(generate(pipe) - expected[name]).max() < 1e-5, f"after {name!r} the image differs from stock"
    assert fr.stats.eager_calls == 0, fr.stats


def test_unwrapped_says_what_it_takes_and_leaves_a_replaced_component_alone(sd_pipe):
    with pytest.raises(TypeError, match="takes a diffusers pipeline"), frdiff_compile.unwrapped(sd_pipe.unet):
        pass
    with pytest.raises(ValueError, match="found no UNet optimized"), frdiff_compile.unwrapped(sd_pipe):
        pass
    stock = sd_pipe.unet
    other = copy.deepcopy(stock)
    try:
        sd_pipe.unet = frdiff_compile.optimize(stock)
        with pytest.warns(UserWarning, match="pipe.unet was replaced inside"), frdiff_compile.unwrapped(sd_pipe):
            sd_pipe.unet = other
        assert sd_pipe.unet is other
    finally:
        sd_pipe.unet = stock
