"""Loss switches: hand-worked values, an independent vanilla-KD oracle, gradients, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import LossSwitches, distillation_losses
from pipeline.selection import entropy, reversed_weights, uncertainty_weights

LN2, LN3 = math.log(2.0), math.log(3.0)

# The 2 x 3 example worked by hand (column 0 the positive):
#   student s1 = (0, 0, 0):      l1 = -log(1/3) = ln 3 = 1.0986123
#   student s2 = (ln 4, 0, 0):   l2 = -log(4/6) = ln 1.5 = 0.4054651; mean CE 0.7520387
#   teacher t1 = (1, 0, 0):      p = (e, 1, 1) / (e + 2), u1 = ln(e + 2) - e / (e + 2) = 0.9753278
#   teacher t2 = (ln 2, 0, 0):   p = (1/2, 1/4, 1/4),     u2 = 1.5 ln 2 = 1.0397208
#   w = u / (u1 + u2) = (0.4840220, 0.5159780); HW task = w1 l1 + w2 l2 = 0.7409636
#   c = softmax((1 - w)^2) = softmax(0.2662333, 0.2342773) = (0.5079883, 0.4920117)
#   d1 = 1^2 = 1, d2 = (ln 4 - ln 2)^2 = (ln 2)^2 = 0.4804530
#   mean distill = 0.7402265; SW distill = c1 d1 + c2 d2 = 0.7443768
#   WSL: ce_t1 = ln(e + 2) - 1 = 0.5514447, omega1 = 1 - exp(-ln 3 / ce_t1) = 0.8636109
#        ce_t2 = ln 2, omega2 = 1 - exp(-ln 1.5 / ln 2) = 0.4428732
#        distill = (omega1 d1 + omega2 d2) / 2 = 0.5381953
STUDENT = torch.tensor([[0.0, 0.0, 0.0], [2 * LN2, 0.0, 0.0]])
TEACHER = torch.tensor([[1.0, 0.0, 0.0], [LN2, 0.0, 0.0]])


def losses(switches: LossSwitches, student=STUDENT, teacher=TEACHER) -> dict[str, float]:
    return {k: v.item() for k, v in distillation_losses(student, teacher, switches).items()}


def test_vanilla_kd_by_hand():
    out = losses(LossSwitches())
    assert out["task"] == pytest.approx(0.7520387, abs=1e-6)
    assert out["distill"] == pytest.approx(0.7402265, abs=1e-6)
    assert out["total"] == pytest.approx(0.2 * 0.7402265 + 0.8 * 0.7520387, abs=1e-6)
    assert out["w_mean"] == out["w_max"] == out["c_max"] == 0.5  # unweighted = 1/K
    assert out["wsl_mean"] == 1.0


def test_dcd_weights_by_hand():
    out = losses(LossSwitches(weight_hard=True, weight_soft=True))
    assert out["task"] == pytest.approx(0.7409636, abs=1e-6)
    assert out["distill"] == pytest.approx(0.7443768, abs=1e-6)
    assert out["total"] == pytest.approx(0.2 * 0.7443768 + 0.8 * 0.7409636, abs=1e-6)
    assert out["w_max"] == pytest.approx(0.5159780, abs=1e-6)
    assert out["c_max"] == pytest.approx(0.5079883, abs=1e-6)
    assert out["w_mean"] == out["c_mean"] == pytest.approx(0.5)

    w = uncertainty_weights(entropy(TEACHER))
    torch.testing.assert_close(w, torch.tensor([0.4840220, 0.5159780]))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(reversed_weights(w), torch.tensor([0.5079883, 0.4920117]))


def test_hw_and_sw_are_independent():
    hw = losses(LossSwitches(weight_hard=True))
    assert hw["task"] == pytest.approx(0.7409636, abs=1e-6)
    assert hw["distill"] == pytest.approx(0.7402265, abs=1e-6)
    sw = losses(LossSwitches(weight_soft=True))
    assert sw["task"] == pytest.approx(0.7520387, abs=1e-6)
    assert sw["distill"] == pytest.approx(0.7443768, abs=1e-6)


def test_wsl_weight_by_hand():
    out = losses(LossSwitches(wsl=True))
    assert out["wsl_mean"] == pytest.approx((0.8636109 + 0.4428732) / 2, abs=1e-6)
    assert out["distill"] == pytest.approx(0.5381953, abs=1e-6)
    assert out["task"] == pytest.approx(0.7520387, abs=1e-6)


def test_bce_task_by_hand():
    # Row 1: three logits at 0, BCE ln 2 each. Row 2: softplus(-ln 4) = ln 1.25 for the
    # positive, ln 2 for both negatives: (0.2231436 + 2 ln 2) / 3 = 0.5364793.
    out = losses(LossSwitches(alpha=0.0, distill=False, task_loss="bce"), teacher=None)
    assert out["task"] == pytest.approx((LN2 + 0.5364793) / 2, abs=1e-6)
    assert out["total"] == out["task"]
    hw = losses(LossSwitches(weight_hard=True, task_loss="bce"))
    assert hw["task"] == pytest.approx(0.4840220 * LN2 + 0.5159780 * 0.5364793, abs=1e-6)


def test_finetune_is_plain_cross_entropy_without_teacher():
    out = losses(LossSwitches(alpha=0.0, distill=False), teacher=None)
    assert out["total"] == out["task"] == pytest.approx((LN3 + math.log(1.5)) / 2, abs=1e-6)
    assert out["distill"] == 0.0


def test_vanilla_kd_matches_independent_formula():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(16, 8, generator=generator)
    teacher = torch.randn(16, 8, generator=generator) * 2
    for alpha in (0.0, 0.2, 0.7, 1.0):
        out = distillation_losses(student, teacher, LossSwitches(alpha=alpha))
        mse = F.mse_loss(student, teacher, reduction="none").sum(dim=1).mean()
        ce = F.cross_entropy(student, torch.zeros(16, dtype=torch.long))
        torch.testing.assert_close(out["total"], alpha * mse + (1 - alpha) * ce)


def test_student_uncertainty_ignores_the_teacher_for_weights():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(6, 5, generator=generator) * 3
    switches = LossSwitches(weight_hard=True, weight_soft=True, uncertainty_from="student")
    a = distillation_losses(student, torch.randn(6, 5, generator=generator), switches)
    b = distillation_losses(student, 5 * torch.randn(6, 5, generator=generator), switches)
    assert a["task"] == b["task"] and a["w_max"] == b["w_max"] and a["c_max"] == b["c_max"]
    expected_w = uncertainty_weights(entropy(student))
    assert a["w_max"] == expected_w.max()

    # Teacher-sourced weights do move with the teacher.
    teacher_switches = LossSwitches(weight_hard=True)
    c = distillation_losses(student, torch.randn(6, 5, generator=generator), teacher_switches)
    d = distillation_losses(student, 5 * torch.randn(6, 5, generator=generator), teacher_switches)
    assert c["w_max"] != d["w_max"]


def test_gradients_reach_the_student_only():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(4, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 6, generator=generator, requires_grad=True)
    switches = LossSwitches(weight_hard=True, weight_soft=True, wsl=True)
    out = distillation_losses(student, teacher, switches)
    out["total"].backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    for key in ("w_mean", "w_max", "c_mean", "c_max", "wsl_mean"):
        assert not out[key].requires_grad, key


def test_weights_are_treated_as_constants():
    # d total / d s with HW must equal the gradient of sum_i w_i l_i at fixed w.
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(5, 4, generator=generator, requires_grad=True)
    switches = LossSwitches(alpha=0.0, distill=False, weight_hard=True, uncertainty_from="student")
    distillation_losses(student, None, switches)["total"].backward()
    w = uncertainty_weights(entropy(student.detach()))
    reference = student.detach().clone().requires_grad_(True)
    (w * -torch.log_softmax(reference, dim=1)[:, 0]).sum().backward()
    torch.testing.assert_close(student.grad, reference.grad)


def all_switch_combinations():
    for alpha, distill, hw, sw, source, wsl, task in itertools.product(
        (0.0, 0.2, 1.0), (False, True), (False, True), (False, True),
        ("teacher", "student"), (False, True), ("ce", "bce"),
    ):  # fmt: skip
        try:
            yield LossSwitches(alpha, distill, hw, sw, source, wsl, task)
        except ValueError:
            continue


def test_every_valid_combination_gives_finite_losses():
    generator = torch.Generator().manual_seed(4)
    teacher = torch.randn(8, 8, generator=generator) * 4
    combinations = list(all_switch_combinations())
    assert len(combinations) == 3 * 32 + 8  # distill on: all alphas; off: alpha 0, no SW/WSL
    for switches in combinations:
        student = (torch.randn(8, 8, generator=generator) * 4).requires_grad_(True)
        out = distillation_losses(student, teacher, switches)
        for key, value in out.items():
            assert value.ndim == 0 and torch.isfinite(value), (switches, key)
        out["total"].backward()
        assert torch.isfinite(student.grad).all(), switches


def test_half_precision_inputs_are_computed_in_float32():
    out = distillation_losses(STUDENT.bfloat16(), TEACHER.bfloat16(), LossSwitches())
    assert out["total"].dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha must be in"),
        ({"alpha": -0.1}, "alpha must be in"),
        ({"alpha": float("nan")}, "alpha must be in"),
        ({"alpha": 0.2, "distill": False}, "alpha=0.2 with distill=False"),
        ({"alpha": 0.0, "distill": False, "weight_soft": True}, "distill=True"),
        ({"alpha": 0.0, "distill": False, "wsl": True}, "distill=True"),
        ({"uncertainty_from": "teachr"}, "uncertainty_from"),
        ({"task_loss": "mse"}, "task_loss"),
    ],
)
def test_bad_switches(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSwitches(**kwargs)


@pytest.mark.parametrize(
    "switches",
    [
        LossSwitches(),
        LossSwitches(alpha=0.0, distill=False, weight_hard=True),
    ],
)
def test_missing_teacher_is_named(switches):
    with pytest.raises(ValueError, match="teacher_logits is None"):
        distillation_losses(STUDENT, None, switches)


def test_student_weighting_needs_no_teacher():
    switches = LossSwitches(alpha=0.0, distill=False, weight_hard=True, uncertainty_from="student")
    assert torch.isfinite(distillation_losses(STUDENT, None, switches)["total"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_name_the_tensor(bad):
    broken = STUDENT.clone()
    broken[1, 2] = bad
    with pytest.raises(ValueError, match="student_logits contains NaN or inf.*row 1"):
        distillation_losses(broken, TEACHER, LossSwitches())
    with pytest.raises(ValueError, match="teacher_logits contains NaN or inf.*row 1"):
        distillation_losses(STUDENT, broken, LossSwitches())


def test_shape_errors():
    with pytest.raises(ValueError, match="teacher_logits shape"):
        distillation_losses(STUDENT, TEACHER[:, :2], LossSwitches())
    with pytest.raises(ValueError, match="C >= 2"):
        distillation_losses(STUDENT[:, :1], TEACHER[:, :1], LossSwitches())
