"""Fine-pruning (FP): Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks" (RAID 2018), §3–4.

1. **Rank.** Record the mean activation of every output channel of the last convolutional stage
   (``stage_paths(model, "stages")[-1]``, read with :class:`kdguard.taps.FeatureTaps`) over the
   defender's clean subset; channels that stay dormant on clean data are the backdoor's
   candidates.
2. **Prune.** Remove channels in increasing order of mean activation, ``step`` channels at a
   time, while the clean accuracy on held-out clean data stays within a tolerance; keep the
   largest pruned set that satisfied it.
3. **Fine-tune** the pruned model on the clean subset with the pruned channels held at zero.

Stopping rule (kdguard's exact rule, after BackdoorBench ``defense/fp.py`` and its CIFAR-10
config): with CA₀ the accuracy of the unpruned model on the *validation split*
(``select_on="val"``; ``"clean"`` uses the defender's subset instead) and CA_k the accuracy with
the k lowest channels pruned, k runs over ``step, 2·step, …`` with
``step = max(1, ⌈step_ratio·C⌉)`` (default ``step_ratio = 0.01``) up to
``min(C − 1, ⌊max_ratio·C⌋)``; the search stops at the first k with
``(CA₀ − CA_k)/CA₀ > ca_tolerance`` (default 0.10, BackdoorBench's ``acc_ratio``) and keeps the
previous k. Only CA is computed during the search (the defender does not know the trigger);
``track_asr=True`` also logs each step's ASR for analysis. The paper states the rule as "prune until the validation accuracy falls below a
threshold" without fixing one threshold for all tasks. Two BackdoorBench quirks are not copied:
its pruned set at step k is ``seq_sort[0:k-1]`` (one channel short), and the "last good" network
it fine-tunes is the same object pruned one step further; it also selects on the *test* split.

How a channel is removed: its **outgoing weights are zeroed**, in the first parameterised module
that runs after the stage (the "consumer"): the input columns of a ``Linear`` (k columns per
channel after a channel-major flatten, k = in_features / C), the input slice ``weight[:, c]`` of
a ``Conv2d`` (groups = 1), or ``weight[c]`` and ``bias[c]`` of an affine ``BatchNorm``. This is
exactly "removing the neuron": nothing downstream reads it any more, also in residual stages
where zeroing the stage's own last BN would leave the shortcut's contribution (BackdoorBench's
``prune.custom_from_mask`` on the classifier's input columns is the same operation for ResNets).
The weights stay in the architecture, so the pruned model saves and loads as a plain
checkpoint. During fine-tuning a :class:`ChannelPruner` keeps the channel mask and re-zeroes the
pruned weights after every optimiser step (``optimizer.register_step_post_hook``), so momentum
and weight decay cannot revive them. Every run checks that perturbing the pruned channels leaves
the logits unchanged (:meth:`ChannelPruner.check_unused`). Note: the tapped stage output itself
may still be non-zero in those channels (e.g. through a residual shortcut); it is unused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import to_float
from ..errors import KDGuardError, check_range
from ..io import read_json, write_json
from ..models import stage_paths
from ..runs import RunResult, evaluate_model
from ..runtime import eval_mode, resolve_device
from ..taps import FeatureEditor, FeatureTaps, resolve_module
from .base import register_defense
from .config import DefenseJob, FinePruneConfig
from .runner import finish_defense, prepare_defense

SELECT_ON = ("val", "clean")
PRUNE_FILE = "prune.json"


@torch.no_grad()
def channel_activations(model: nn.Module, layer: str, images: torch.Tensor, *, batch_size: int = 256,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean activation of each output channel of module ``layer`` over ``images``.

    Args:
        model: classifier taking float ``N×C×H×W`` images in [0, 1]; run in eval mode, fp32.
        layer: module path (e.g. ``"layer3"``); its output must be ``N×C×…`` (4-D maps or N×C).
        images: uint8 ``N×C_in×H×W`` (0–255).
        batch_size: images per forward pass.
        device: where to run.

    Returns:
        float32 tensor of shape ``(C,)``: the mean over images and spatial positions (Liu et al.
        2018 §4: "average activation of each neuron on clean inputs").

    Raises:
        KDGuardError: unknown path, empty ``images`` or an output with fewer than 2 dimensions.
    """
    if len(images) == 0:
        raise KDGuardError("no images to record activations on", "use a larger clean_fraction")
    total: torch.Tensor | None = None
    count = 0
    with FeatureTaps(model, [layer], detach=True) as taps, eval_mode(model):
        for start in range(0, len(images), batch_size):
            _, feats = taps(to_float(images[start:start + batch_size], device))
            f = feats[layer].float()
            if f.dim() < 2:
                raise KDGuardError(f"module {layer!r} outputs shape {tuple(f.shape)}, not N×C×…",
                                   "prune a convolutional stage (fineprune.layer)")
            s = f.sum(dim=[0, *range(2, f.dim())], dtype=torch.float64)
            total = s if total is None else total + s
            count += f.numel() // f.shape[1]
    return (total / count).float().cpu()


@dataclass(frozen=True)
class ChannelConsumer:
    """The module reading a layer's output channels: ``kind`` is linear | conv | batchnorm;
    ``group`` = input features per channel (Linear after a flatten), else 1."""

    path: str
    kind: str
    group: int
    num_channels: int


def find_consumer(model: nn.Module, layer: str, sample: torch.Tensor) -> ChannelConsumer:
    """Find the first parameterised module that runs after ``layer`` in one forward of ``sample``.

    Args:
        model: the classifier.
        layer: module path whose output channels are pruned.
        sample: a small float batch ``N×C×H×W`` in [0, 1] on the model's device.

    Raises:
        KDGuardError: ``layer`` does not exist or is not called; nothing with parameters follows
            it; or the follower is not a Linear (with ``in_features`` a multiple of C), a
            ``Conv2d`` with groups = 1 and C inputs, or an affine BatchNorm over C channels.
    """
    if layer == "":
        raise KDGuardError("fineprune.layer is empty", "name a stage such as 'layer3'")
    target = resolve_module(model, layer)
    order: list[str] = []
    shape: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            order.append(name)
            if module is target and isinstance(output, torch.Tensor):
                shape.setdefault("out", tuple(output.shape))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if m is target or next(m.parameters(recurse=False), None) is not None]
    try:
        with torch.no_grad(), eval_mode(model):
            model(sample)
    finally:
        for h in handles:
            h.remove()
    if layer not in order or "out" not in shape or len(shape["out"]) < 2:
        raise KDGuardError(f"module {layer!r} did not produce an N×C×… tensor in the forward pass",
                           "choose a convolutional stage that the model's forward calls (fineprune.layer)")
    channels = shape["out"][1]
    after = order[order.index(layer) + 1:]
    if not after:
        raise KDGuardError(f"no layer with weights follows {layer!r}", "choose an earlier stage (fineprune.layer)")
    path = after[0]
    m = model.get_submodule(path)
    if isinstance(m, nn.Linear) and m.in_features % channels == 0:
        return ChannelConsumer(path, "linear", m.in_features // channels, channels)
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels == channels:
        return ChannelConsumer(path, "conv", 1, channels)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.num_features == channels:
        return ChannelConsumer(path, "batchnorm", 1, channels)
    raise KDGuardError(f"the output of {layer!r} ({channels} channels) feeds {path!r} "
                       f"({type(m).__name__}), which fine-pruning cannot mask",
                       "set fineprune.layer= to a layer followed by a Linear, an ungrouped Conv2d or an affine "
                       "BatchNorm")


class ChannelPruner:
    """Persistent channel pruning of one layer's output by zeroing its consumer's weights.

    Args:
        model: the classifier (its weights are edited in place).
        layer: module path whose output channels are pruned.
        sample: a small float batch (``N×C×H×W`` in [0, 1], on the model's device) used to find
            the consumer (:func:`find_consumer`).

    Attributes:
        consumer: the :class:`ChannelConsumer`.
        channels: int64 indices of the pruned channels (in pruning order).

    :meth:`prune` sets the pruned set *relative to the consumer weights at construction*
    (restoring them first), so a search can try larger and smaller sets; :meth:`apply`
    re-zeroes the current set (called after every optimiser step once :meth:`attach` ed).

    Raises:
        KDGuardError: see :func:`find_consumer`.
    """

    def __init__(self, model: nn.Module, layer: str, sample: torch.Tensor) -> None:
        self.model = model
        self.layer = layer
        self.consumer = find_consumer(model, layer, sample)
        self._original = {n: p.detach().clone() for n, p in self._module().named_parameters(recurse=False)}
        self.channels = torch.empty(0, dtype=torch.long)

    @property
    def num_channels(self) -> int:
        return self.consumer.num_channels

    @property
    def mask(self) -> torch.Tensor:
        """Bool ``(C,)``: True for kept channels, False for pruned ones."""
        keep = torch.ones(self.num_channels, dtype=torch.bool)
        keep[self.channels] = False
        return keep

    def _module(self) -> nn.Module:
        return self.model.get_submodule(self.consumer.path)

    @torch.no_grad()
    def prune(self, channels: Sequence[int] | torch.Tensor) -> None:
        """Prune exactly ``channels`` (indices in ``[0, C)``, no repeats)."""
        idx = torch.as_tensor(list(map(int, channels)), dtype=torch.long)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_channels or len(idx.unique()) != len(idx)):
            raise KDGuardError(f"channels {idx.tolist()} are not distinct indices in [0, {self.num_channels})",
                               "delete prune.json in the run directory to search again")
        for name, p in self._module().named_parameters(recurse=False):
            p.copy_(self._original[name].to(device=p.device, dtype=p.dtype))
        self.channels = idx
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the consumer weights of the pruned channels (idempotent)."""
        if len(self.channels) == 0:
            return
        m = self._module()
        idx = self.channels.to(m.weight.device)
        if self.consumer.kind == "linear":
            g = self.consumer.group
            cols = (idx[:, None] * g + torch.arange(g, device=idx.device)).flatten()
            m.weight[:, cols] = 0
        elif self.consumer.kind == "conv":
            m.weight[:, idx] = 0
        else:
            m.weight[idx] = 0
            m.bias[idx] = 0

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-apply the mask after every ``optimizer.step()``; returns the removable hook handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())

    @torch.no_grad()
    def check_unused(self, sample: torch.Tensor) -> None:
        """Check that large noise added to the pruned channels of ``layer`` leaves the logits unchanged.

        Raises:
            KDGuardError: the logits change, i.e. the layer's output also reaches other modules
                than the consumer (the pruning would be incomplete).
        """
        if len(self.channels) == 0:
            return
        gen = torch.Generator().manual_seed(0)
        pruned = ~self.mask

        def perturb(out: torch.Tensor) -> torch.Tensor:
            noise = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
            where = pruned.to(out.device).view(1, -1, *([1] * (out.dim() - 2)))
            return out + noise * where * (10.0 * (out.abs().mean() + 1.0))

        with eval_mode(self.model):
            ref = self.model(sample).float()
            with FeatureEditor(self.model, {self.layer: perturb}):
                edited = self.model(sample).float()
        tol = 1e-4 * (1.0 + float(ref.abs().max()))
        if not torch.allclose(ref, edited, rtol=1e-4, atol=tol):
            raise KDGuardError(f"pruned channels of {self.layer!r} still change the output through modules other "
                               f"than {self.consumer.path!r}",
                               "choose a layer whose output feeds only the next layer (fineprune.layer)")


def select_prune_count(pruner: ChannelPruner, order: torch.Tensor, accuracy: Callable[[], dict[str, Any]], *,
                       tolerance: float = 0.10, step_ratio: float = 0.01,
                       max_ratio: float = 1.0) -> tuple[int, list[dict[str, Any]]]:
    """Prune ``order[:k]`` for growing k while the relative clean-accuracy drop stays ≤ ``tolerance``.

    Args:
        pruner: the layer's :class:`ChannelPruner` (left with the selected set pruned).
        order: int64 ``(C,)`` channel indices, lowest mean activation first.
        accuracy: evaluates the model as it is now; returns a dict with ``"ca"`` in [0, 1] (and
            optionally ``"asr"``, logged only).
        tolerance: maximum ``(CA₀ − CA_k)/CA₀``, in [0, 1].
        step_ratio: channels added per step as a fraction of C, in (0, 1]; at least 1.
        max_ratio: upper bound on k/C, in [0, 1]; k never reaches C.

    Returns:
        ``(k, curve)``: the number of pruned channels and one record per evaluated k
        (``k``, ``ratio``, ``ca``, ``asr``, ``relative_drop``), including the one that stopped
        the search.

    Raises:
        KDGuardError: an option out of range or ``order`` not of length C.
    """
    check_range("fineprune.ca_tolerance", tolerance, 0.0, 1.0)
    check_range("fineprune.step_ratio", step_ratio, 0.0, 1.0, low_open=True)
    check_range("fineprune.max_ratio", max_ratio, 0.0, 1.0)
    c = pruner.num_channels
    if len(order) != c:
        raise KDGuardError(f"channel order has {len(order)} entries for {c} channels", "rank every channel once")
    step = max(1, math.ceil(step_ratio * c))
    max_k = min(c - 1, math.floor(max_ratio * c))
    pruner.prune([])
    base = accuracy()
    ca0 = float(base["ca"])
    curve = [{"k": 0, "ratio": 0.0, "ca": ca0, "asr": base.get("asr"), "relative_drop": 0.0}]
    best = 0
    for k in range(step, max_k + 1, step):
        pruner.prune(order[:k])
        m = accuracy()
        drop = (ca0 - float(m["ca"])) / max(ca0, 1e-12)
        curve.append({"k": k, "ratio": k / c, "ca": float(m["ca"]), "asr": m.get("asr"), "relative_drop": drop})
        if drop > tolerance:
            break
        best = k
    pruner.prune(order[:best])
    return best, curve


def _check_options(cfg: FinePruneConfig) -> None:
    if cfg.select_on not in SELECT_ON:
        raise KDGuardError(f"fineprune.select_on {cfg.select_on!r} is not valid", "use val or clean")
    check_range("fineprune.ca_tolerance", cfg.ca_tolerance, 0.0, 1.0)
    check_range("fineprune.step_ratio", cfg.step_ratio, 0.0, 1.0, low_open=True)
    check_range("fineprune.max_ratio", cfg.max_ratio, 0.0, 1.0)


@register_defense("fp", title="Fine-pruning", stage="before", clean_fraction=0.05, labels=True,
                  teacher_access=True, source="Liu, Dolan-Gavitt & Garg, RAID 2018; stopping rule after "
                  "BackdoorBench fp")
def run_fineprune(job: DefenseJob, *, threads: int | None = None) -> RunResult:
    """Fine-prune the poisoned model ``job.model`` (see the module docstring for the exact rule).

    Writes ``prune.json`` (layer, consumer, activations, pruned channels, the pruning curve on
    the selection data) next to the usual artefacts; a restarted run reuses it and resumes the
    fine-tuning from ``train_state.pt``.

    Raises:
        KDGuardError: bad ``fineprune`` options, a layer that cannot be pruned, or see
            :func:`kdguard.defenses.runner.prepare_defense`.
    """
    cfg = job.fineprune
    _check_options(cfg)
    ctx = prepare_defense(job, threads=threads)
    model = ctx.model
    device = resolve_device(job.train.device)
    model.to(device)
    layer = cfg.layer or stage_paths(model, "stages")[-1]
    sample = to_float(ctx.clean.images[:8], device)
    pruner = ChannelPruner(model, layer, sample)
    record_path = ctx.out / PRUNE_FILE
    if record_path.exists():
        record = read_json(record_path)
        if record.get("layer") != layer or record.get("consumer") != pruner.consumer.path:
            raise KDGuardError(f"{record_path} was written for layer {record.get('layer')!r}, not {layer!r}",
                               "use a fresh output directory or delete prune.json")
        pruner.prune(record["pruned"])
    else:
        acts = channel_activations(model, layer, ctx.clean.images, batch_size=job.train.eval_batch_size,
                                   device=device)
        order = torch.argsort(acts, stable=True)
        select = ctx.data.val if cfg.select_on == "val" else ctx.clean

        def accuracy() -> dict[str, Any]:  # the defender's rule reads CA only; ASR is logged on request
            m = evaluate_model(model, select, ctx.attack if cfg.track_asr else None, train_cfg=job.train)
            return {"ca": m.ca, "asr": m.asr}

        k, curve = select_prune_count(pruner, order, accuracy, tolerance=cfg.ca_tolerance,
                                      step_ratio=cfg.step_ratio, max_ratio=cfg.max_ratio)
        record = {"layer": layer, "consumer": pruner.consumer.path, "consumer_kind": pruner.consumer.kind,
                  "num_channels": pruner.num_channels, "num_pruned": k, "ratio": k / pruner.num_channels,
                  "pruned": order[:k].tolist(), "activations": acts.tolist(), "select_on": cfg.select_on,
                  "curve": curve, "pruned_test_metrics": ctx.test_metrics(model)}
        write_json(record_path, record)
    pruner.check_unused(sample)
    history = ctx.fit(model, run_dir=ctx.out, desc="fp", setup=lambda trainer: pruner.attach(trainer.optimizer))
    pruner.apply()
    pruner.check_unused(sample)
    summary = {k: record[k] for k in ("layer", "consumer", "consumer_kind", "num_channels", "num_pruned",
                                      "ratio", "pruned", "select_on")}
    curve = record["curve"]
    notes = (f"Pruned {record['num_pruned']} of {record['num_channels']} channels of `{layer}` (zeroed in "
             f"`{pruner.consumer.path}`); {cfg.select_on} CA {100 * curve[0]['ca']:.2f}% unpruned → "
             f"{100 * curve[[c['k'] for c in curve].index(record['num_pruned'])]['ca']:.2f}% pruned "
             f"(tolerance {cfg.ca_tolerance:.0%} relative). Pruning curve in `{PRUNE_FILE}`.")
    return finish_defense(ctx, model, histories={"fine-tuning (pruned)": history},
                          extra_rows=[("pruned, before fine-tuning", ctx.arch, record["pruned_test_metrics"])],
                          extra_manifest={"fineprune": summary}, notes=notes)
