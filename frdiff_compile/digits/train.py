"""Train the shipped digits model (deterministic given --seed).

    python -m frdiff_compile.digits.train                       # the shipped run: writes digits/weights/
    python -m frdiff_compile.digits.train --steps 5 --out /tmp/x # smoke run

DDPM epsilon objective on scikit-learn's 8x8 digits upsampled to 16x16 in [-1, 1], cosine betas, AdamW
with linear warm-up and cosine decay, 10% of labels dropped to NULL_LABEL for classifier-free guidance,
and an exponential moving average of the weights (the EMA weights are what is saved).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from .model import IMAGE_SIZE, MODEL_DIR, NULL_LABEL, LabelEmbedding, digits_unet_config

logger = logging.getLogger(__name__)


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as (N, 1, 16, 16) images in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images, torch.tensor(data.target, dtype=torch.long)


def train(steps: int, out: Path, seed: int = 0, batch: int = 128, lr: float = 2e-3, log_every: int = 250) -> dict:
    torch.manual_seed(seed)
    images, labels = digits_dataset()
    unet = UNet2DConditionModel(**digits_unet_config())
    embedding = LabelEmbedding()
    ema_unet, ema_embedding = copy.deepcopy(unet).eval(), copy.deepcopy(embedding).eval()
    params = list(unet.parameters()) + list(embedding.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, min(200, steps // 10))
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    generator = torch.Generator().manual_seed(seed)
    start, history = time.time(), []
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch,), generator=generator)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(batch, generator=generator) < 0.1] = NULL_LABEL
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        xt = noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=embedding(y)).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_embedding, embedding)):
                for pe, p in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(p, 1 - decay)
        history.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = history[-log_every:]
            logger.info("step %d/%d loss %.4f (%.0f s)", step + 1, steps, sum(recent) / len(recent), time.time() - start)
    out.mkdir(parents=True, exist_ok=True)
    ema_unet.save_pretrained(out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in ema_embedding.state_dict().items()}, str(out / "label_embedding.safetensors"))
    summary = {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "seconds": round(time.time() - start, 1),
               "final_loss": sum(history[-100:]) / len(history[-100:])}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the shipped digits model.")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = train(args.steps, args.out, args.seed, args.batch, args.lr)
    logger.info("saved to %s: %s", args.out, summary)


if __name__ == "__main__":
    main()
