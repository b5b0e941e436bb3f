"""Tiny models and job factories for the data-free tests (3×8×8 images, 4 classes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdguard.datafree import MethodContext
from kdguard.jobs import DataFreeABDJob, validate_datafree_job
from kdguard.models.common import Normalize

SHAPE = (3, 8, 8)
CLASSES = 4


class SmallNet(nn.Module):
    """Two conv-BN stages and a linear head with stage presets (for AT and DAFL's features)."""

    stage_presets = {"stages": ["stage1", "stage2"], "penultimate": ["flat"]}

    def __init__(self, width: int = 8, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.normalize = Normalize((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
        self.stage1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width))
        self.flat = nn.Flatten(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stage1(self.normalize(x)))
        x = F.relu(self.stage2(x))
        return self.fc(self.flat(F.adaptive_avg_pool2d(x, 1)))


def make_teacher(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    teacher = SmallNet(width=8)
    with torch.no_grad():  # non-trivial running statistics, as a trained teacher has
        teacher.train()
        for _ in range(3):
            teacher(torch.rand(32, *SHAPE))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_student(seed: int = 1) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet(width=4)


def tiny_job(method: str, **overrides) -> DataFreeABDJob:
    """A job (with the ``abd`` section) with tiny sizes for ``method``; ``overrides`` replace
    top-level sections' fields, e.g. ``tiny_job("cmi", cmi={"adv": 0.0})``."""
    job = DataFreeABDJob(teacher="unused", method=method, preset="none")
    job.schedule.rounds = 3
    job.schedule.generator_steps = 2
    job.schedule.student_steps = 2
    job.schedule.batch_size = 6
    job.generator.width = 4
    job.generator.kind = "zskt" if method == "zskt" else "dcgan"
    job.generator.latent_dim = 8
    job.cmi.bank_size = 24
    job.cmi.negatives = 10
    job.cmi.head_dim = 8
    job.ood.patches = 20
    job.monitor.every = 0
    job.monitor.grid_every = 0
    job.monitor.checkpoint_every = 1
    job.progress = False
    for section, values in overrides.items():
        target = getattr(job, section)
        for key, value in values.items():
            setattr(target, key, value)
    validate_datafree_job(job)
    return job


def make_context(teacher: nn.Module, student: nn.Module) -> MethodContext:
    return MethodContext(teacher=teacher, student=student, image_shape=SHAPE, num_classes=CLASSES,
                         mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), hflip=True,
                         device=torch.device("cpu"), bf16=False, seed=0)


@pytest.fixture
def models():
    return make_teacher(), make_student()


class _Kit:
    """The helpers above, handed to tests through the ``kit`` fixture (conftest modules are not
    importable by name under --import-mode=importlib)."""

    SHAPE = SHAPE
    CLASSES = CLASSES
    SmallNet = SmallNet
    make_teacher = staticmethod(make_teacher)
    make_student = staticmethod(make_student)
    tiny_job = staticmethod(tiny_job)
    make_context = staticmethod(make_context)


@pytest.fixture
def kit() -> type[_Kit]:
    return _Kit
