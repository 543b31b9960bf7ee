"""`sp`: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019), RepDistiller form.

G = row-L2-normalised Q Q^T, Q the B x (C*H*W) flattened feature map; the loss is ||G_t - G_s||_F^2 / B^2.
L = ce_weight * CE + sp_weight * loss, on the last stage output of each network by default.
CIFAR-100: sp_weight 3000, CE 1 (RepDistiller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillab.methods.base import MethodOptions, register
from distillab.methods.layer_pair import LayerPairMethod
from distillab.roles import FeatureInfo


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    q = feature.float().flatten(1)
    return F.normalize(q @ q.t(), dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of the normalised batch similarity matrices, divided by B^2."""
    batch = f_s.shape[0]
    return (similarity_matrix(f_t) - similarity_matrix(f_s)).pow(2).sum() / batch**2


class SPOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    sp_weight: float = Field(3000.0, ge=0)
    student_layer: str | None = Field(None, description="tap name; default: the student's last stage output")
    teacher_layer: str | None = Field(None, description="tap name; default: the teacher's last stage output")


@register("sp")
class SP(LayerPairMethod):
    Options = SPOptions

    @staticmethod
    def layer_role(info: FeatureInfo) -> str:
        return info.stages[-1].name

    def feature_terms(self, f_s: torch.Tensor, f_t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sp": self.opts.sp_weight * sp_loss(f_s, f_t)}
