"""Auto-FR search on the shipped digits model (short runs) and keyframe policies."""

import json

import pytest
import torch
from conftest import make_unet, max_rel_error

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.autofr import digits_problem, search, uniform_mask
from frdiff_compile.digits import load_digits_model
from frdiff_compile.policy import KeyframePolicy, unet_fingerprint

STEPS = 6


@pytest.fixture(scope="module")
def digits():
    return load_digits_model()


def test_search_returns_a_valid_mask_and_the_regulariser_works(digits, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch reference; see the text-embedding test
    unet, embedding = digits
    # A large learning rate lets a few iterations move the logits across 0.
    weak = search(unet, digits_problem(embedding), STEPS, iterations=3, lr=0.2, weight=0.0, progress=False)
    strong = search(unet, digits_problem(embedding), STEPS, iterations=3, lr=0.2, weight=10.0, progress=False)
    for result in (weak, strong):
        policy = result.policy
        assert len(policy.keyframes) == STEPS and policy.keyframes[0], policy
        assert len(policy.loss_history) == 3 and all(torch.isfinite(torch.tensor(policy.loss_history)))
    assert strong.policy.num_keyframes < weak.policy.num_keyframes, (weak.policy.keyframes, strong.policy.keyframes)
    assert all(p.requires_grad for p in unet.parameters()), "search must restore the UNet's requires_grad flags"


def test_target_keyframes_is_met_exactly_and_never_loses_to_uniform_on_validation(digits, monkeypatch):
    # The search's logic, on the blend's torch reference: the interpreted Triton kernel costs minutes
    # here, and the other searches in this file run it.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    unet, embedding = digits
    result = search(unet, digits_problem(embedding, batch=2), STEPS, iterations=3, target_keyframes=3,
                    validation_draws=2, progress=False)
    assert result.policy.num_keyframes == 3 and result.policy.keyframes[0]
    # The search starts on the uniform mask and keeps the best mask it validated.
    assert result.validation_mse <= result.start_validation_mse, result
    assert uniform_mask(STEPS, 3).tolist() == [True, False, True, False, True, False]
    assert uniform_mask(50, 17).tolist() == [i % 3 == 0 for i in range(50)]  # the M=3 mask
    assert int(uniform_mask(50, 20).sum()) == 20
    with pytest.raises(ValueError, match="target_keyframes"):
        search(unet, digits_problem(embedding), STEPS, iterations=1, target_keyframes=STEPS + 1, progress=False)
    with pytest.raises(ValueError, match="validation_draws must be >= 1"):
        search(unet, digits_problem(embedding), STEPS, iterations=1, target_keyframes=2, validation_draws=0,
               progress=False)


def test_policy_round_trip_and_use(tmp_path, digits):
    unet, embedding = digits
    policy = KeyframePolicy(4, (True, False, True, False), unet_fingerprint(unet), {"mix_bias": 0.3}, (0.5, 0.25))
    path = policy.save(tmp_path / "p.json")
    assert KeyframePolicy.load(path) == policy
    config = FRDiffConfig.from_policy(str(path))
    assert config.keyframes == policy.keyframes and config.mix_bias == 0.3
    fr = frdiff_compile.optimize(unet, config)
    from frdiff_compile.digits import DigitsPipeline

    DigitsPipeline(fr, embedding)([3, 5], 4)
    assert (fr.stats.full_calls, fr.stats.reuse_calls + fr.stats.skip_steps) == (2, 2)
    with pytest.raises(ValueError, match="4 entries but this generation has 6 steps"):
        DigitsPipeline(fr, embedding)([3], 6)


def test_a_search_under_the_deep_cache_point_records_it_in_the_policy(tmp_path, digits, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch reference; see the text-embedding test
    unet, embedding = digits
    config = FRDiffConfig(cache_point="deep")
    result = search(unet, digits_problem(embedding), STEPS, iterations=2, lr=0.2, weight=0.0, config=config,
                    progress=False)
    assert result.policy.settings["cache_point"] == "deep" and result.policy.settings["score_mixing"] is False
    loaded = FRDiffConfig.from_policy(str(result.policy.save(tmp_path / "deep.json")))
    assert (loaded.cache_point, loaded.mixes_scores) == ("deep", False)
    with pytest.raises(ValueError, match="searched with cache_point='deep', not 'features'"):
        FRDiffConfig.from_policy(str(tmp_path / "deep.json"), cache_point="features")
    older = KeyframePolicy(STEPS, result.policy.keyframes, unet_fingerprint(unet))  # no cache point recorded
    with pytest.raises(ValueError, match="searched with cache_point='features'"):
        FRDiffConfig.from_policy(str(older.save(tmp_path / "older.json")), cache_point="deep")
    fr = frdiff_compile.optimize(unet, loaded)
    from frdiff_compile.digits import DigitsPipeline

    DigitsPipeline(fr, embedding)([3, 5], STEPS)
    (entry,) = fr.graph_entries()
    assert [p.kind for p in entry.plan.points] == ["deep_feature"] and fr.stats.skip_steps == 0


def test_refused_policies(tmp_path, digits):
    unet, _ = digits
    good = KeyframePolicy(3, (True, False, True), unet_fingerprint(unet))
    path = good.save(tmp_path / "p.json")
    with pytest.raises(ValueError, match="config fingerprint"):
        frdiff_compile.optimize(make_unet("sd15"), FRDiffConfig.from_policy(str(path)))
    cases = {
        "bad.json": ("{not json", "not valid JSON"),
        "list.json": ("[1, 2]", "must hold a JSON object"),
        "version.json": (json.dumps({**json.loads(good.to_json()), "format_version": 9}), "format_version 9"),
        "short.json": (json.dumps({**json.loads(good.to_json()), "num_steps": 5}), "3 keyframe entries for num_steps=5"),
        "missing.json": (json.dumps({"format_version": 1}), "lacks"),
        "first.json": (json.dumps({**json.loads(good.to_json()), "keyframes": [0, 1, 1]}), "start with True"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            KeyframePolicy.load(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        KeyframePolicy.load(tmp_path / "absent.json")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_search_on_text_embeddings_of_a_tiny_sd_unet(memory_format, monkeypatch):
    from conftest import TEXT_DIM
    from diffusers import DDIMScheduler

    from frdiff_compile.autofr import embeddings_problem

    # channels_last: the memory the search blends with each cache point must share its layout, so that
    # case runs the interpreted Triton kernel, which refuses mismatched layouts; the other runs the blend's
    # torch reference (the interpreter costs seconds per step here).
    if memory_format == torch.contiguous_format:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    unet = make_unet("sd15").to(memory_format=memory_format)
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 7, TEXT_DIM, generator=g), torch.randn(2, 7, TEXT_DIM, generator=g)
    problem = embeddings_problem(uncond, cond, (4, 8, 8), DDIMScheduler(clip_sample=False), guidance_scale=3.0)
    result = search(unet, problem, 5, iterations=2, target_keyframes=2, progress=False)
    assert result.policy.num_keyframes == 2 and result.policy.unet_fingerprint == unet_fingerprint(unet)


def test_the_budgeted_search_under_a_reuse_cost_never_tries_a_costlier_mask(monkeypatch):
    # At 5 steps with b=0.5, steps 1-2 are no-call steps and 3-4 reuse steps: moving the keyframe at 3 to 1
    # trades a free step for a reuse call. Every candidate is accepted here (a falling validation score), so
    # only the cost cap keeps the search from such moves.
    from conftest import TEXT_DIM
    from diffusers import DDIMScheduler

    from frdiff_compile import autofr

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the blend's torch reference: seconds faster
    tried = []

    def score(self, mask):
        tried.append(mask.clone())
        return 1.0 / len(tried)

    monkeypatch.setattr(autofr._Validation, "score", score)
    unet = make_unet("sd15", layers_per_block=1)
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(1, 7, TEXT_DIM, generator=g), torch.randn(1, 7, TEXT_DIM, generator=g)
    problem = autofr.embeddings_problem(uncond, cond, (4, 8, 8), DDIMScheduler(clip_sample=False))
    reuse_cost = 0.5
    autofr.search(unet, problem, 5, iterations=4, target_keyframes=2, reuse_cost=reuse_cost, progress=False)
    calls = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])  # lambda > 0 at steps 3 and 4
    costs = [float(m.sum() + reuse_cost * ((1 - m) * calls).sum()) for m in tried]
    assert len(tried) > 1 and max(costs) <= costs[0], costs  # tried[0] is the uniform start
    with pytest.raises(ValueError, match="reuse_cost"):
        autofr.search(unet, problem, 5, reuse_cost=0.5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction, clip", [("epsilon", False), ("epsilon", True), ("v_prediction", False),
                                              ("sample", True)])
def test_the_search_steps_as_diffusers_ddim_does(spacing, prediction, clip):
    # The search writes DDIM out (per-step checkpointing needs a stateless step). Its previous timestep is
    # diffusers': t - T // N, not the schedule's next entry, which differs under "trailing" and "linspace"
    # spacing (before: 9% off after 30 trailing steps, 28% under linspace, so the mask was tuned for
    # another sampler than the pipeline's). With clip_sample only x0 is clipped, as pipelines step.
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from frdiff_compile.autofr import ddim_step

    scheduler = DDIMScheduler(clip_sample=clip, timestep_spacing=spacing, prediction_type=prediction,
                              set_alpha_to_one=False)
    scheduler.set_timesteps(30)
    x = y = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(torch.sin(3 * x + i), t, x).prev_sample
        y = ddim_step(scheduler, torch.sin(3 * y + i), int(t), y)
    assert max_rel_error(y, x) < 1e-5
    with pytest.raises(ValueError, match="thresholding"):
        ddim_step(DDIMScheduler(thresholding=True), x, 999, x)
    with pytest.raises(ValueError, match="DDIM.*got EulerDiscreteScheduler"):
        ddim_step(EulerDiscreteScheduler(), x, 999, x)


def test_tune_command_writes_a_policy(tmp_path, capsys, monkeypatch):
    from frdiff_compile.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the command, on the blend's torch reference

    out = tmp_path / "policy.json"
    assert main(["tune", "--steps", "4", "--iterations", "2", "--target-keyframes", "2", "--reuse-cost", "0.3",
                 "--out", str(out)]) == 0
    assert KeyframePolicy.load(out).num_keyframes == 2 and KeyframePolicy.load(out).settings["reuse_cost"] == 0.3
    assert "2 of 4 steps are keyframes" in capsys.readouterr().out
    assert main(["tune", "--steps", "4", "--target-keyframes", "9"]) == 2
    assert main(["tune", "--steps", "4", "--reuse-cost", "0.3"]) == 2  # a cost cap needs a keyframe budget
