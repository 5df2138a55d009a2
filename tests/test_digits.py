"""The shipped digits model, the quality metrics, the training smoke run and the demo command."""

import math

import pytest
import torch
from safetensors.torch import load_file

from frdiff_compile.cli import main
from frdiff_compile.digits import DigitsPipeline, load_digits_model
from frdiff_compile.digits.train import digits_dataset, train
from frdiff_compile.quality import DigitsJudge, frechet_distance, psnr, sqnr

REFERENCE = __import__("pathlib").Path(__file__).parent / "data" / "digits_reference.safetensors"


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge()


def test_shipped_model_reproduces_the_stored_sample():
    unet, embedding = load_digits_model()
    stored = load_file(str(REFERENCE))
    images = DigitsPipeline(unet, embedding)(stored["labels"].tolist(), 10, 1.5, seed=0)
    err = (images - stored["images"]).abs().max().item()
    assert err < 1e-4, f"shipped model drifted from the stored 10-step sample by {err} (fp32, CPU)"


def test_metrics_on_known_inputs(judge):
    ref = torch.zeros(4, 1, 16, 16)
    assert psnr(ref, ref) == math.inf and sqnr(ref + 1, ref + 1) == math.inf
    assert psnr(ref + 0.1, ref) == pytest.approx(10 * math.log10(4 / 0.01))
    assert sqnr(torch.full((8,), 1.1), torch.ones(8)) == pytest.approx(20.0)
    import numpy as np

    mu, sigma = np.zeros(3), np.eye(3)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu + 1, sigma, mu, sigma) == pytest.approx(3.0)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])  # commuting: sum of (sqrt(a) - sqrt(b))^2
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(1.0 + 1.0 + 9.0)
    # Non-commuting covariances: the textbook formula through scipy's matrix square root (well conditioned here).
    from scipy import linalg

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    textbook = np.trace(s1) + np.trace(s2) - 2.0 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(textbook, rel=1e-9)
    # Fewer samples than features (singular covariances, as a small sample gives): finite, and 0 against itself.
    few_a, few_b = (np.cov(rng.normal(size=(5, 20)), rowvar=False) for _ in range(2))
    zeros = np.zeros(20)
    # (abs: the null space's rounding-level eigenvalues, ~1e-16 each, have square roots of ~1e-8; scipy's sqrtm
    # of the product gives the same -6e-7 here)
    assert frechet_distance(zeros, few_a, zeros, few_a) == pytest.approx(0.0, abs=1e-6 * np.trace(few_a))
    assert 0.0 < frechet_distance(zeros, few_a, zeros, few_b) < math.inf
    real, labels = digits_dataset()
    assert judge.accuracy(real[:500], labels[:500]) > 0.95, "the judge must recognise real digits"
    assert judge.fid_proxy(real[::3]) < 0.2 * judge.fid_proxy(torch.rand(600, 1, 16, 16) * 2 - 1)


def test_training_smoke_run_writes_a_loadable_model(tmp_path):
    summary = train(steps=3, out=tmp_path, batch=16, log_every=1)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    unet, embedding = load_digits_model(tmp_path)
    images = DigitsPipeline(unet, embedding)([1, 7], 2)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_demo_writes_png_and_table(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--steps", "8", "--rows", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and out.stat().st_size > 0
    for column in ("ms/image", "speedup", "PSNR dB", "accuracy", "full/reuse/skip", "frdiff M=2", "4/2/2"):
        assert column in printed, f"{column!r} missing from the demo table:\n{printed}"
    # DeepCache's cache point: no score mixing by default, so every non-keyframe step is a reuse call.
    assert main(["demo", "--steps", "8", "--rows", "1", "--cache-point", "deep", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "frdiff M=2, deep cache point" in printed and "4/4/0" in printed, printed


def test_demo_on_a_saved_tiny_pipeline(tmp_path, capsys, sd_pipe):
    folder = tmp_path / "tiny-sd"
    sd_pipe.save_pretrained(folder)
    out = tmp_path / "sd.png"
    args = ["demo", "--model", str(folder), "--prompt", "a cat", "--steps", "6", "--size", "16", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "PSNR dB" in printed and "frdiff M=2" in printed


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--model", "/nonexistent/folder"], "no such folder"),
        (["demo", "--steps", "0"], "must be >= 1"),
        (["demo", "--bias", "9"], "mix_bias"),
        (["demo", "--cache-point", "shallow"], "invalid choice"),
        (["demo", "--model", "."], "not a diffusers pipeline folder"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_demo_bad_arguments_get_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
