"""The wrapper moves weights like the stock UNet: state-dict keys, loading checkpoints, copies and pickles.

Code written for `pipe.unet` (checkpoint I/O, `get_peft_model_state_dict(pipe.unet)` before
`save_lora_weights`, `copy.deepcopy(pipe)`) must keep working after `pipe.unet = optimize(pipe.unet)`.
"""

import copy
import io

import pytest
import torch
from conftest import make_unet, unet_inputs
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig, FRDiffUNet

STEPS = 6


def run(model, cond):
    return sample(optimized_fn(model, cond), scheduler("sd15"), STEPS)


def stock(unet, cond):
    return sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), STEPS)


def test_state_dict_has_the_stock_keys_values_and_metadata():
    unet = make_unet("sd15", layers_per_block=1)
    fr = frdiff_compile.optimize(unet)
    got, expected = fr.state_dict(), unet.state_dict()
    assert list(got) == list(expected)
    assert all(got[k].data_ptr() == expected[k].data_ptr() for k in expected)
    assert got._metadata == expected._metadata
    assert [n for n, _ in fr.named_parameters()] == [n for n, _ in unet.named_parameters()]
    assert [n for n, _ in fr.named_buffers()] == [n for n, _ in unet.named_buffers()]
    modules = list(fr.named_modules())
    assert modules[0] == ("", fr) and modules[1:] == list(unet.named_modules())


def test_stock_checkpoints_load_in_place_and_keep_the_graphs():
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    run(fr, cond)
    other = make_unet("sd15", seed=1, layers_per_block=1)
    assert fr.load_state_dict(other.state_dict()) is not None
    assert torch.equal(run(fr, cond), stock(other, cond))
    assert fr.stats.captures == 1, "an in-place load must keep the graphs: they read the parameters where they live"
    # The wrapper's own spelling of earlier releases ("unet." keys) loads too.
    fr.load_state_dict({f"unet.{k}": v for k, v in make_unet("sd15", seed=2, layers_per_block=1).state_dict().items()})
    assert torch.equal(run(fr, cond), stock(unet, cond)) and not torch.equal(run(fr, cond), stock(other, cond))
    # assign=True gives the UNet new Parameters: the fingerprint sees it and the graphs are rebuilt.
    fr.load_state_dict(other.state_dict(), assign=True)
    assert torch.equal(run(fr, cond), stock(other, cond)) and fr.stats.captures == 2


def test_load_errors_name_keys_in_the_stock_spelling():
    fr = frdiff_compile.optimize(make_unet("sd15", layers_per_block=1))
    state = fr.state_dict()
    del state["conv_in.weight"]
    state["not_a_module.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as raised:
        fr.load_state_dict(state)
    message = str(raised.value)
    assert '"conv_in.weight"' in message and '"not_a_module.weight"' in message and "unet." not in message
    result = fr.load_state_dict(state, strict=False)
    assert result.missing_keys == ["conv_in.weight"] and result.unexpected_keys == ["not_a_module.weight"]


def test_nested_wrapper_round_trips_under_its_parents_prefix():
    unet = make_unet("sd15", layers_per_block=1)
    parent = torch.nn.ModuleDict({"denoiser": frdiff_compile.optimize(unet), "head": torch.nn.Linear(2, 2)})
    state = parent.state_dict()
    assert [k for k in state if k.startswith("denoiser.")] == [f"denoiser.{k}" for k in unet.state_dict()]
    assert "denoiser.conv_in" in state._metadata and "denoiser.unet" not in state._metadata
    assert [n for n, _ in parent.named_parameters()][:2] == ["denoiser.conv_in.weight", "denoiser.conv_in.bias"]
    fresh = torch.nn.ModuleDict({"denoiser": frdiff_compile.optimize(make_unet("sd15", seed=3, layers_per_block=1)),
                                 "head": torch.nn.Linear(2, 2)})
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())


def test_peft_lora_state_dict_of_the_wrapper_is_the_stock_one():
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = make_unet("sd15", layers_per_block=1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    expected = get_peft_model_state_dict(unet)
    got = get_peft_model_state_dict(frdiff_compile.optimize(unet))
    assert expected and list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_copies_and_pickles_are_new_runtimes_without_graphs():
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    config = FRDiffConfig(keyframe_interval=2)
    fr = frdiff_compile.optimize(unet, config)
    expected = run(fr, cond)
    buffer = io.BytesIO()
    torch.save(fr, buffer)
    buffer.seek(0)
    for how, made in (("deepcopy", copy.deepcopy(fr)), ("pickle", torch.load(buffer, weights_only=False))):
        assert isinstance(made, FRDiffUNet) and made.frdiff_config == config, how
        assert made.unet is not unet and not made.graph_entries() and made.stats.generations == 0, how
        assert torch.equal(run(made, cond), expected) and made.stats.captures == 1, how
        with torch.no_grad():
            made.unet.conv_in.weight.add_(1.0)  # the copy's weights are its own
        assert torch.equal(run(fr, cond), expected), how
    shallow = copy.copy(fr)  # a second runtime over the same UNet: graphs and generations are not shared
    assert shallow.unet is unet and not shallow.graph_entries() and shallow._graphs is not fr._graphs
    assert torch.equal(run(shallow, cond), expected) and fr.stats.captures == 1


def test_pipeline_saves_with_the_stock_unet_swapped_in(sd_pipe, tmp_path):
    # diffusers' save_pretrained saves only classes it knows: the README's recipe puts the stock UNet back
    # for the save and the wrapper (with its graphs) after it.
    from diffusers import StableDiffusionPipeline

    stock_unet = sd_pipe.unet
    fr = frdiff_compile.optimize(stock_unet)
    try:
        sd_pipe.unet = fr
        sd_pipe.unet = fr.unet
        sd_pipe.save_pretrained(tmp_path)
        sd_pipe.unet = fr
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path).unet
        assert type(loaded) is type(stock_unet)
        assert all(torch.equal(v, stock_unet.state_dict()[k]) for k, v in loaded.state_dict().items())
        fr.save_pretrained(tmp_path / "unet_alone")  # the wrapper forwards to the UNet's own save
        assert (tmp_path / "unet_alone" / "config.json").exists()
    finally:
        sd_pipe.unet = stock_unet
