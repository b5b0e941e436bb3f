"""Defence descriptions, the registry, and the clean subset every defence trains on."""

from __future__ import annotations

import pytest
import torch

from helpers import make_blobs
from kdguard.config import build_config
from kdguard.defenses import DEFENSES, Defense, DefenseJob, clean_subset
from kdguard.errors import KDGuardError
from kdguard.data import SplitData


def test_registered_defences_declare_their_needs():
    assert {"fp", "ft", "nad"} <= set(DEFENSES.names())
    for name in ("fp", "ft", "nad"):
        d = DEFENSES.get(name)
        assert d.stage == "before" and d.labels and d.teacher_access and d.clean_fraction == 0.05
        assert set(d.needs()) == {"name", "title", "stage", "clean_fraction", "labels", "teacher_access", "source"}
        assert callable(d.run)
    with pytest.raises(KDGuardError, match="unknown defense 'finetune'"):
        DEFENSES.get("finetune")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(stage="while"), "defense stage 'while'"),
    (dict(clean_fraction=0.0), "default clean fraction 0.0"),
])
def test_defense_description_is_validated(kwargs, fragment):
    base = dict(name="x", title="X", stage="after", clean_fraction=0.1, labels=False, teacher_access=False,
                source="-", run=lambda job: None)
    with pytest.raises(KDGuardError, match=fragment):
        Defense(**{**base, **kwargs})


def _splits():
    full = make_blobs(n=400, num_classes=4)
    train, val = full.split(0.2, seed=0)
    return SplitData(train, val, make_blobs(n=8, seed=1))


def test_clean_subset_is_a_stratified_share_of_the_whole_training_set():
    data = _splits()
    clean = clean_subset(data, 0.1, seed=0)
    assert len(clean) == 40  # 10 % of 400 images, taken from the 320 without validation
    assert torch.bincount(clean.labels).tolist() == [10, 10, 10, 10]
    again = clean_subset(data, 0.1, seed=0)
    assert torch.equal(clean.images, again.images)
    assert not torch.equal(clean.images, clean_subset(data, 0.1, seed=1).images)
    # Drawn from the train split only: every clean image is a train image, none a validation image.
    rows = {bytes(img.flatten().tolist()) for img in data.train.images}
    assert all(bytes(img.flatten().tolist()) in rows for img in clean.images)
    assert clean_subset(data, 1.0, seed=0) is data.train  # more than the train split: all of it
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(KDGuardError, match="clean fraction"):
            clean_subset(data, bad, seed=0)


def test_job_defaults_carry_the_reference_settings():
    job = build_config(DefenseJob, None, ["model=somewhere"])
    assert job.method == "ft" and job.clean_fraction == 0.05 and job.data.name == "auto"
    assert (job.train.epochs, job.train.batch_size, job.train.optim.lr) == (20, 64, 0.01)
    assert job.train.optim.nesterov and job.train.optim.weight_decay == 1e-4
    assert job.fineprune.ca_tolerance == 0.10 and job.fineprune.step_ratio == 0.01
    assert job.nad.betas == [] and job.nad.teacher_epochs == 10 and job.nad.variant == "nad"
