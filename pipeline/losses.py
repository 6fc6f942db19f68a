"""Every training variant's loss from a few orthogonal switches (DESIGN.md section 2).

    python -c "import torch; from pipeline.losses import LossSwitches, distillation_losses; \
print(distillation_losses(torch.randn(4, 8), torch.randn(4, 8), LossSwitches()))"

Paper symbols inside the math: K queries in the batch, C = M'+1 candidates per query
(column 0 the positive), s the student's logits, t the teacher's (KA-adjusted when the
caller adjusted them), w the teacher-uncertainty weights, c the reversed weights.
Total: L = alpha * L_distill + (1 - alpha) * L_task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.selection import entropy, reversed_weights, uncertainty_weights

_WSL_EPS = 1e-7  # Zhou et al. 2021: omega = 1 - exp(-max(ce_s / (ce_t + eps), 0))


@dataclass(frozen=True)
class LossSwitches:
    """One point in the variant space; see docs/_variants_section.md for the named ones."""

    alpha: float = 0.2  # weight of the distillation term; 0 with distill off = fine-tune
    distill: bool = True  # soft labels: squared error to the teacher's logits
    weight_hard: bool = False  # HW: task loss sum_i w_i l_i instead of mean_i l_i
    weight_soft: bool = False  # SW: distillation sum_i c_i d_i instead of mean_i d_i
    uncertainty_from: str = "teacher"  # "student": w from the detached student logits
    wsl: bool = False  # WSL KD: each query's distillation term times omega_i
    task_loss: str = "ce"  # "ce" (paper eq. 7) or "bce" (the authors' METER release)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.uncertainty_from not in ("teacher", "student"):
            raise ValueError(
                f"uncertainty_from must be 'teacher' or 'student', got {self.uncertainty_from!r}"
            )
        if self.task_loss not in ("ce", "bce"):
            raise ValueError(f"task_loss must be 'ce' or 'bce', got {self.task_loss!r}")
        if not self.distill and (self.weight_soft or self.wsl):
            raise ValueError("weight_soft and wsl weight the distillation term: set distill=True")
        if not self.distill and self.alpha != 0.0:
            raise ValueError(
                f"alpha={self.alpha} with distill=False would only scale the task loss by "
                f"{1 - self.alpha}; set alpha=0"
            )

    @property
    def needs_teacher(self) -> bool:
        weighted = self.weight_hard or self.weight_soft
        return self.distill or self.wsl or (weighted and self.uncertainty_from == "teacher")


def distillation_losses(
    student_logits: Tensor, teacher_logits: Tensor | None, switches: LossSwitches
) -> dict[str, Tensor]:
    """Scalar loss terms for one batch of K queries x C candidates, column 0 positive.

    student_logits, teacher_logits: (K, C); the teacher may be None when no switch needs
    it. Returns `total` (to backpropagate), `task`, `distill` (0 when off) and detached
    statistics of the per-query weights this loss applied: `w_mean, w_max` (HW), `c_mean,
    c_max` (SW), `wsl_mean` (WSL omega). A switched-off weighting reports what the plain
    mean applies, 1/K (or 1 for omega). Gradients reach the student only; the loss is
    computed in float32 whatever the input dtype.
    """
    _check_inputs(student_logits, teacher_logits, switches)
    s = student_logits.float()
    t = None if teacher_logits is None else teacher_logits.detach().float()
    n_queries = s.shape[0]
    uniform = torch.full((n_queries,), 1.0 / n_queries, device=s.device)

    # Per-query weights (K,), all detached: uncertainty from the teacher or the student.
    w = c = uniform
    if switches.weight_hard or switches.weight_soft:
        source = t if switches.uncertainty_from == "teacher" else s.detach()
        uncertainty_w = uncertainty_weights(entropy(source))
        w = uncertainty_w if switches.weight_hard else uniform
        c = reversed_weights(uncertainty_w) if switches.weight_soft else uniform

    # Task loss: per-query l_i (K,), then the w-weighted sum (w = 1/K is the mean).
    task_per_query = _task_per_query(s, switches.task_loss)
    task = (w * task_per_query).sum()

    # Distillation: d_i = sum_y (s_iy - t_iy)^2, times omega_i for WSL, then c-weighted.
    omega = torch.ones_like(uniform)
    distill = s.new_zeros(())
    if switches.distill:
        if switches.wsl:
            omega = _wsl_weights(s.detach(), t)
        distill_per_query = ((s - t) ** 2).sum(dim=1)  # (K,)
        distill = (c * omega * distill_per_query).sum()

    total = switches.alpha * distill + (1.0 - switches.alpha) * task
    return {
        "total": total,
        "task": task,
        "distill": distill,
        "w_mean": w.mean(),
        "w_max": w.max(),
        "c_mean": c.mean(),
        "c_max": c.max(),
        "wsl_mean": omega.mean(),
    }


def _task_per_query(s: Tensor, kind: str) -> Tensor:
    """(K,) task loss per query: softmax CE on the positive, or mean per-logit BCE."""
    if kind == "ce":
        return -torch.log_softmax(s, dim=1)[:, 0]
    labels = torch.zeros_like(s)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(s, labels, reduction="none").mean(dim=1)


def _wsl_weights(s: Tensor, t: Tensor) -> Tensor:
    """(K,) WSL omega_i from detached logits: near 0 where the student already beats the teacher."""
    ce_student = -torch.log_softmax(s, dim=1)[:, 0]
    ce_teacher = -torch.log_softmax(t, dim=1)[:, 0]
    ratio = ce_student / (ce_teacher + _WSL_EPS)
    return 1.0 - torch.exp(-ratio.clamp_min(0.0))


def _check_inputs(
    student_logits: Tensor, teacher_logits: Tensor | None, switches: LossSwitches
) -> None:
    if student_logits.ndim != 2 or student_logits.shape[0] == 0 or student_logits.shape[1] < 2:
        raise ValueError(
            "student_logits must be (K queries, C >= 2 candidates), "
            f"got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits is None:
        if switches.needs_teacher:
            raise ValueError(
                f"teacher_logits is None but {switches} needs the teacher "
                "(distill, wsl, or weighting with uncertainty_from='teacher')"
            )
    elif teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} differs from "
            f"student_logits shape {tuple(student_logits.shape)}"
        )
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if logits is not None and not torch.isfinite(logits).all():
            row = int((~torch.isfinite(logits)).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"{name} contains NaN or inf (first in query row {row})")
