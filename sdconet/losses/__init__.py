"""Training losses: Hungarian matcher, DINO set criterion, saliency targets + loss, SR loss (docs/losses.md)."""
from sdconet.losses.criterion import SetCriterion
from sdconet.losses.matcher import HungarianMatcher
from sdconet.losses.saliency_targets import count_positives, saliency_loss, saliency_targets, token_centers_hr
from sdconet.losses.sr_loss import sr_l1_loss

__all__ = ["SetCriterion", "HungarianMatcher", "saliency_targets", "saliency_loss", "count_positives",
           "token_centers_hr", "sr_l1_loss"]
