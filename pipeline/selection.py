"""Dynamic data selection (DS), knowledge adjustment (KA) and teacher-uncertainty weights.

    python -c "import torch; from pipeline.selection import select_candidates; \
print(select_candidates(torch.tensor([[1.0, 3.0, 0.0, 2.0]]), keep=3))"

DESIGN.md section 2. Paper symbols: each query has C = M+1 candidates scored by the
teacher, the student keeps `keep` = M'+1 of them. Candidate column 0 is always the
positive; the other columns are negatives in draw order. Ties are broken by column
order (the earlier-drawn candidate ranks first), except in `positive_rank`, which is
pessimistic like the retrieval metrics in `pipeline.recall`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def select_candidates(
    teacher_logits: Tensor, keep: int, adjust: bool = True
) -> tuple[Tensor, Tensor]:
    """DS (+ KA): the positive plus the keep-1 best negatives, with the scores to distil.

    teacher_logits: (Q, C), column 0 the positive. Returns `kept_columns` (Q, keep) long,
    column indices into teacher_logits with the positive at 0 and the negatives in
    teacher order, and `kept_teacher_logits` (Q, keep). With `adjust` (KA) the scores are
    the row's `keep` largest teacher logits sorted descending, so the positive receives
    the top score and the value set is the row's top-`keep` set; without it every kept
    candidate keeps its own teacher logit. If the teacher put the positive outside its
    top `keep`, the lowest of the top `keep` negatives is the one that drops out.
    """
    _check_logits(teacher_logits, "teacher_logits")
    n_queries, n_candidates = teacher_logits.shape
    if not 2 <= keep <= n_candidates:
        raise ValueError(
            f"keep (M'+1) must be between 2 and the {n_candidates} candidates per query, got {keep}"
        )

    # Negatives only, best first; stable so that ties keep draw order.
    negative_order = torch.sort(
        teacher_logits[:, 1:], dim=1, descending=True, stable=True
    ).indices  # (Q, C-1)
    positive_column = torch.zeros(n_queries, 1, dtype=torch.long, device=teacher_logits.device)
    kept_columns = torch.cat([positive_column, negative_order[:, : keep - 1] + 1], dim=1)

    if adjust:
        kept_teacher_logits = torch.topk(teacher_logits, keep, dim=1, sorted=True).values
    else:
        kept_teacher_logits = torch.gather(teacher_logits, 1, kept_columns)
    return kept_columns, kept_teacher_logits


def positive_rank(teacher_logits: Tensor) -> Tensor:
    """(Q,) long, 1-based rank of column 0 among the C candidates of each row.

    Pessimistic ties: a negative scoring equal to the positive ranks above it, so a rank
    above 1 flags a "genetic error" of the teacher, ties included.
    """
    _check_logits(teacher_logits, "teacher_logits")
    return (teacher_logits >= teacher_logits[:, :1]).sum(dim=1)


def entropy(logits: Tensor) -> Tensor:
    """(Q,) entropy in nats of softmax(logits) over each row (temperature 1).

    Candidates at -inf (probability 0) contribute 0, not NaN.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    return -plogp.sum(dim=-1)


def uncertainty_weights(u: Tensor) -> Tensor:
    """(K,) w_i = u_i / sum_j u_j for K per-query uncertainties u >= 0; sum 1.

    The paper prints a minus sign in front; it is a typo (DESIGN.md section 2). When every
    u is 0 (a fully confident teacher on the whole batch) the weights are uniform 1/K.
    """
    if u.ndim != 1 or u.numel() == 0:
        raise ValueError(
            f"uncertainties must be a non-empty (K,) vector, got shape {tuple(u.shape)}"
        )
    total = u.sum()
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, u / safe_total, torch.full_like(u, 1.0 / u.numel()))


def reversed_weights(w: Tensor) -> Tensor:
    """(K,) c_i = exp((1 - w_i)^2) / sum_j exp((1 - w_j)^2): confident queries weigh more."""
    return torch.softmax((1.0 - w) ** 2, dim=0)


def _check_logits(logits: Tensor, name: str) -> None:
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty (queries, candidates) matrix, "
            f"got shape {tuple(logits.shape)}"
        )
    if torch.isnan(logits).any():
        row = int(torch.isnan(logits).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN (first in query row {row})")
