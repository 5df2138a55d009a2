"""The wrapper: the UNet's interface and argument binding, what `optimize` refuses, and the ways weights move
(checkpoints, other libraries' hooks, copies, pickles, saving).

Code written for `pipe.unet` (loading fine-tuned weights, `copy.deepcopy(pipe)`, offload, saving) must keep
working after `pipe.unet = optimize(pipe.unet)`.
"""

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
from conftest import make_unet, unet_inputs
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig, FRDiffUNet, UnsupportedModelError

STEPS = 6


def run(model, cond):
    return sample(optimized_fn(model, cond), scheduler("sd15"), STEPS)


def stock(unet, cond):
    return sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), STEPS)


def test_checkpoints_load_in_either_spelling_in_place_keeping_the_graphs():
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    assert list(fr.state_dict()) == [f"unet.{k}" for k in unet.state_dict()]  # a module holding a module
    run(fr, cond)
    other = make_unet("sd15", seed=1, layers_per_block=1)
    fr.load_state_dict(other.state_dict())  # a stock checkpoint
    assert torch.equal(run(fr, cond), stock(other, cond))
    assert fr.stats.captures == 1, "an in-place load must keep the graphs: they read the parameters where they live"
    third = make_unet("sd15", seed=2, layers_per_block=1)
    fr.load_state_dict(frdiff_compile.optimize(third).state_dict())  # the wrapper's own spelling
    assert torch.equal(run(fr, cond), stock(third, cond)) and fr.stats.captures == 1
    # assign=True gives the UNet new Parameters: the fingerprint sees it and the graphs are rebuilt.
    fr.load_state_dict(other.state_dict(), assign=True)
    assert torch.equal(run(fr, cond), stock(other, cond)) and fr.stats.captures == 2
    state = other.state_dict()
    del state["conv_in.weight"]
    with pytest.raises(RuntimeError, match="conv_in.weight"):
        fr.load_state_dict(state)


def test_nested_wrapper_loads_stock_keys_under_its_parents_prefix():
    unet = make_unet("sd15", layers_per_block=1)
    parent = torch.nn.ModuleDict({"denoiser": frdiff_compile.optimize(unet), "head": torch.nn.Linear(2, 2)})
    fresh = torch.nn.ModuleDict({"denoiser": frdiff_compile.optimize(make_unet("sd15", seed=3, layers_per_block=1)),
                                 "head": torch.nn.Linear(2, 2)})
    fresh.load_state_dict(parent.state_dict())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in parent.state_dict().items())
    stock_spelled = {f"denoiser.{k}": v.neg() for k, v in unet.state_dict().items()}
    fresh.load_state_dict({**stock_spelled, **{f"head.{k}": v for k, v in parent["head"].state_dict().items()}})
    assert torch.equal(fresh["denoiser"].unet.conv_in.weight, -unet.conv_in.weight)


def test_accelerate_offload_hooks_attached_later_run_the_eager_unet():
    # accelerate's cpu_offload (what enable_sequential_cpu_offload calls) looks up state_dict() entries by
    # named_children paths, so the two must agree; the graphs cannot run its hooks, so the UNet runs eagerly.
    from accelerate import cpu_offload

    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    expected = stock(unet, cond)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))
    cpu_offload(fr, execution_device=torch.device("cpu"), offload_buffers=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(fr, cond)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert fr.stats.eager_calls == STEPS and any("AlignDevicesHook" in str(w.message) for w in caught)


def test_assignments_to_the_unets_public_attributes_reach_the_unet():
    """As torch.compile's wrapper: pipelines assign to `pipe.unet.<attr>` (`unload_ip_adapter`); a value kept
    on the wrapper would shadow the UNet's. Private names (accelerate's hook on the module it wraps) and names
    new to both stay on the wrapper (the pipeline test covers an IP-Adapter unloaded and reloaded)."""
    unet = make_unet("sd15", layers_per_block=1)
    fr = frdiff_compile.optimize(unet)
    projection = torch.nn.Identity()
    fr.encoder_hid_proj = projection  # None on the UNet until an adapter loads
    assert unet.encoder_hid_proj is projection and fr.encoder_hid_proj is projection
    fr.encoder_hid_proj = None
    assert unet.encoder_hid_proj is None
    assert "encoder_hid_proj" not in vars(fr) and "encoder_hid_proj" not in fr._modules
    fr._hf_hook, fr.note = "hook", "mine"
    assert vars(fr)["_hf_hook"] == "hook" and vars(fr)["note"] == "mine"
    assert "_hf_hook" not in vars(unet) and "note" not in vars(unet)
    del fr._hf_hook
    assert "_hf_hook" not in vars(fr)
    fr.eval()  # nn.Module's own attribute, set on every module
    assert not fr.training and not unet.training and "training" in vars(fr)


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
        assert repr(made).startswith("FRDiffUNet(\n  FRDiffConfig(keyframe_interval=2,")
        assert "graph pairs built: 1\n  (unet): UNet2DConditionModel(" in repr(made), how
        with torch.no_grad():
            made.unet.conv_in.weight.add_(1.0)  # the copy's weights are its own
        assert torch.equal(run(fr, cond), expected), how
    shallow = copy.copy(fr)  # a second runtime over the same UNet: graphs and generations are not shared
    assert shallow.unet is unet and not shallow.graph_entries() and shallow._graphs is not fr._graphs
    assert torch.equal(run(shallow, cond), expected) and fr.stats.captures == 1


def test_a_dropped_runtime_frees_its_graphs_and_buffers_at_once():
    # `pipe.unet = optimize(pipe.unet.unet, other_config)` drops the old runtime: its cache buffers and CUDA
    # graphs (device memory) must go with its last reference, not wait for a garbage-collector pass.
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    enabled = gc.isenabled()
    gc.disable()
    try:
        fr = frdiff_compile.optimize(unet)
        fr.graph_backend_override = "emulate"
        run(fr, cond)
        entry = fr.graph_entries()[0]
        held = [weakref.ref(x) for x in (fr, entry, entry.slots[0].caches[0], entry.slots[0].static_keyframe)]
        del fr, entry
        assert all(r() is None for r in held), "a reference cycle keeps the dropped runtime's memory alive"
    finally:
        if enabled:
            gc.enable()


def test_pipeline_saves_inside_unwrapped_even_after_a_failed_save(sd_pipe, tmp_path):
    # diffusers' save_pretrained saves only classes it knows. With the wrapper in place it warns, skips the
    # UNet and records `unet: (None, None)` in the pipeline's config; a plain `pipe.unet = fr.unet` keeps that
    # record (diffusers' __setattr__ only refreshes entries that are not None), so `unwrapped(pipe)` registers
    # the stock UNet, which rewrites the record, and registers the wrapper (with its graphs) again after.
    import json

    from diffusers import StableDiffusionPipeline

    stock_unet = sd_pipe.unet
    fr = frdiff_compile.optimize(stock_unet)
    generate = lambda: sd_pipe("a digit", num_inference_steps=2, height=16, width=16, output_type="np")  # noqa: E731
    try:
        sd_pipe.unet = fr
        generate()
        sd_pipe.save_pretrained(tmp_path / "refused")  # what a user tries first
        assert json.loads((tmp_path / "refused" / "model_index.json").read_text())["unet"] == [None, None]
        with frdiff_compile.unwrapped(sd_pipe):
            sd_pipe.save_pretrained(tmp_path / "saved")
        assert sd_pipe.unet is fr
        generate()
        assert fr.stats.generations == 2 and fr.stats.captures == 1, "the swap for the save kept the graphs"
        assert sd_pipe.config.unet == ("frdiff_compile.unet", "FRDiffUNet")
        with pytest.raises(ValueError, match="should be"):  # diffusers takes only a ModelMixin as a component here
            StableDiffusionPipeline.from_pretrained(tmp_path / "saved", unet=fr)  # README: load, then optimize
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved").unet
        assert type(loaded) is type(stock_unet)
        assert all(torch.equal(v, stock_unet.state_dict()[k]) for k, v in loaded.state_dict().items())
        fr.save_pretrained(tmp_path / "unet_alone")  # the wrapper forwards to the UNet's own save
        assert (tmp_path / "unet_alone" / "config.json").exists()
    finally:
        sd_pipe.register_modules(unet=stock_unet)  # the fixture is shared: leave its config as it was


@torch.no_grad()
def test_wrapper_keeps_the_unet_interface():
    unet = make_unet("sdxl")
    fr = frdiff_compile.optimize(unet)
    assert fr.config is unet.config and fr.dtype == unet.dtype and fr.device == unet.device
    assert fr.add_embedding is unet.add_embedding and fr.config.in_channels == 4
    sched = scheduler("sdxl")
    sched.set_timesteps(3)
    x, cond = torch.randn(2, 4, 8, 8), unet_inputs("sdxl")
    out = fr(x, sched.timesteps[0], **cond)
    assert isinstance(out, UNet2DConditionOutput)
    tup = fr(x, sched.timesteps[1], cond["encoder_hidden_states"], added_cond_kwargs=cond["added_cond_kwargs"],
             return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and tup[0].shape == x.shape


def test_argument_binding_agrees_with_inspect():
    """The per-step fast path binds exactly what inspect.Signature.bind binds, and leaves errors to it."""
    import inspect

    fr = frdiff_compile.optimize(make_unet("sdxl"))
    signature = inspect.signature(fr.unet.forward)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(3), torch.randn(2, 7, 32)
    extra = {"added_cond_kwargs": {}, "return_dict": False}
    calls = [((x, t, text), {}), ((x,), {"timestep": t, "encoder_hidden_states": text, **extra}),
             ((), {"sample": x, "timestep": t, "encoder_hidden_states": text}), ((x, t, text, None), extra)]
    for args, kwargs in calls:
        assert fr._bind(args, kwargs) == dict(signature.bind(*args, **kwargs).arguments), (len(args), sorted(kwargs))
    for args, kwargs in [((x, t), {}), ((x, t, text), {"sample": x}), ((x, t, text), {"bogus": 1}), ((x,) * 20, {})]:
        with pytest.raises(TypeError):
            fr._bind(args, kwargs)


def test_optimize_rejects_what_it_cannot_accelerate():
    unet = make_unet("sd15")
    with pytest.raises(UnsupportedModelError, match="supports diffusers UNet2DConditionModel.*found torch.nn"):
        frdiff_compile.optimize(torch.nn.Linear(2, 2))
    fr = frdiff_compile.optimize(unet)
    with pytest.raises(UnsupportedModelError, match="already been applied"):
        frdiff_compile.optimize(fr)
    with pytest.raises(UnsupportedModelError, match="before torch.compile"):
        frdiff_compile.optimize(torch.compile(unet))
    with pytest.raises(ValueError, match="config must be an FRDiffConfig"):
        frdiff_compile.optimize(unet, {"keyframe_interval": 2})
