"""`rkd`: Park, Kim, Lu & Cho, "Relational Knowledge Distillation" (CVPR 2019), RepDistiller form.

On pooled vectors: distance loss = smooth-L1 between the pairwise Euclidean distance matrices, each divided
by the mean of its non-zero entries; angle loss = smooth-L1 between the cosines of the angles of all
triplets (e_i - e_j, e_k - e_j). rkd = distance_weight * distance + angle_weight * angle.
L = ce_weight * CE + rkd_weight * rkd. CIFAR-100: distance 25, angle 50, rkd_weight 1, CE 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.methods.base import MethodOptions, register
from distillab.methods.layer_pair import LayerPairMethod
from distillab.roles import FeatureInfo


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """B x B Euclidean distances (squared distances clamped at eps before the root), zero diagonal."""
    squared = e.pow(2).sum(dim=1)
    d = (squared[:, None] + squared[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """The distances divided by the mean of the positive ones (d >= 0: their sum over their count, which keeps
    the shapes static under torch.compile)."""
    d = pairwise_distances(e)
    return d / (d.sum() / (d > 0).sum())


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """Cosines of the angles at every vertex j between e_i - e_j and e_k - e_j, flattened (B^3)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # diff[j, i] = e_i - e_j, unit length
    return (diff @ diff.transpose(1, 2)).flatten()


def rkd_terms(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance loss, angle loss), unweighted."""
    s, t = f_s.float().flatten(1), f_t.float().flatten(1)
    with torch.no_grad():
        t_distance, t_angle = normalised_distances(t), triplet_angles(t)
    return F.smooth_l1_loss(normalised_distances(s), t_distance), F.smooth_l1_loss(triplet_angles(s), t_angle)


class RKDOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    rkd_weight: float = Field(1.0, ge=0)
    distance_weight: float = Field(25.0, ge=0)
    angle_weight: float = Field(50.0, ge=0)
    student_layer: str | None = Field(None, description="tap name; default: the student's pooled vector")
    teacher_layer: str | None = Field(None, description="tap name; default: the teacher's pooled vector")


@register("rkd")
class RKD(LayerPairMethod):
    Options = RKDOptions

    @staticmethod
    def layer_role(info: FeatureInfo) -> str:
        return info.pooled

    def feature_terms(self, f_s: torch.Tensor, f_t: torch.Tensor) -> dict[str, torch.Tensor]:
        distance, angle = rkd_terms(f_s, f_t)
        o = self.opts
        return {"distance": o.rkd_weight * o.distance_weight * distance, "angle": o.rkd_weight * o.angle_weight * angle}
