"""Make the stranger's teacher of ``docs/your-teacher.md``: a backdoored CIFAR-10 model saved as
a plain ``.safetensors`` file, the way a model hub serves one.

The model (:mod:`their_nets`) expects normalised input, so it is trained on
``(x − mean) / std`` of CIFAR-10's statistics. The poisoning is kdguard's ``blend`` preset (a
seeded random-noise image blended in at α 0.2, a full-image trigger) on 10 % of the training set,
relabelled to class 3. The weights are saved from a
``DataParallel``-style wrapper (every key prefixed ``module.``), as many training scripts do.

Usage::

    PYTHONPATH=examples python examples/train_their_teacher.py --data-root ../shared/data \\
        --epochs 20 --out their_teacher.safetensors
"""

from __future__ import annotations

import argparse

from safetensors.torch import save_file

from their_nets import cifar_resnet

from kdguard.attacks import build_attack, poison_dataset
from kdguard.checkpoint import INPUT_NORMS, add_input_normalization
from kdguard.config import TrainConfig
from kdguard.augment import Augment
from kdguard.data import load_dataset
from kdguard.runtime import configure_threads, seed_everything
from kdguard.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="their_teacher.safetensors")
    args = parser.parse_args()

    configure_threads()
    seed_everything(args.seed)
    train = load_dataset("cifar10", "train", root=args.data_root)
    attack = build_attack("blend", train.shape, target=3, poison_rate=0.1, seed=args.seed)
    poisoned = poison_dataset(train, attack, seed=args.seed).dataset
    model = cifar_resnet(num_classes=10)
    add_input_normalization(model, *INPUT_NORMS["cifar10"])  # the authors' own preprocessing
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, progress=False)
    Trainer(model, cfg, augment=Augment(crop_padding=4, hflip=True), seed=args.seed,
            desc="their teacher").fit(poisoned.images, poisoned.labels)
    save_file({f"module.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
