"""The shuffled teacher of ABD's Shuffling Vaccine: copies of the teacher whose last layers see
their input channels in a random order.

Why it works (Hong et al., ICML 2023, §4.1): a backdoor rides on a few channels, clean evidence
on many. Permuting the input channels of the last convolutions wrecks the clean function but
tends to leave the trigger → target shortcut standing, so a sample on which the shuffled teacher
still agrees with the teacher is suspicious.

Layer choice. The reference picks "the last k state-dict keys containing ``conv``", which does
nothing useful on models whose convolutions are named otherwise. kdguard runs one forward pass
with hooks and takes the last ``k`` *executed* ``nn.Conv2d`` modules that mix channels
(``groups == 1``, more than one input channel; a depthwise convolution has nothing to permute).
A model without such convolutions (an MLP) falls back to its ``nn.Linear`` layers with more than
one input feature, permuting input features. A negative ``k`` takes the first ``|k|`` layers from
the input side, as the reference's negative ``n_shuf_layer`` does.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from ..errors import KDGuardError


def _mixes_channels(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels > 1


def _mixes_features(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.in_features > 1


def execution_order(model: nn.Module, example: torch.Tensor,
                    predicate=lambda m: True) -> list[str]:
    """Module paths of ``model`` in the order of their first call on ``example``.

    Args:
        model: any ``nn.Module`` (run once under ``no_grad``; its train/eval mode is kept, BN
            running statistics are restored afterwards).
        example: a valid input batch, e.g. ``N×C×H×W``.
        predicate: keep only modules for which it is true.

    Raises:
        KDGuardError: the forward pass fails on ``example``.
    """
    order: list[str] = []
    handles = []
    for path, module in model.named_modules():
        if path and predicate(module):
            def hook(_m, _i, _o, path=path):
                if path not in order:
                    order.append(path)
            handles.append(module.register_forward_hook(hook))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:  # noqa: BLE001 - any failure here means the model does not fit the data
        raise KDGuardError(f"the model failed on an example batch of shape {tuple(example.shape)} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                           "check that the teacher matches the data set's image shape") from None
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return order


def select_shuffle_layers(model: nn.Module, example: torch.Tensor, layers: int = 5) -> list[str]:
    """The module paths ABD's vaccine shuffles: the last ``layers`` channel-mixing convolutions
    by execution order (see the module docstring), or the first ``|layers|`` if negative.

    Returns:
        Paths in execution order. Fewer than ``|layers|`` when the model has fewer (a warning says so).

    Raises:
        KDGuardError: ``layers == 0``, or the model has no convolution or linear layer to shuffle.
    """
    if layers == 0:
        raise KDGuardError("0 layers to shuffle", "give the number of last convolutions, e.g. 5")
    order = execution_order(model, example, _mixes_channels)
    kind = "convolutions"
    if not order:
        order = execution_order(model, example, _mixes_features)
        kind = "linear layers"
    if not order:
        raise KDGuardError(f"{type(model).__name__} has no convolution or linear layer with more "
                           "than one input channel to shuffle", "ABD's vaccine needs such layers")
    chosen = order[-layers:] if layers > 0 else order[:-layers]
    if len(chosen) < abs(layers):
        warnings.warn(f"shuffling all {len(chosen)} {kind} of {type(model).__name__} "
                      f"(asked for {abs(layers)})", stacklevel=2)
    return chosen


def permute_input_channels(module: nn.Module, perm: torch.Tensor) -> None:
    """Permute, in place, the input-channel axis (dim 1) of a convolution or linear weight:
    ``W ← W[:, perm]``: input channel ``j`` is now weighted as channel ``perm[j]`` was, i.e. the
    layer computes what it computed before on the input with channels reordered by ``perm⁻¹``.

    Raises:
        KDGuardError: ``perm`` is not a permutation of the module's input channels.
    """
    weight = module.weight
    n = weight.shape[1]
    if perm.dim() != 1 or len(perm) != n or not torch.equal(perm.sort().values.cpu(), torch.arange(n)):
        raise KDGuardError(f"{perm.tolist()[:8]}... is not a permutation of {n} input channels",
                           "pass torch.randperm(in_channels)")
    with torch.no_grad():
        weight.copy_(weight[:, perm.to(weight.device)].clone())


class _LeafTracer(fx.Tracer):
    """torch.fx tracer that also keeps custom modules without children (e.g. an input
    normalisation with a shape check) as leaves instead of tracing into them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or next(m.children(), None) is None


def split_before(model: nn.Module, paths: Sequence[str]) -> fx.GraphModule:
    """``model`` as a traced module whose ``submod_0`` runs everything before the first call of
    any module in ``paths`` and ``submod_1`` the rest (``torch.fx.passes.split_module``).

    Raises:
        Exception: whatever torch.fx raises for a model it cannot trace (control flow on tensors).
    """
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    wanted, seen = set(paths), [False]

    def partition(node: fx.Node) -> int:
        if node.op == "call_module" and node.target in wanted:
            seen[0] = True
        return 1 if seen[0] else 0

    split = split_module(gm, model, partition)
    if not hasattr(split, "submod_1"):
        raise ValueError("the shuffled layers are never called")
    return split


class _MeanOfHeads(nn.Module):
    """Runs every copy's head on the shared trunk outputs and averages the logits."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(*inputs) for head in self.heads]).mean(0)


class ShuffledTeacher(nn.Module):
    """An ensemble of ``ensemble`` copies of ``teacher``, each with the input channels of the
    chosen layers randomly permuted; its output is the mean of the copies' logits (T̃ in ABD).

    The teacher itself is never modified: each copy is a deep copy, frozen and in eval mode.
    The permutations (``perms[i][path]``) define the model completely, so :meth:`state_dict`-style
    persistence stores only them (:meth:`get_perms` / :meth:`set_perms`).

    Args:
        teacher: the (frozen) teacher.
        example: one valid input batch (float ``N×C×H×W``) to find the layers by execution order.
        layers: see :func:`select_shuffle_layers` (reference default 5).
        ensemble: number of shuffled copies (reference default 3).
        generator: torch RNG for the permutations (CPU generator).

    Input ``x``: float ``N×C×H×W`` in the teacher's input space; output: logits ``N×K``.

    Speed: the copies differ only from the first shuffled layer on, so where torch.fx can trace
    the model the layers before it (the *trunk*) run once per batch and only the rest runs once
    per copy (the same logits, checked on ``example`` when built; the plain ensemble is the
    fallback, ``shared_trunk`` says which is used). With ResNet-20 and the last five
    convolutions, the trunk is the first two of three stages, so three copies cost about
    1 + 2·(1/3) teacher passes instead of 3.
    """

    def __init__(self, teacher: nn.Module, example: torch.Tensor, *, layers: int = 5, ensemble: int = 3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if ensemble < 1:
            raise KDGuardError(f"ensemble size {ensemble} must be >= 1", "use e.g. 3")
        self._teacher = [teacher]  # a plain list: not a submodule, never saved or moved with us
        # the shared-trunk check runs on random images of the example's shape, not on zeros
        self._example = torch.rand(example[:2].shape, generator=torch.Generator().manual_seed(0)).to(example)
        self.paths = select_shuffle_layers(teacher, example, layers)
        self.ensemble_size = int(ensemble)
        self.members = nn.ModuleList()
        self.fast: nn.Module | None = None
        self.perms: list[dict[str, torch.Tensor]] = []
        self.reshuffle(generator)

    @property
    def shared_trunk(self) -> bool:
        return self.fast is not None

    def _build_fast_path(self) -> None:
        self.fast = None
        try:
            splits = [split_before(member, self.paths) for member in self.members]
            fast = splits[0]  # its trunk: copy 0's layers before the first shuffle (hook-free)
            fast.submod_1 = _MeanOfHeads([sp.submod_1 for sp in splits])
            with torch.no_grad():
                ok = torch.allclose(fast(self._example), self._slow_forward(self._example),
                                    rtol=1e-4, atol=1e-5)
        except Exception:  # noqa: BLE001 - any tracing problem means: use the plain ensemble
            return
        if ok:
            self.fast = fast

    def _fresh_copy(self) -> nn.Module:
        member = copy.deepcopy(self._teacher[0]).eval()
        for p in member.parameters():
            p.requires_grad_(False)
        for m in member.modules():  # hooks other tools put on the teacher (BN statistics, taps)
            # were deep-copied along and would record the copies' activations as the teacher's
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            m._backward_hooks.clear()
        return member

    def _channels(self, path: str) -> int:
        return self._teacher[0].get_submodule(path).weight.shape[1]

    def set_perms(self, perms: Sequence[dict[str, torch.Tensor]]) -> None:
        """Rebuild the copies from the teacher and the given permutations (one dict per copy).

        Raises:
            KDGuardError: the permutations do not fit the chosen layers.
        """
        if len(perms) != self.ensemble_size or any(set(p) != set(self.paths) for p in perms):
            raise KDGuardError("saved shuffle permutations do not match the teacher's layers",
                               "resume with the same teacher and abd.sv settings, or start afresh")
        members = []
        for perm in perms:
            member = self._fresh_copy()
            for path in self.paths:
                permute_input_channels(member.get_submodule(path), perm[path])
            members.append(member)
        self.members = nn.ModuleList(members)
        self.perms = [{k: v.clone().cpu() for k, v in p.items()} for p in perms]
        self._build_fast_path()

    def get_perms(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.clone() for k, v in p.items()} for p in self.perms]

    def reshuffle(self, generator: torch.Generator | None = None) -> None:
        """Draw new permutations for every copy (the vaccine's re-trial)."""
        perms = [{path: torch.randperm(self._channels(path), generator=generator) for path in self.paths}
                 for _ in range(self.ensemble_size)]
        self.set_perms(perms)

    def train(self, mode: bool = True) -> ShuffledTeacher:  # the copies stay in eval mode
        return super().train(False)

    def _slow_forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [member(x) for member in self.members]
        return torch.stack(logits).mean(0) if len(logits) > 1 else logits[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x) if self.fast is not None else self._slow_forward(x)
