"""Training throughput of one model in fp32, fp32 + channels_last and bf16 + channels_last, side by side.

Why: bf16 autocast pays off only on CPUs that compute bf16 natively (AVX-512 BF16, AMX). On an
AVX2-only CPU oneDNN emulates it, and a SimCLR epoch of ResNet-20 took about 1,070 s instead of the
~48 s measured on an AVX-512 BF16 machine. This script measures the three settings on the machine
it runs on and prints what ``amp=auto`` picks there (``kdguard.runtime.cpu_has_native_bf16``).

    python benchmarks/cpu_precision.py                    # ResNet-20, CIFAR-10 size, batch 256
    python benchmarks/cpu_precision.py --model wrn-16-2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from kdguard.models import build_model
from kdguard.runtime import autocast, cpu_has_native_bf16, machine_label, use_bf16

VARIANTS = {"fp32": (False, False), "fp32 + channels_last": (False, True), "bf16 + channels_last": (True, True)}


def images_per_second(model_name: str, bf16: bool, channels_last: bool, *, batch: int, steps: int,
                      warmup: int) -> float:
    """Training images per second (forward, cross-entropy, backward, SGD step) on random data."""
    torch.manual_seed(0)
    net = build_model(model_name, num_classes=10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, bf16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    rows = {name: images_per_second(args.model, bf16, cl, batch=args.batch, steps=args.steps, warmup=args.warmup)
            for name, (bf16, cl) in VARIANTS.items()}
    net = build_model(args.model, num_classes=10)
    auto = use_bf16("auto", torch.device("cpu"), net)
    print(f"machine: {machine_label('cpu')}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_has_native_bf16()}, amp=auto picks {'bf16' if auto else 'fp32'}")
    print(f"\n| {args.model}, batch {args.batch} | train images/s | vs fp32 |\n|---|---|---|")
    for name, ips in rows.items():
        print(f"| {name} | {ips:,.0f} | {ips / rows['fp32']:.2f}× |")
    print(json.dumps({"model": args.model, "batch": args.batch, "native_bf16": cpu_has_native_bf16(),
                      "images_per_second": rows}))


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
