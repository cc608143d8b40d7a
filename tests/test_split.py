import pytest
import torch

from clicooper.models import (
    balanced_cuts,
    block_costs,
    build_model,
    plan_from_capacities,
    plan_from_cuts,
    split_model,
)


def test_split_by_cut_points_preserves_function():
    model = build_model("small-cnn", (1, 28, 28), 10)
    plan = plan_from_cuts([1, 2, 3], 5)
    segs = split_model(model, plan)
    assert len(segs) == 4 and plan.n_trainers == 3
    x = torch.randn(3, 1, 28, 28)
    y = x
    for s in segs:
        y = s(y)
    assert torch.equal(y, model(x))


@pytest.mark.parametrize("cuts", [[0, 2], [2, 2], [3, 1], [1, 5], [1.5]])
def test_inconsistent_cut_points_are_rejected(cuts):
    with pytest.raises(ValueError, match="cut points"):
        plan_from_cuts(cuts, 5)


def test_u_shaped_plan_needs_two_cuts():
    with pytest.raises(ValueError, match="at least 2"):
        plan_from_cuts([1], 5, u_shaped=True)
    assert plan_from_cuts([1, 4], 5, u_shaped=True).n_trainers == 1


def test_balanced_cuts_follow_capacity():
    costs = [1.0] * 12
    assert balanced_cuts(costs, [1, 1, 1], 0, 12) == [4, 8]
    assert balanced_cuts(costs, [2, 1, 1], 0, 12) == [6, 9]
    with pytest.raises(ValueError, match="at least one block"):
        balanced_cuts(costs, [1] * 5, 0, 4)


def test_capacity_plan_keeps_small_head_and_measures_flops():
    model = build_model("small-cnn", (1, 28, 28), 10)
    costs = block_costs(model, (1, 28, 28), "flops")
    assert costs[2] > costs[1] > costs[0]  # measured, growing with channel width
    plan = plan_from_capacities(model, (1, 28, 28), [1, 1, 1])
    assert plan.bounds[:2] == (0, 1) and plan.n_trainers == 3
    params = block_costs(model, (1, 28, 28), "params")
    assert params[3] == 64 * 7 * 7 * 128 + 128


def test_resnet_and_mlp_split():
    r = build_model("resnet-cifar", (3, 32, 32), 10)
    plan = plan_from_capacities(r, (3, 32, 32), [1, 3])
    segs = split_model(r.eval(), plan)
    x = torch.randn(2, 3, 32, 32)
    y = x
    for s in segs:
        y = s(y)
    assert torch.allclose(y, r(x))
    m = build_model("mlp", (30,), 2)
    assert plan_from_capacities(m, (30,), [1, 1]).n_trainers == 2
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", (3, 32, 32), 10)
