"""The search space: derived from the model and plan, pinned and narrowed from pipelines.yaml."""

from __future__ import annotations

import optuna
import pytest
import torch

from compression_ops import ChannelPrune, Distill, OpData, QuantizeInt8, apply
from compression_ops.channel_prune import prune_groups
from tasks.config import PipelineConfig
from tasks.errors import ConfigError
from tasks.models import create_model
from tasks.search.space import SearchSpace

X = torch.randn(1, 1, 28, 28)


def _model():
    return create_model("resnet8", in_channels=1, num_classes=10, width=16)


def _cfg(plan=None, search=None, goal=None) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "p",
        "data": {"source": "synthetic"},
        "model": {"name": "resnet8"},
        "goal": goal or {"speedup": 3.0, "metric": "macs"},
        "compression": {"plan": plan or [{"op": "channel_prune"}, {"op": "quantize_int8"}]},
        "search": {"n_trials": 5, **(search or {})},
    })


def test_space_comes_from_the_model_and_plan() -> None:
    space = SearchSpace(_cfg(), _model(), X)
    roots = [g[0] for g in prune_groups(_model(), X)]
    assert len(roots) == 6  # resnet8: three residual groups (stem+block outputs) and three inner convs
    assert set(space.params) == {
        *(f"prune.scale.{r}" for r in roots), "int8.calibration", "distill.temperature", "distill.alpha", "finetune.lr"
    }
    plan, ft = space.build(space.defaults())
    prune, int8, kd = plan
    assert isinstance(prune, ChannelPrune) and prune.target_macs_reduction == 3.0
    assert set(prune.layer_scale) == set(roots)
    assert isinstance(int8, QuantizeInt8) and int8.calibration == "percentile"
    assert isinstance(kd, Distill) and ft["lr"] > 0


def test_plan_fields_pin_their_op() -> None:
    space = SearchSpace(_cfg(plan=[{"op": "channel_prune", "ratio": 0.3}, {"op": "quantize_int8", "calibration": "mse"}]),
                        _model(), X)
    assert not [n for n in space.params if n.startswith(("prune.", "int8."))]
    plan, _ = space.build(space.defaults())
    assert plan[0].ratio == 0.3 and plan[0].layer_scale is None and plan[1].calibration == "mse"


def test_other_ops_bring_their_parameters() -> None:
    space = SearchSpace(_cfg(plan=[{"op": "sparsify"}, {"op": "qat"}, {"op": "low_rank"}, {"op": "kmeans"}],
                             goal={"size_mb": 0.05}), _model(), X)
    names = set(space.params)
    assert {"sparsity", "lowrank.energy", "kmeans.bits"} <= names
    assert {n for n in names if n.startswith("bits.")} == {f"bits.{n}" for n in space.layers}
    point = space.defaults() | {"sparsity": 0.7, "bits.stem.0": 3, "kmeans.bits": 5, "lowrank.energy": 0.8}
    sparsify, qat, low_rank, kmeans, _ = space.build(point)[0]
    assert sparsify.sparsity == 0.7 and qat.per_layer_bits["stem.0"] == 3 and kmeans.bits == 5
    assert low_rank.energy == 0.8


def test_multi_objective_searches_the_ratio_too() -> None:
    space = SearchSpace(_cfg(search={"sampler": "nsga2"}), _model(), X)
    assert "prune.ratio" in space.params
    plan, _ = space.build(space.defaults() | {"prune.ratio": 0.4})
    assert plan[0].ratio == 0.4 and plan[0].target_macs_reduction is None


def test_pins_and_ranges_from_pipelines_yaml_hold_in_every_trial() -> None:
    overrides = {"finetune.lr": 0.01, "distill.temperature": [2.0, 3.0], "int8.calibration": {"choices": ["minmax"]}}
    space = SearchSpace(_cfg(search={"space": overrides}), _model(), X)
    assert space.params["finetune.lr"].is_fixed
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    for _ in range(20):
        trial = study.ask()
        point = space.suggest(trial)
        assert point["finetune.lr"] == 0.01 and "finetune.lr" not in trial.params
        assert 2.0 <= point["distill.temperature"] <= 3.0
        assert point["int8.calibration"] == "minmax"
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prune.ratio_typo": 0.3}, "no such parameter in this search; parameters: prune.scale.stem.0"),
        ({"finetune.lr": [0.1, 0.01]}, "a range is [low, high] with low < high"),
        ({"int8.calibration": [0, 1]}, "use {choices: [...]}"),
        ({"finetune.lr": [0.0, 0.1]}, "log scale, its low end must be > 0"),
        ({"int8.calibration": {"choice": ["mse"]}}, "a mapping must be {choices: [a, b, ...]}"),
        ({"int8.calibration": "bogus"}, "the pinned values or ranges make an invalid plan"),
    ],
)
def test_bad_overrides_name_the_parameter_and_the_fix(overrides, message) -> None:
    with pytest.raises(ConfigError, match="search.space") as err:
        SearchSpace(_cfg(search={"space": overrides}), _model(), X)
    assert message in str(err.value)


def test_a_range_end_outside_the_ops_limits_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pinned values or ranges make an invalid plan: sparsity=1.2"):
        SearchSpace(_cfg(plan=[{"op": "sparsify"}], search={"space": {"sparsity": [0.3, 1.2]}}, goal={"size_mb": 1}),
                    _model(), X)


@pytest.mark.parametrize(
    ("plan", "search", "goal", "message"),
    [
        ([{"op": "channel_prune", "importance": "bogus"}], {}, None, r"compression.plan\[0\] is invalid: importance='bogus'"),
        ([{"op": "channel_prune"}], {}, {"max_accuracy_drop": 1}, "prunes by how much"),
        ([{"op": "channel_prune"}, {"op": "distill"}], {}, None, r"plan\[1\]: distill is configured under finetune"),
    ],
)
def test_bad_plans_name_the_entry(plan, search, goal, message) -> None:
    with pytest.raises(ConfigError, match=message):
        SearchSpace(_cfg(plan=plan, search=search, goal=goal), _model(), X)


def test_a_pinned_shape_is_kept_and_only_the_total_solved() -> None:
    shape = {"stem.0": 0.5}
    space = SearchSpace(_cfg(plan=[{"op": "channel_prune", "layer_scale": shape}]), _model(), X)
    assert not [n for n in space.params if n.startswith("prune.")]
    (prune, _), _ = space.build(space.defaults())
    assert prune.layer_scale == shape and prune.target_macs_reduction == 3.0


def test_sensitivity_shapes_the_warm_start() -> None:
    model = _model()
    roots = [g[0] for g in prune_groups(model, X)]
    sens = {"scans": [{"kind": "channel_prune", "rows": [
        {"layer": r, "setting": 0.5, "drop": 10.0 if r == roots[0] else 1.0} for r in roots]}]}
    space = SearchSpace(_cfg(), model, X, sens)
    point = space.sensitivity_shaped()
    scales = {r: point[f"prune.scale.{r}"] for r in roots}
    assert scales[roots[0]] == min(scales.values()) < 1 < scales[roots[1]]  # the sensitive group is cut least
    shaped = SearchSpace(_cfg(search={"prune_shape": "sensitivity"}), model, X, sens)
    assert [n for n in shaped.params if n.startswith("prune.")] == ["prune.shape_power"]


def test_warm_start_tries_the_plan_the_search_replaces() -> None:
    from tasks.search.runner import warm_start_points

    model = _model()
    roots = [g[0] for g in prune_groups(model, X)]
    sens = {"scans": [{"kind": "channel_prune", "rows": [
        {"layer": r, "setting": 0.5, "drop": 10.0 if r == roots[0] else 1.0} for r in roots]}]}
    space = SearchSpace(_cfg(search={"space": {"finetune.lr": 0.02}}), model, X, sens)
    prev = {"run_id": "r0", "point": {f"prune.scale.{roots[0]}": 5.0, "no.such.param": 1}}
    points = warm_start_points(space, prev)
    assert [s for s, _ in points] == ["previous_run:r0", "sensitivity", "default"]
    assert all("finetune.lr" not in p for _, p in points)  # pinned values are not enqueued
    assert points[0][1][f"prune.scale.{roots[0]}"] == 2.0  # the previous best, clipped to this space
    default = points[2][1]
    assert {default[f"prune.scale.{r}"] for r in roots} == {1.0}  # uniform: every group at the solved ratio
    # without a scan or a previous run, only the default; a repeat is not tried twice
    assert [s for s, _ in warm_start_points(SearchSpace(_cfg(), model, X), None)] == ["default"]
    same = {"run_id": "r0", "point": space.defaults()}
    assert [s for s, _ in warm_start_points(SearchSpace(_cfg(), model, X), same)] == ["previous_run:r0"]


def test_layer_scale_shapes_a_cut_that_still_meets_the_target() -> None:
    model = _model().eval()
    roots = [g[0] for g in prune_groups(model, X)]
    shape = {r: (0.3 if r == "layers.2.conv1" else 1.5) for r in roots}
    res = apply(model, ChannelPrune(target_macs_reduction=3.0, layer_scale=shape), OpData(example=X))
    uniform = apply(model, ChannelPrune(target_macs_reduction=3.0), OpData(example=X))
    assert res.report["macs_reduction"] >= 3.0 and uniform.report["macs_reduction"] >= 3.0
    kept = res.model.layers[2].conv1.out_channels, uniform.model.layers[2].conv1.out_channels
    assert kept[0] > kept[1]  # the protected layer keeps more channels than under the uniform cut
    assert res.model(X).shape == (1, 10)


def test_samplers_and_pruners_follow_the_config() -> None:
    from tasks.search.study import pruner_for, sampler_for

    sc = _cfg().search
    assert type(sampler_for(sc, 0)).__name__ == "TPESampler" and type(pruner_for(sc)).__name__ == "MedianPruner"
    hb = _cfg(search={"pruner": "hyperband", "trial_epochs": 9}).search
    assert type(pruner_for(hb)).__name__ == "HyperbandPruner"
    nsga = _cfg(search={"sampler": "nsga2", "pruner": "median"}).search
    assert type(sampler_for(nsga, 0)).__name__ == "NSGAIISampler"
    assert type(pruner_for(nsga)).__name__ == "NopPruner"  # Optuna prunes single-objective studies only
    assert type(sampler_for(_cfg(search={"sampler": "random"}).search, 0)).__name__ == "RandomSampler"
    # workers sample from different seeds, so they do not propose the same first points
    study = optuna.create_study()
    a, b = (sampler_for(sc, w).sample_independent(study, study.ask(), "x", optuna.distributions.FloatDistribution(0, 1))
            for w in (0, 1))
    assert a != b


def test_regularize_search_lets_the_search_choose_how_to_make_the_net_ready() -> None:
    space = SearchSpace(_cfg(plan=[{"op": "channel_prune", "regularize": "search", "regularize_epochs": 2}]), _model(), X)
    p = space.params["prune.regularize"]
    assert p.kind == "categorical" and p.choices == ["none", "grow", "group_lasso"] and p.default == "none"
    assert space.build(space.defaults())[0][0].regularize is None
    prune = space.build(space.defaults() | {"prune.regularize": "grow"})[0][0]
    assert prune.regularize == "grow" and prune.regularize_epochs == 2 and prune.target_macs_reduction == 3.0
    # a method named in the plan is pinned: no parameter
    pinned = SearchSpace(_cfg(plan=[{"op": "channel_prune", "regularize": "grow"}]), _model(), X)
    assert "prune.regularize" not in pinned.params
    assert pinned.build(pinned.defaults())[0][0].regularize == "grow"


def test_regularize_search_without_a_search_names_the_fix() -> None:
    from tasks.plan import plan_from_config

    cfg = _cfg(plan=[{"op": "channel_prune", "regularize": "search"}], search={"n_trials": 0})
    with pytest.raises(ConfigError, match="regularize: search, but there is no search"):
        plan_from_config(cfg)


def test_steps_and_global_ranking_can_be_searched() -> None:
    entry = {"op": "channel_prune", "steps": "search", "global_ranking": "search"}
    space = SearchSpace(_cfg(plan=[entry]), _model(), X)
    assert space.params["prune.steps"].choices == [1, 2] and space.params["prune.global"].choices == [False, True]
    plain = space.build(space.defaults())[0][0]
    assert plain.steps == 1 and plain.global_ranking is False and plain.layer_scale  # the searched shape
    both = space.build(space.defaults() | {"prune.steps": 2, "prune.global": True})[0][0]
    assert both.steps == 2 and both.global_ranking is True and not both.layer_scale
    assert both.target_macs_reduction == 3.0


def test_searched_steps_need_a_macs_target_and_a_search() -> None:
    from tasks.plan import plan_from_config

    with pytest.raises(ConfigError, match="steps: search, but iterative pruning cuts towards a MACs target"):
        SearchSpace(_cfg(plan=[{"op": "channel_prune", "steps": "search"}], goal={"speedup": 2.0}), _model(), X)
    with pytest.raises(ConfigError, match="global_ranking: search, but there is no search"):
        plan_from_config(_cfg(plan=[{"op": "channel_prune", "global_ranking": "search"}], search={"n_trials": 0}))
