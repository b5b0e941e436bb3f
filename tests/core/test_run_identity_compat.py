"""Run directories made before the jobs moved to :mod:`kdguard.jobs` stay valid.

The fingerprints below were computed by kdguard 0.1.0 when the jobs lived in ``kdguard.pipeline``,
``kdguard.datafree.run``, ``kdguard.foreign``, ... and ``DataFreeJob`` held the ``abd`` section.
The same jobs built today must give the same ``run.json`` fingerprint (the job's kind, its
resolved config, its parents' weights), or every existing run directory would be refused.
"""

from __future__ import annotations

import pytest

from kdguard import __version__
from kdguard.config import DistillJob, TeacherJob
from kdguard.defenses import DefenseJob
from kdguard.defenses.robustkd import RobustKDJob, TriggerJob
from kdguard.jobs import ImportJob, build_datafree_job
from kdguard.rundir import job_record
from kdguard.ssl.config import BadEncoderJob, GridJob, PretrainJob, ProbeJob

MISSING = "/nonexistent/kdguard-test"

#: name → (job factory, parents, fingerprint computed by kdguard 0.1.0 before the move)
JOBS = {
    "teacher": (lambda: TeacherJob(out="x"), (),
                "3bcaec4da427a60bec72927db1ff700ba38a67417626f1d5909a1fddafdc531b"),
    "distill": (lambda: DistillJob(teacher=MISSING, out="x"), ("teacher",),
                "c447bb83789d1329e9de1477a753a8a3f0f319c1ca5c50afdfb43cf4958da2d9"),
    "datafree": (lambda: build_datafree_job(None, [f"teacher={MISSING}", "out=x"]), ("teacher",),
                 "6db8803835b70b9a52af4ab60099e38541426b689325b34aab27715ef51f59dd"),
    "datafree_abd": (lambda: build_datafree_job(None, [f"teacher={MISSING}", "method=cmi", "abd.mode=full",
                                                       "abd.sr.phase=0.05", "out=x"]), ("teacher",),
                     "8c72c416b3eb472c80cfec7ca329d552f83d1ea816fe8a29ce863eb728a6a057"),
    "defend": (lambda: DefenseJob(model=MISSING, out="x"), ("model",),
               "e579fe9c70e4335c7caa34d6acb6cf45f1d256a6f05390a349db7c73594992b8"),
    "robustkd": (lambda: RobustKDJob(teacher=MISSING, out="x"), ("teacher",),
                 "0e25aa6c6debef280c12c5cd09a79b859ac6753456aa4b034b5b301759bad414"),
    "trigger": (lambda: TriggerJob(teacher=MISSING, out="x"), ("teacher",),
                "6ebb102edbb436cdaac94e50fc7f87bf4434ef15ebc481aa60386041c31983ed"),
    "import": (lambda: ImportJob(teacher=MISSING, out="x"), ("teacher",),
               "da7765626d31f951f16978aa2e9d3b9a7a1e4dcdaddd753525b3cd6689a36e88"),
    "pretrain": (lambda: PretrainJob(out="x"), (),
                 "b40f1dea18ff99a75130f7a7ec5d7a5b53cec9b920d3cb1fa2f6611ccd78a7d4"),
    "badencoder": (lambda: BadEncoderJob(encoder=MISSING, out="x"), ("encoder",),
                   "1292022a72c8ea70cf4679d79ba679bb56dd2db7d1f70e1c328c20306fb6e6b0"),
    "probe": (lambda: ProbeJob(encoder=MISSING, out="x"), ("encoder",),
              "c1d4f1b967f4aa5e2a73d6c55e754c08c5fd59c294425168a8d14d2f9a14e175"),
    "grid": (lambda: GridJob(encoder=MISSING, out="x"), ("encoder", "clean_encoder"),
             "efaa386b1090e48c48a735fa72f709e5ef719cdc705e834ecafc96778459f172"),
}


@pytest.mark.skipif(__version__ != "0.1.0", reason="the fingerprint includes the kdguard version")
@pytest.mark.parametrize("name", sorted(JOBS))
def test_fingerprint_is_unchanged(name):
    make, parents, fingerprint = JOBS[name]
    assert job_record(make(), parents=parents)["fingerprint"] == fingerprint
