"""Model zoo and model segmentation."""

from clicooper.models.split import (
    SplitPlan,
    balanced_cuts,
    block_costs,
    plan_from_capacities,
    plan_from_cuts,
    split_model,
)
from clicooper.models.zoo import MODELS, build_model, mlp, resnet_cifar, small_cnn

__all__ = [
    "MODELS",
    "SplitPlan",
    "balanced_cuts",
    "block_costs",
    "build_model",
    "mlp",
    "plan_from_capacities",
    "plan_from_cuts",
    "resnet_cifar",
    "small_cnn",
    "split_model",
]
