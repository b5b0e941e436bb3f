"""Where a Self-Retrospection step's time goes, part by part (docs/abd-cost.md, "Where an SR round goes").

Random-weight teacher and student (the cost does not depend on the weights), float32 NCHW, one
batch of uniform images; each part is timed alone (mean of --repeats calls, after one warm-up):
a plain student step, SR's delta search against the teacher (once per round in ZSKT), and per SR
step the outer loss with its gradients, the inner gradient with its graph, one fixed-point
product J^T v, and the indirect term. Uses kdguard.abd's own functions.

    python benchmarks/sr_parts.py --teacher wrn16_2 --student wrn16_1 --batch 64 --threads 1
"""
import argparse, time  # noqa: E401

import torch

from kdguard.abd import frozen_bn_statistics, universal_perturbation
from kdguard.abd.retrospection import kl_summed
from kdguard.models import build_model
from kdguard.runtime import configure_threads, machine_label

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--teacher", default="wrn16_2")
ap.add_argument("--student", default="wrn16_1")
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--perturbed", type=int, default=8, help="samples stamped with delta (SR's min_count)")
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--threads", type=int)
a = ap.parse_args()
configure_threads(a.threads)
torch.manual_seed(0)
teacher = build_model(a.teacher, num_classes=10, in_channels=3).eval().requires_grad_(False)
student = build_model(a.student, num_classes=10, in_channels=3).train()
params = list(student.parameters())
x = torch.rand(a.batch, 3, 32, 32)
rows = torch.zeros(a.batch, 1, 1, 1)
rows[:a.perturbed] = 1.0


def timed(f, repeats=a.repeats):
    f()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f()
    return out, (time.perf_counter() - t0) / repeats


def plain():
    student.zero_grad(set_to_none=True)
    student(x).sum().backward()


with torch.no_grad():
    ref = teacher(x)
    with frozen_bn_statistics(student):
        clean = student(x)
delta, t_search = timed(lambda: universal_perturbation(teacher, x, ref, steps=10, lr=0.1), repeats=1)
d = delta.requires_grad_(True)


def outer():
    with frozen_bn_statistics(student):
        per = kl_summed(clean, student(x + d * rows))[:a.perturbed]
    return torch.autograd.grad(per.sum() / a.batch, [d, *params])


def inner_grad():
    with frozen_bn_statistics(student):
        loss = -kl_summed(clean, student(x + d)).mean() + 1e-3 * d.pow(2).sum()
    return torch.autograd.grad(loss, d, create_graph=True)[0]


g, t_inner = timed(inner_grad)
mapped, v = d - 0.1 * g, torch.randn_like(d)
rows_out = [("plain student step (forward + backward)", timed(plain)[1]),
            ("delta search against the teacher (10 Adam steps), once per round", t_search),
            ("outer loss and its gradients (delta and theta)", timed(outer)[1]),
            ("inner gradient with its graph", t_inner),
            ("one product J^T v (double backward to delta)",
             timed(lambda: torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True))[1]),
            ("indirect term (double backward to theta)",
             timed(lambda: torch.autograd.grad(mapped, params, grad_outputs=v, retain_graph=True))[1])]
print(f"\n{a.teacher} -> {a.student}, batch {a.batch}, {machine_label(torch.device('cpu'))}, "
      f"{torch.get_num_threads()} threads\n\n| part | s |\n|---|---|")
for name, seconds in rows_out:
    print(f"| {name} | {seconds:.3f} |")
