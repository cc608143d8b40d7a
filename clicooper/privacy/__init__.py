"""Data-owner privacy: activation DP and the head's DP-SGD (mechanisms and accounting apart), and
secret label expansion.

See docs/privacy.md for the privacy model: what is protected, how, and what is not.
"""

from clicooper.privacy.accounting import (
    AccountantKind,
    ActivationAccountant,
    BudgetExceeded,
    calibrate_end_to_end,
    calibrate_noise_multiplier,
    check_budget,
    compute_epsilon,
    end_to_end_event,
    event_epsilon,
)
from clicooper.privacy.activation_dp import clip_and_noise, clip_per_sample, gaussian_noise_like
from clicooper.privacy.dp_sgd import DpSgdPlan, dp_sgd_train, secure_generator
from clicooper.privacy.labels import (
    DecodeMethod,
    LabelCodebook,
    LabelPolicy,
    generate_secret,
    load_secret,
    save_secret_encrypted,
)

__all__ = [
    "AccountantKind",
    "ActivationAccountant",
    "BudgetExceeded",
    "DecodeMethod",
    "DpSgdPlan",
    "LabelCodebook",
    "LabelPolicy",
    "calibrate_end_to_end",
    "calibrate_noise_multiplier",
    "check_budget",
    "clip_and_noise",
    "clip_per_sample",
    "compute_epsilon",
    "dp_sgd_train",
    "end_to_end_event",
    "event_epsilon",
    "gaussian_noise_like",
    "generate_secret",
    "load_secret",
    "save_secret_encrypted",
    "secure_generator",
]
