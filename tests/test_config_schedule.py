"""FRDiffConfig validation and JSON, the step schedule's exact counts and weights, and step tracking."""

import pytest
import torch

from frdiff_compile import FRDiffConfig, StepKind, build_schedule, mix_weight
from frdiff_compile.steps import RECENT, StepTracker


@pytest.mark.parametrize(
    "field,value",
    [
        ("keyframe_interval", 0),
        ("keyframe_interval", 1.5),
        ("keyframes", (False, True)),
        ("keyframes", ()),
        ("mix_bias", float("nan")),
        ("mix_bias", 3.0),
        ("mix_slope", 0.0),
        ("max_cached_shapes", 0),
        ("max_calls_per_step", 0),
        ("max_calls_per_step", True),
        ("compile", "yes"),
        ("score_mixing", 1),
        ("cache_point", "shallow"),
        ("conv_layout", "channels_last"),  # a layout, not who picks it: convert the UNet for that
        ("compile_mode", "max-autotune-nocudagraphs"),  # a typo: torch's own list of modes decides
        ("compile_mode", 3),
        ("version", 99),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FRDiffConfig(**{field: value})


def test_config_json_round_trip():
    config = FRDiffConfig(keyframes=(True, False, True), mix_bias=0.3, compile=False, conv_layout="inductor")
    assert FRDiffConfig.from_json(config.to_json()) == config
    assert not config.same_graphs(FRDiffConfig(keyframes=(True, False, True), compile=False))  # the layout differs
    with pytest.raises(ValueError, match="malformed"):
        FRDiffConfig.from_json("{not json")
    with pytest.raises(ValueError, match="unknown FRDiffConfig fields"):
        FRDiffConfig.from_dict({"interval": 2})


def test_paper_schedule_counts():
    schedule = build_schedule(50, FRDiffConfig(keyframe_interval=2, mix_bias=0.5))
    assert schedule.counts() == {"full": 25, "reuse": 14, "skip": 11}, str(schedule)
    assert schedule.kinds[21] is StepKind.SKIP and schedule.kinds[23] is StepKind.REUSE
    assert schedule.weights[23] == pytest.approx(0.20)
    assert schedule.weights[27] == pytest.approx(0.80)
    assert mix_weight(22, 50, 0.5, 7.5) == pytest.approx(0.05)
    assert mix_weight(29, 50, 0.5, 7.5) == 1.0


def test_schedule_without_mixing_and_with_mask():
    pure = build_schedule(10, FRDiffConfig(keyframe_interval=3, score_mixing=False))
    assert [k.value for k in pure.kinds] == ["full", "reuse", "reuse"] * 3 + ["full"]
    assert set(pure.weights) == {1.0}
    assert pure.last_keyframes == (0, 0, 0, 3, 3, 3, 6, 6, 6, 9)
    mask = (True, False, False, True, True)
    masked = build_schedule(5, FRDiffConfig(keyframes=mask, score_mixing=False))
    assert [k is StepKind.FULL for k in masked.kinds] == list(mask)
    assert masked.last_keyframes == (0, 0, 0, 3, 4)
    with pytest.raises(ValueError, match="5 entries but this generation has 6 steps"):
        build_schedule(6, FRDiffConfig(keyframes=mask))


def test_score_mixing_defaults_to_the_cache_points_method():
    """FRDiff mixes scores; DeepCache does not (its shallow call is too cheap for no-call steps to pay for the
    quality they cost); an explicit setting wins either way, and is what JSON keeps."""
    counts = {cache: build_schedule(50, FRDiffConfig(cache_point=cache)).counts() for cache in ("features", "deep")}
    assert counts == {"features": {"full": 25, "reuse": 14, "skip": 11}, "deep": {"full": 25, "reuse": 25, "skip": 0}}
    mixed = FRDiffConfig(cache_point="deep", score_mixing=True)
    assert build_schedule(50, mixed).counts() == counts["features"]
    assert not FRDiffConfig(score_mixing=False).mixes_scores
    assert FRDiffConfig.from_json(mixed.to_json()) == mixed and FRDiffConfig.from_json(
        FRDiffConfig(cache_point="deep").to_json()).score_mixing is None


def test_m1_is_all_full():
    assert build_schedule(7, FRDiffConfig(keyframe_interval=1)).counts() == {"full": 7, "reuse": 0, "skip": 0}


def test_step_tracking_tells_interleaved_generations_from_new_ones():
    tracker = StepTracker()
    a, b = torch.arange(10, 0, -1), torch.arange(10, 0, -1)

    def where(timesteps, i):
        p = tracker.locate(timesteps[i])
        return p.index, p.new_generation, p.resumed, p.repeated

    assert where(a, 0) == (0, True, False, False)
    assert where(a, 1) == (1, False, False, False)
    assert where(a, 1) == (1, False, False, True)  # the same step again: a second call, not a generation
    assert where(b, 0) == (0, True, False, False)
    assert where(a, 2) == (2, True, True, False)  # a comes back past where it left off: resumed
    assert where(b, 1) == (1, True, True, False)
    assert where(a, 0) == (0, True, False, False)  # a from its start again: a new generation, not a resume
    others = [torch.arange(10, 0, -1) for _ in range(RECENT)]
    for other in others:  # enough schedules in between that a is forgotten
        tracker.locate(other[0])
    assert where(a, 1) == (1, True, False, False)
