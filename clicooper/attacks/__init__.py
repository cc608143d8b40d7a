"""Attacks as first-class code (docs/attacks.md): label inference, input reconstruction, model extraction.

Library functions on tensors and modules; wiring them to trained jobs lives with the evaluation suite.
"""

from clicooper.attacks.clustering import ClusteringResult, clustering_label_attack, clustering_label_attacks
from clicooper.attacks.extraction import (
    ExtractionResult,
    complete_model,
    label_free_output_attack,
    scratch_baseline,
)
from clicooper.attacks.inversion import (
    blackbox_inversion,
    clip_per_sample,
    default_decoder,
    total_variation,
    train_inverse_decoder,
    whitebox_inversion,
)
from clicooper.attacks.metrics import SSIM_SETTINGS, chance_advantage, psnr_batch, ssim_batch

__all__ = [
    "SSIM_SETTINGS",
    "ClusteringResult",
    "ExtractionResult",
    "blackbox_inversion",
    "chance_advantage",
    "clip_per_sample",
    "clustering_label_attack",
    "clustering_label_attacks",
    "complete_model",
    "default_decoder",
    "label_free_output_attack",
    "psnr_batch",
    "scratch_baseline",
    "ssim_batch",
    "total_variation",
    "train_inverse_decoder",
    "whitebox_inversion",
]
