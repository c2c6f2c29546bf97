"""Losses as small modules (no Ray)."""
from lbr_ray.losses.distributed import all_gather_with_grad
from lbr_ray.losses.ib_generative import IBGenerativeLoss
from lbr_ray.losses.info_nce import InfoNCELoss

__all__ = ["IBGenerativeLoss", "InfoNCELoss", "all_gather_with_grad"]
