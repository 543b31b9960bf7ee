"""`pkt`: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer"
(ECCV 2018), RepDistiller form.

On L2-normalised pooled vectors (eps 1e-7), cosine similarities are mapped to [0, 1] by (s + 1) / 2 and
normalised per row into conditional distributions P (student) and Q (teacher); the loss is
mean over all B x B entries of Q * log((Q + eps) / (P + eps)).
L = ce_weight * CE + pkt_weight * loss. CIFAR-100: pkt_weight 30000, CE 1 (RepDistiller).
"""

from __future__ import annotations

import torch
from pydantic import Field

from distillab.methods.base import MethodOptions, register
from distillab.methods.layer_pair import LayerPairMethod
from distillab.roles import FeatureInfo

_EPS = 1e-7


def conditional_similarity(feature: torch.Tensor) -> torch.Tensor:
    """Row-normalised (cosine + 1) / 2 of the batch's vectors."""
    v = feature.float().flatten(1)
    v = v / (v.norm(dim=1, keepdim=True) + _EPS)
    similarity = (v @ v.t() + 1) / 2
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    p_s, p_t = conditional_similarity(f_s), conditional_similarity(f_t)
    return (p_t * torch.log((p_t + _EPS) / (p_s + _EPS))).mean()


class PKTOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    pkt_weight: float = Field(30000.0, ge=0)
    student_layer: str | None = Field(None, description="tap name; default: the student's pooled vector")
    teacher_layer: str | None = Field(None, description="tap name; default: the teacher's pooled vector")


@register("pkt")
class PKT(LayerPairMethod):
    Options = PKTOptions

    @staticmethod
    def layer_role(info: FeatureInfo) -> str:
        return info.pooled

    def feature_terms(self, f_s: torch.Tensor, f_t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pkt": self.opts.pkt_weight * pkt_loss(f_s, f_t)}
