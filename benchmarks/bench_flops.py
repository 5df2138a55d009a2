"""FLOPs of a FRDiff reuse call and of a DeepCache shallow call, against a full UNet call, at real sizes.

Run (seconds, no memory: the UNets are built and run on the meta device):
    python benchmarks/bench_flops.py                    # SD 1.5 at 64x64 latents, SDXL at 128x128, CFG batch 2

Why: eval_deepcache.py compares the two methods' quality at equal cost on the shipped digits model, whose
16x16 top level makes DeepCache's shallow call almost free. How cheap each method's cheap call is at Stable
Diffusion sizes decides whether that result carries over, and FLOPs can be counted here without a GPU.

FRDiff's reuse call skips, in every ResnetBlock2D, norm1/SiLU/conv1 (read from the cache), and every
Transformer2DModel (its residual delta is read from the cache); its FLOPs are the full call's minus those
modules' (FlopCounterMode counts matmuls and convolutions by module). DeepCache's shallow call is counted
by running the DeepCache package's UNet at a non-cache step. The counts leave out elementwise work (norms,
activations, the blend), which weighs more in the cheap calls than in the full one, so time ratios are
likely to sit above these (on the H100, in fp16 with CUDA graphs, a SD 1.5 reuse call took 0.28 of a
keyframe call against 0.272 here).

The reuse call is also split by what its work reads. In every resnet, norm2/SiLU/conv2 run on the cached conv1
output plus the time embedding's projection, so they and the time embedding (and SDXL's added embedding) never
read the sample: work that could run beside the chain from the sample to the output (conv_in, the shortcuts
and resamplers, conv_out), or batched, where the compiled reuse graph runs it one convolution after another.
tests/test_passes.py checks the split on the graph itself. Writes benchmarks/results/bench_flops.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, append_csv, deepcache, environment, print_table
from diffusers import DDIMScheduler
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from models import build_unet
from torch.utils.flop_counter import FlopCounterMode

LATENTS = {"sd15": 64, "sdxl": 128}
TEXT = {"sd15": (77, 768), "sdxl": (77, 2048)}


def inputs(name: str, batch: int) -> tuple[torch.Tensor, dict]:
    latent = LATENTS[name]
    with torch.device("meta"):
        x = torch.randn(batch, 4, latent, latent)
        kwargs = {"encoder_hidden_states": torch.randn(batch, *TEXT[name])}
        if name == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, 6)}
    return x, kwargs


def counted(fn) -> dict[str, int]:  # noqa: ANN001 - any callable
    with FlopCounterMode(display=False) as counter:
        fn()
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def frdiff_skipped(unet: torch.nn.Module, flops: dict[str, int]) -> int:
    """FLOPs the reuse call reads from the cache: conv1 of every resnet, every transformer (not nested)."""
    root = type(unet).__name__
    skipped = 0
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            skipped += flops.get(f"{root}.{name}.conv1", 0)
        elif isinstance(module, Transformer2DModel):
            skipped += flops.get(f"{root}.{name}", 0)
    return skipped


def frdiff_sample_independent(unet: torch.nn.Module, flops: dict[str, int]) -> int:
    """FLOPs of the reuse call that never read the sample: the time embedding, an added embedding (SDXL's, of
    the text embeds and time ids) and, in every resnet, time_emb_proj and conv2 (on conv1's cached output plus
    that projection). Module names as FlopCounterMode reports them."""
    root = type(unet).__name__
    found = sum(flops.get(f"{root}.{name}", 0) for name in ("time_embedding", "add_embedding"))
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            found += flops.get(f"{root}.{name}.conv2", 0) + flops.get(f"{root}.{name}.time_emb_proj", 0)
    return found


def deepcache_shallow(unet: torch.nn.Module, x: torch.Tensor, kwargs: dict, branch: int) -> int:
    """FLOPs of DeepCache's call at a non-cache step (the full call at step 0 fills its cache first)."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    twin = deepcache(unet, scheduler, interval=50, branch=branch)  # a copy on the meta device: no memory
    twin(x, scheduler.timesteps[0], **kwargs)  # a CPU timestep: DeepCache reads its value
    return counted(lambda: twin(x, scheduler.timesteps[1], **kwargs))["Global"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["sd15", "sdxl"], choices=sorted(LATENTS))
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (CFG: 2 per image)")
    parser.add_argument("--branches", type=int, nargs="+", default=[0, 3], help="DeepCache cache_branch_id")
    parser.add_argument("--csv", default=str(RESULTS / "bench_flops.csv"))
    args = parser.parse_args()
    rows = []
    for name in args.configs:
        unet = build_unet(name, LATENTS[name], "meta")
        x, kwargs = inputs(name, args.batch)
        with torch.no_grad():
            flops = counted(lambda: unet(x, torch.tensor(500), **kwargs))  # noqa: B023 - called at once
            full = flops["Global"]
            rows.append({"config": name, "call": "full", "gflops": full / 1e9, "of_full": 1.0})
            reuse = full - frdiff_skipped(unet, flops)
            rows.append({"config": name, "call": "FRDiff reuse", "gflops": reuse / 1e9, "of_full": reuse / full})
            independent = frdiff_sample_independent(unet, flops)
            for call, part in (("FRDiff reuse: independent of the sample", independent),
                               ("FRDiff reuse: on the sample's path", reuse - independent)):
                rows.append({"config": name, "call": call, "gflops": part / 1e9, "of_full": part / full})
            for branch in args.branches:
                shallow = deepcache_shallow(unet, x, kwargs, branch)
                rows.append({"config": name, "call": f"DeepCache shallow, branch {branch}", "gflops": shallow / 1e9,
                             "of_full": shallow / full})
    print_table(rows, ["config", "call", "gflops", "of_full"], f"UNet FLOPs per call (batch {args.batch})")
    path = append_csv(Path(args.csv), [{**row, "batch": args.batch} for row in rows],
                      environment(torch.device("cpu")))
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
