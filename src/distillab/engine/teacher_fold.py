"""The frozen teacher's fast path: its BatchNorm layers folded into the convolutions that feed them.

A frozen teacher runs in eval mode, so `bn(conv(x))` is one affine map of `conv(x)` and folds exactly into the
conv (`distillab.reparam.fuse_conv_bn`). Pairs are found by a dry run: a BN is folded when its input is the very
tensor a conv produced, no other module reads that tensor, and no tap of the method reads the conv's output or the
BN's input (taps on the BN itself, now an Identity, see the same values). The folded teacher is then checked
against the original on a random batch, logits and every tapped feature; when they differ (a conv output that a
functional op reads too, which hooks cannot see: a pre-activation block's shortcut), only the pairs that pass one
by one are folded.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distillab.features import FeatureTap, _split
from distillab.methods.base import Method
from distillab.reparam import fuse_conv_bn_modules

TOLERANCE = 1e-5  # relative to the largest value of each compared tensor


def foldable_pairs(model: nn.Module, input_shape: tuple[int, ...], tapped: list[str] = ()) -> list[tuple[str, str]]:
    """(conv, bn) module paths of every BN that folds into the conv before it (see the module docstring)."""
    # id of a conv's output -> (the conv, the tensor, kept alive so that no later tensor takes its id)
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    reads: Counter[int] = Counter()  # id of a tensor -> how many modules took it as their first input
    bn_input: dict[str, int] = {}
    handles = []

    def _produce(out: torch.Tensor, name: str) -> None:
        produced[id(out)] = (name, out)
        reads[id(out)] = 0  # reads of an earlier, freed tensor that had this id do not count

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: _produce(out, name)))
        if isinstance(module, _BatchNorm) and not list(module.children()):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: bn_input.__setitem__(name, id(args[0]))))
        if not list(module.children()):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args: reads.update([id(args[0])]) if args and isinstance(args[0], torch.Tensor) else None))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(2, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    read_as_input = {_split(n)[0] for n in tapped if _split(n)[1]}
    read_as_output = {_split(n)[0] for n in tapped if not _split(n)[1]}
    pairs = []
    for bn, tensor in bn_input.items():
        conv = produced.get(tensor, (None,))[0]
        if conv is None or reads[tensor] != 1 or bn in read_as_input or conv in read_as_output:
            continue
        if model.get_submodule(bn).num_features == model.get_submodule(conv).out_channels:
            pairs.append((conv, bn))
    return pairs


def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """A copy of `model` (eval-mode semantics) with each (conv, bn) pair folded: the conv computes bn(conv(x)),
    the BN becomes an Identity of the same name."""
    folded = copy.deepcopy(model).eval()
    for conv, bn in pairs:
        _replace(folded, conv, fuse_conv_bn_modules(folded.get_submodule(conv), folded.get_submodule(bn)))
        _replace(folded, bn, nn.Identity())
    return folded


def fold_frozen_teacher(teacher: nn.Module, input_shape: tuple[int, ...], tapped: list[str] = ()
                        ) -> tuple[nn.Module, int]:
    """The teacher with its foldable BNs folded and the number folded; the teacher itself (and 0) when nothing
    folds or the folded copy does not reproduce its logits and tapped features within TOLERANCE."""
    pairs = foldable_pairs(teacher, input_shape, tapped)
    if not pairs:
        return teacher, 0
    folded = fold_batchnorm(teacher, pairs)
    if not same_outputs(teacher, folded, input_shape, tapped):  # a conv output also read by a functional op:
        pairs = [p for p in pairs  # keep the pairs that reproduce the teacher one by one, then check them together
                 if same_outputs(teacher, fold_batchnorm(teacher, [p]), input_shape, tapped)]
        folded = fold_batchnorm(teacher, pairs)
        if not pairs or not same_outputs(teacher, folded, input_shape, tapped):
            return teacher, 0
    return folded.requires_grad_(False), len(pairs)


def same_outputs(a: nn.Module, b: nn.Module, input_shape: tuple[int, ...], tapped: list[str] = ()) -> bool:
    """Whether two models give the same logits and tapped features (eval mode) on one random batch."""
    param = next(a.parameters())
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0)).to(param)
    outputs = []
    for model in (a, b):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), FeatureTap(model, tapped) as tap:
                outputs.append([model(x), *tap.values()])
        finally:
            model.train(was_training)
    return all(torch.allclose(u, v, rtol=0, atol=TOLERANCE * max(float(u.abs().max()), 1.0))
               for u, v in zip(*outputs, strict=True))


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def fold_method_teacher(method: Method, channels_last: bool) -> int:
    """Replace `method`'s frozen teacher with its BNs folded into its convs, where that reproduces it (taps
    included); returns the number folded."""
    tapped = [name for tap in method.teacher_taps for name in tap.names]
    folded, count = fold_frozen_teacher(method.teacher, method.input_shape, tapped)
    if count:
        if channels_last:
            folded.to(memory_format=torch.channels_last)
        method.replace_teacher(folded)
    return count
