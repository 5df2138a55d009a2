"""Module state the capture read as Python values outside parameters and adapters (`module_state.py`): a module's
numbers, strings, flags and tuples of them, its class and the class's code, functions it keeps, and tensors a
processor or module keeps outside its parameters and buffers. Changing any after a capture must rebuild (and
changing it back reuse the graphs built before); changing a tensor in place must be read live, never rebuilt.
"""

import pytest
import torch
from conftest import make_unet, unet_inputs
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig


def tiny_runtime():
    """A one-layer SD 1.5 UNet, its runtime at M=1, and 4-step trajectories of the stock UNet and the runtime."""
    unet = make_unet("sd15", layers_per_block=1)  # one layer per block: these tests capture again and again
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))  # M=1: exactly the UNet
    stock = lambda: sample(lambda i, n, x, t: unet(x, t, **cond).sample, scheduler("sd15"), 4)  # noqa: E731
    run = lambda: sample(optimized_fn(fr, cond), scheduler("sd15"), 4)  # noqa: E731
    return unet, fr, stock, run


def test_module_values_and_swapped_or_patched_classes_rebuild(monkeypatch):
    """Python the capture traced outside processors: values an `Attention` module keeps for its processor
    (`rescale_output_factor`), a convolution's `padding_mode` (seamless tiling sets "circular" on them all)
    and its dilation and padding tuples, a module's class, which patches such as tomesd's token merging swap,
    and a class's own code, patched."""
    from diffusers.models.attention import BasicTransformerBlock

    unet, fr, stock, run = tiny_runtime()
    before = run()
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.rescale_output_factor = 2.0  # SDPA reads it
    assert torch.equal(run(), stock()) and not torch.equal(before, stock()) and fr.stats.captures == 2

    convolutions = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convolutions:
        conv.padding_mode = "circular"
    assert torch.equal(run(), stock()) and fr.stats.captures == 3
    for conv in convolutions:
        conv.padding_mode = "zeros"
    assert torch.equal(run(), stock()) and fr.stats.captures == 3, "back to the earlier settings: their graphs"
    dilated = [conv for conv in convolutions if conv.kernel_size == (3, 3) and conv.stride == (1, 1)][2:6]
    for conv in dilated:  # tuples: ScaleCrafter re-dilates convolutions so, with no other change
        conv.dilation, conv.padding = (2, 2), (2, 2)
    assert torch.equal(run(), stock()) and fr.stats.captures == 4
    for conv in dilated:
        conv.dilation, conv.padding = (1, 1), (1, 1)

    block = unet.mid_block.attentions[0].transformer_blocks[0]
    original = type(block)

    class Patched(original):  # as tomesd does: the instance's class swapped for a subclass
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states * 0.5, *args, **kwargs)

    block.__class__ = Patched
    assert torch.equal(run(), stock()) and fr.stats.captures == 5
    block.__class__ = original
    assert torch.equal(run(), stock()) and fr.stats.captures == 5, "back to the earlier settings: their graphs"

    forward = BasicTransformerBlock.forward  # the class itself patched, for every instance: identity kept
    monkeypatch.setattr(BasicTransformerBlock, "forward", lambda self, x, *a, **k: forward(self, x * 0.5, *a, **k))
    assert torch.equal(run(), stock()) and fr.stats.captures == 6
    monkeypatch.undo()
    assert torch.equal(run(), stock()) and fr.stats.captures == 6


def test_tensors_and_functions_kept_as_attributes_rebuild_when_replaced(monkeypatch):
    """A custom processor's tensor (regional masks, per-token weights) and a module's (what a patched forward
    reads): the export lifted them as constants that the graphs hold. A new tensor set between generations
    was served the old one, silently (1.73 off stock on these 4 steps); a tensor changed in place is read
    where it lives. A one-element CPU tensor counts by value too: a CUDA graph bakes that value in. Then a
    function one module keeps where the others keep None, replaced."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Gain(AttnProcessor2_0):
        def __init__(self, gain):
            super().__init__()
            self.gain = gain

        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs) * self.gain

    unet, fr, stock, run = tiny_runtime()
    unet.set_attn_processor({name: Gain(torch.ones(2, 1, 1)) for name in unet.attn_processors})
    before = run()
    assert torch.equal(before, stock()) and fr.stats.captures == 1
    processors = list(unet.attn_processors.values())
    for processor in processors:
        processor.gain.mul_(0.5)  # in place, several elements: read live, nothing to build
    assert torch.equal(run(), stock()) and not torch.equal(before, stock()) and fr.stats.captures == 1
    for processor in processors:
        processor.gain = torch.full((2, 1, 1), 2.0)
    assert torch.equal(run(), stock()) and fr.stats.captures == 2
    for processor in processors:
        processor.gain = torch.full((1,), 2.0)  # one element on the CPU: its value counts
    assert torch.equal(run(), stock()) and fr.stats.captures == 3
    for processor in processors:
        processor.gain.fill_(0.25)
    assert torch.equal(run(), stock()) and fr.stats.captures == 4

    forward = BasicTransformerBlock.forward  # a patched forward reading a tensor the block keeps
    monkeypatch.setattr(BasicTransformerBlock, "forward", 
                        lambda self, x, *a, **k: forward(self, x * self.mask, *a, **k))
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    for block in blocks:
        block.mask = torch.ones(2, 1, 1)
    assert torch.equal(run(), stock()) and fr.stats.captures == 5
    for block in blocks:
        block.mask = torch.full((2, 1, 1), 0.5)
    assert torch.equal(run(), stock()) and fr.stats.captures == 6
    for block in blocks:  # None, where the forward skips it (as a block's `_chunk_size` or a resnet's `upsample`)
        block.mask = None
    monkeypatch.setattr(BasicTransformerBlock, "forward", lambda self, x, *a, **k: forward(
        self, x if self.mask is None else x * self.mask(), *a, **k))
    assert torch.equal(run(), stock()) and fr.stats.captures == 7
    for block in blocks[:2]:  # a function in one block only: at most one of these two is the block a snapshot
        block.mask = lambda: 0.5  # reads first, whose None must not hide the others' functions
        assert torch.equal(run(), stock())
        block.mask = None
    assert fr.stats.captures == 9


def test_config_values_the_forward_reads_rebuild():
    """`UNet2DConditionModel.forward` reads `self.config.center_input_sample` as a Python value: a config
    changed by `register_to_config` (a new dict; through the runtime too) or by an attribute set on it (as
    diffusers' IP-Adapter loader sets `encoder_hid_dim_type`) was served the old graphs, 21 off stock."""
    unet, fr, stock, run = tiny_runtime()
    plain = run()
    fr.register_to_config(center_input_sample=True)  # the runtime passes it to the UNet
    assert unet.config.center_input_sample
    centered = stock()
    assert torch.equal(run(), centered) and not torch.equal(centered, plain) and fr.stats.captures == 2
    unet.register_to_config(center_input_sample=False)
    assert torch.equal(run(), plain) and fr.stats.captures == 2, "back to the first config: its graphs"
    unet.config.center_input_sample = True  # an attribute of the config dict alone, which the forward reads
    assert torch.equal(run(), centered) and fr.stats.captures == 2, "the same values as the second config"


def test_prepare_builds_under_the_settings_of_its_moment():
    """`prepare` filed its graphs under the settings of the last generation (or of `optimize`): graphs built
    with FreeU on served a later generation with FreeU off, 10.8 off stock."""
    unet, fr, stock, run = tiny_runtime()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    fr.prepare(torch.randn(2, 4, 8, 8), torch.tensor(999), **unet_inputs("sd15"))
    assert torch.equal(run(), stock()) and fr.stats.captures == 1, "the prepared graphs serve the generation"
    unet.disable_freeu()
    assert torch.equal(run(), stock()) and fr.stats.captures == 2
    handle = unet.mid_block.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(RuntimeError, match="forward hooks"):
        fr.prepare(torch.randn(2, 4, 8, 8), torch.tensor(999), **unet_inputs("sd15"))
    handle.remove()


def test_a_module_change_mid_generation_builds_no_graphs_under_the_old_settings():
    """Inputs that need new graphs after a step callback changed the module state: the graphs traced the new
    state and were filed under the settings the generation started with, so a later generation under those
    (FreeU off, batch 1) was served FreeU's graphs, 7.7 off stock. Such steps now run the eager UNet."""
    unet, fr, stock, run = tiny_runtime()
    cond = unet_inputs("sd15")
    half = {k: v[:1] for k, v in cond.items()}

    def freeu_as_the_batch_halves(i, n, x, t):
        if i == 2:
            unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        return fr(x, t, **cond).sample if i < 2 else fr(x[:1], t, **half).sample.repeat(2, 1, 1, 1)

    with pytest.warns(UserWarning, match="module state changed during this generation"):
        sample(freeu_as_the_batch_halves, scheduler("sd15"), 4)
    unet.disable_freeu()
    one = lambda model: sample(lambda i, n, x, t: model(x, t, **half).sample, scheduler("sd15"), 4, batch=1)  # noqa: E731
    assert torch.equal(one(fr), one(unet)) and fr.stats.captures == 2
