"""`crd`: Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020), RepDistiller form.

The pooled penultimate vectors of student and teacher are embedded (Linear to `feat_dim`, L2-normalised).
Two memory banks (one row per training image, one bank per embedding space) hold momentum averages of
past embeddings. For each image, its own row is the positive and `num_negatives` rows of images of other
classes are the negatives ("exact" mode; drawn without replacement when enough exist). Scores are
exp(v . m / T) / Z, with Z estimated once on the first batch as mean(exp(.)) * N. The NCE loss with noise
P_n = 1/N is taken symmetrically (student embedding vs teacher bank, teacher embedding vs student bank)
and summed. Banks are updated at the batch's rows: m <- normalize(momentum * m + (1 - momentum) * v).

L = ce_weight * CE + kd_weight * KD_T + crd_weight * L_CRD. CIFAR-100: feat_dim 128, 16384 negatives,
T_nce 0.07, momentum 0.5, crd_weight 0.8, kd_weight 0 (CRD) or 1 (CRD+KD).

The method needs each image's training-set index (`TrainSetIndices`); the trainer supplies it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillab.errors import ConfigError
from distillab.losses import kd_loss, nce_loss
from distillab.methods.base import Method, MethodOptions, register
from distillab.methods.capabilities import TrainSetIndices, missing_input
from distillab.roles import roles


class Embed(nn.Module):
    """Linear(d -> feat_dim), then L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1).float()), dim=1)


def sample_contrast_indices(indices: torch.Tensor, labels: torch.Tensor, train_labels: torch.Tensor,
                            num_negatives: int) -> torch.Tensor:
    """B x (1 + K) bank rows: column 0 the sample itself, then K rows of other-class images drawn uniformly,
    without replacement where the anchor's class leaves at least K such images, with replacement otherwise.
    Branch-free (a compiled step neither breaks nor syncs): a short row's K draws are uniform picks among its
    first m columns, which are exactly its m allowed rows."""
    allowed = train_labels[None, :] != labels[:, None]  # B x N
    keys = torch.rand(allowed.shape, device=allowed.device).masked_fill_(~allowed, 2.0)  # same class: last
    negatives = keys.topk(num_negatives, dim=1, largest=False).indices
    count = allowed.sum(dim=1, keepdim=True)  # B x 1
    picks = (torch.rand(negatives.shape, device=negatives.device) * count).long().clamp_(max=num_negatives - 1)
    with_replacement = negatives.gather(1, picks)
    negatives = torch.where(count < num_negatives, with_replacement, negatives)
    return torch.cat([indices[:, None], negatives], dim=1)


class ContrastMemory(nn.Module):
    """The two memory banks (N x dim) and the two normalising constants Z (negative until set)."""

    def __init__(self, dim: int, num_data: int, temperature: float, momentum: float) -> None:
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("student_bank", torch.rand(num_data, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("teacher_bank", torch.rand(num_data, dim).mul_(2 * bound).sub_(bound))
        # Z of each side (student embedding vs teacher bank, teacher embedding vs student bank); < 0: unset
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))

    @property
    def num_data(self) -> int:
        return self.student_bank.shape[0]

    def _probabilities(self, v: torch.Tensor, bank: torch.Tensor, contrast: torch.Tensor, z: torch.Tensor):
        scores = torch.exp(torch.gather(v @ bank.t(), 1, contrast) / self.temperature)
        z.copy_(torch.where(z < 0, scores.detach().mean() * self.num_data, z))  # the first batch fixes Z
        return scores / z

    def forward(self, v_student: torch.Tensor, v_teacher: torch.Tensor, indices: torch.Tensor,
                contrast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities (B x (1 + K)) of the student embedding against the teacher bank and of the teacher
        embedding against the student bank; then the banks are updated at `indices`."""
        p_student = self._probabilities(v_student, self.teacher_bank, contrast, self.z_student)
        p_teacher = self._probabilities(v_teacher, self.student_bank, contrast, self.z_teacher)
        self.update(indices, v_student, v_teacher)
        return p_student, p_teacher

    @torch.no_grad()
    def update(self, indices: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor) -> None:
        """m <- normalize(momentum * m + (1 - momentum) * v) at `indices`. Out of place: the old banks are
        still needed by the backward pass of this step's scores."""
        for name, v in (("student_bank", v_student), ("teacher_bank", v_teacher)):
            bank = getattr(self, name)
            mixed = bank[indices] * self.momentum + v.detach().to(bank.dtype) * (1 - self.momentum)
            setattr(self, name, bank.index_copy(0, indices, F.normalize(mixed, dim=1)))


class CRDOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0)
    crd_weight: float = Field(0.8, ge=0)
    kd_weight: float = Field(0.0, ge=0, description="0: CRD; 1: CRD+KD")
    temperature: float = Field(4.0, gt=0, description="KD temperature (used when kd_weight > 0)")
    feat_dim: int = Field(128, gt=0, description="embedding dimension")
    num_negatives: int = Field(16384, gt=0, description="negatives per sample (K)")
    nce_temperature: float = Field(0.07, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1, description="memory bank momentum")
    student_layer: str | None = Field(None, description="tap name; default: the student's pooled vector")
    teacher_layer: str | None = Field(None, description="tap name; default: the teacher's pooled vector")


@register("crd")
class CRD(TrainSetIndices, Method):
    Options = CRDOptions
    caches_teacher = True
    distributed_ok = False  # the memory banks are per process

    def __init__(self, student, teacher=None, **options) -> None:
        super().__init__(student, teacher, **options)
        s_name = self.opts.student_layer or roles(student, "student_layer").pooled
        t_name = self.opts.teacher_layer or roles(teacher, "teacher_layer").pooled
        s_dim = math.prod(self.shapes(student, [s_name])[s_name])
        t_dim = math.prod(self.shapes(teacher, [t_name])[t_name])
        self.embed_student = Embed(s_dim, self.opts.feat_dim)
        self.embed_teacher = Embed(t_dim, self.opts.feat_dim)
        self.student_tap = self.tap(student, [s_name])
        self.teacher_tap = self.tap(teacher, [t_name])
        self.memory: ContrastMemory | None = None
        self.register_buffer("train_labels", torch.empty(0, dtype=torch.long), persistent=False)

    def bind_train_set(self, train_labels: torch.Tensor) -> None:
        """Create the memory banks, one row per training image (kept if already made for as many images),
        and keep the labels for negative sampling."""
        if self.opts.num_negatives > len(train_labels) - 1:
            raise ConfigError(f"method.options.num_negatives={self.opts.num_negatives} exceeds the "
                              f"{len(train_labels)} training images; use fewer negatives")
        device = self.embed_student.linear.weight.device
        self.train_labels = train_labels.to(device=device, dtype=torch.long)
        if self.memory is not None and self.memory.num_data == len(train_labels):
            return
        self.memory = ContrastMemory(self.opts.feat_dim, len(train_labels), self.opts.nce_temperature,
                                     self.opts.momentum).to(device)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None):
        if self.memory is None or indices is None:
            raise missing_input(self.name, "the training set's labels and each batch's positions in it",
                                "method.bind_train_set(train_labels) once, then method(images, labels, indices)",
                                "distillab.data.DeviceLoader(..., with_indices=True) yields them")
        o = self.opts
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        (f_s,), (f_t,) = self.student_tap.take(), self.teacher_tap.take()
        contrast = sample_contrast_indices(indices, labels, self.train_labels, o.num_negatives)
        p_student, p_teacher = self.memory(self.embed_student(f_s), self.embed_teacher(f_t), indices, contrast)
        crd = nce_loss(p_student, self.memory.num_data) + nce_loss(p_teacher, self.memory.num_data)
        terms = {"ce": o.ce_weight * F.cross_entropy(logits, labels), "crd": o.crd_weight * crd}
        if o.kd_weight > 0:
            terms["kd"] = o.kd_weight * kd_loss(logits, teacher_logits, o.temperature)
        return logits, terms
