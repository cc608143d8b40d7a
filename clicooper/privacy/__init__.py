"""Data-owner privacy: activation DP (mechanism and accounting apart) and secret label expansion.

See docs/privacy.md for the privacy model: what is protected, how, and what is not.
"""

from clicooper.privacy.accounting import (
    AccountantKind,
    ActivationAccountant,
    BudgetExceeded,
    calibrate_noise_multiplier,
    check_budget,
    compute_epsilon,
)
from clicooper.privacy.activation_dp import clip_and_noise, clip_per_sample, gaussian_noise_like
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
    "LabelCodebook",
    "LabelPolicy",
    "calibrate_noise_multiplier",
    "check_budget",
    "clip_and_noise",
    "clip_per_sample",
    "compute_epsilon",
    "gaussian_noise_like",
    "generate_secret",
    "load_secret",
    "save_secret_encrypted",
]
