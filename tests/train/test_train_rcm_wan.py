"""A short rCM distillation of a tiny WanDiT (sCM + DMD student phases, critic phases, real loop pieces)
moves the 1-step student towards the teacher's probability-flow ODE.

Why not the sCM loss value: with g normalized per sample, the sCM loss at the current weights is
100 * ||g / (||g|| + 0.1)||^2 ~ 100 by construction, whatever the student — only its gradient is informative.
The quantity distillation is meant to lower is the distance between the student's one-step sample and the
teacher's ODE solution from the same noise; that is measured here, on held-out noise.
"""

import copy

import pytest
import torch
from _train_resume import tiny_teacher

from rcm_losses import flow_euler_sample, rcm_sample
from rcm_train.objectives import RCMObjective, RCMObjectiveConfig
from rcm_train.trainer import (
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    TrainParts,
    build_optimizer,
    run_iteration,
)


@pytest.mark.slow
def test_rcm_training_moves_student_to_teacher_ode():
    teacher = tiny_teacher()
    student, fake = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    oc = OptimizerConfig(lr=3e-4, warmup_steps=0)
    parts = TrainParts(models={"student": student, "teacher": teacher, "fake_score": fake},
                       optimizers={"student": build_optimizer(student, oc), "fake_score": build_optimizer(fake, oc)})
    g = torch.Generator().manual_seed(0)
    x0, emb, neg = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g), torch.randn(16, 32, generator=g)
    obj = RCMObjective(RCMObjectiveConfig(input_dtype="float32", timestep_dtype=None, guidance=2.0), negative_embed=neg)
    cfg = TrainConfig(schedule=ScheduleConfig(tangent_warmup=0, student_update_freq=2), ema_rate=None)

    noise = torch.randn(4, 16, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    cond, uncond = emb[:1].expand(4, -1, -1), neg[None].expand(4, -1, -1)
    with torch.no_grad():
        ode = flow_euler_sample(lambda x, ts, c: teacher(x, ts, c), noise, cond, uncond, guidance=2.0, num_steps=40,
                                shift=1.0, sigma_max=80.0, input_dtype=torch.float32, timestep_dtype=None)

    def distance():
        one_step = rcm_sample(obj.denoiser(student), noise, cond, generator=torch.Generator().manual_seed(0),
                              num_steps=1, sigma_max=80.0)
        return ((one_step - ode) ** 2).mean().item()

    before = distance()
    phases = set()
    for it in range(40):
        m = run_iteration(parts, obj, [{"latent": x0, "embed": emb}], it, cfg)
        phases |= {k.split("/")[0] for k in m if k.endswith("/loss")}
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    after = distance()
    assert phases == {"scm", "dmd", "critic"}
    # measured 0.00632 -> 0.00461 (-27%) on CPU; 15% leaves room for other BLAS/torch builds
    assert after < 0.85 * before, (before, after)
