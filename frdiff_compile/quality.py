"""Quality metrics, one module for the tests, the demo and the quality harness.

- `psnr` / `sqnr`: a sample against the full-compute sample from the same noise and label (higher is
  closer; `inf` when identical). PSNR uses the image range [-1, 1] (peak-to-peak 2).
- `DigitsJudge`: fit once on scikit-learn's real digits, deterministically.
  - `accuracy`: share of generated digits that a logistic-regression classifier (fit on all 1797 real
    digits, 8x8 pixels) assigns to the label they were generated for.
  - `fid_proxy`: the Frechet distance between Gaussians fit to PCA features (20 components, fit on the real
    digits) of generated and of real digits. Like FID it compares feature statistics, not single samples;
    unlike FID its features come from a tiny linear model, so only compare values measured here, with the
    same sample count (a finite sample of real digits itself scores above 0).
  Generated 16x16 images are judged at the real digits' 8x8 resolution (2x2 average pooling), and the
  real digits go through the same 8 -> 16 -> 8 round trip, so both sides see identical preprocessing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    mse = F.mse_loss(x.double(), reference.double()).item()
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def sqnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    noise = (x.double() - reference.double()).square().sum().item()
    signal = reference.double().square().sum().item()
    return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + tr(S1) + tr(S2) - 2·tr((S1·S2)^½), for covariances S1, S2 (symmetric, PSD).

    tr((S1·S2)^½) is the sum of the square roots of the eigenvalues of S1^½·S2·S1^½, a symmetric PSD matrix
    similar to S1·S2, so two symmetric eigendecompositions give it, singular covariances included. Not scipy's
    `sqrtm` of the product, as FID code often writes it: its `disp` argument, which kept it from printing on a
    singular product, was removed in scipy 1.18 (the release Python 3.12 installs), and the unsymmetric
    square root can come back complex or non-finite where the covariances are rank-deficient."""
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
    inner = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


class DigitsJudge:
    """Classifier and feature extractor fit on the real digits; deterministic, built in about a second."""

    def __init__(self, components: int = 20) -> None:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        from .digits.train import digits_dataset

        images, labels = digits_dataset()
        real = self._pixels(images)
        self.classifier = LogisticRegression(max_iter=5000).fit(real, labels.numpy())
        self.pca = PCA(n_components=components, svd_solver="full").fit(real)
        features = self.pca.transform(real)
        self.real_mu, self.real_sigma = features.mean(0), np.cov(features, rowvar=False)
        self.real_images, self.real_labels = images, labels

    @staticmethod
    def _pixels(images: torch.Tensor) -> np.ndarray:
        """(B, 1, 16, 16) in [-1, 1] -> (B, 64) in [0, 16], the real digits' 8x8 scale."""
        small = F.avg_pool2d(images.detach().float().cpu().clamp(-1, 1), 2)
        return ((small + 1.0) * 8.0).reshape(small.shape[0], -1).numpy()

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.predict(self._pixels(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())

    def fid_proxy(self, images: torch.Tensor) -> float:
        if images.shape[0] < 2:
            raise ValueError(f"fid_proxy needs at least 2 images, got {images.shape[0]}")
        features = self.pca.transform(self._pixels(images))
        return frechet_distance(features.mean(0), np.cov(features, rowvar=False), self.real_mu, self.real_sigma)
