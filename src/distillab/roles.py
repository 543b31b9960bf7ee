"""Feature roles: where a model's features are, described once by the model, asked for by role by the methods.

A method never names a module of a zoo model. It asks `roles(model)` for a `FeatureInfo` and picks by role:
"the output of stage i", "stage i before its last activation", "the map the head pools", "the pooled
vector", "every block of stage i". Zoo models declare theirs statically (`StagedNet.feature_info`, no forward
pass); any other model can carry a `feature_info` attribute, or the method's layer options name its modules.

Tap names are `FeatureTap` names: a module path, or `<path>:input` for the module's input (a pre-activation is
the input of the ReLU that follows it).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distillab.errors import ConfigError


@dataclass(frozen=True)
class StageInfo:
    """One stage (a resolution level) of a backbone."""

    name: str  # tap name of the stage output
    channels: int
    reduction: int  # input side / output side, as designed (a 2x2 pool with ceil mode still counts 2)
    blocks: tuple[str, ...]  # tap names of its blocks' outputs, shallow to deep
    block_preacts: tuple[str | None, ...]  # each block's output before its final ReLU; None: it ends without one
    preact: str | None  # the stage output before its final ReLU (its last block's); None: it ends without one
    # the pre-activation the *next* layer computes from this output: `preact` for post-activation blocks; for
    # pre-activation blocks (WRN) the next block's normalised input before its ReLU; None where there is none
    next_preact: str | None
    # per block, the same for its own output (the last is `next_preact`): `block_preacts` for post-activation blocks,
    # the next BN's output (the next block's, or the head's) for pre-activation ones; empty: not declared
    block_next_preacts: tuple[str | None, ...] = ()
    # per block, the module path of the BatchNorm whose affine output (bias, |weight|) models that map, as Overhaul's
    # margin reads it: that BN itself for pre-activation blocks, the BN ending the residual branch before the sum for
    # post-activation ones; None where none is declared
    block_next_preact_bns: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class FeatureInfo:
    """Every feature role of a classifier."""

    stages: tuple[StageInfo, ...]
    prepool: str  # tap name of the map the head pools globally
    prepool_preact: str | None  # that map before its final ReLU; None: there is none
    pooled: str  # tap name of the pooled vector (B x channels)
    channels: int  # channels of the pre-pool map and of the pooled vector
    last_conv: str | None  # module path of the last conv before global pooling (where RDR branches go)
    classifier: str | None = None  # module path of the Linear that maps the pooled vector to the logits

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def stage_preacts(self) -> list[str]:
        """Every stage before its last ReLU, or the stage output itself where it ends without one (the teacher
        features of ReviewKD-style methods: the closest tensor to a pre-activation)."""
        return [s.preact or s.name for s in self.stages]

    def stage(self, index: int) -> StageInfo:
        """Stage `index` (negative from the end); an index past the last stage gives the last."""
        return self.stages[min(index, len(self.stages) - 1)]


def roles(model: nn.Module, option: str | None = None) -> FeatureInfo:
    """The model's feature roles. A model without any is refused naming the option that would replace them."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, FeatureInfo):
        return info
    fix = f"set method.options.{option} to its module path(s)" if option else "give it a `feature_info`"
    raise ConfigError(f"{type(model).__name__} declares no feature roles (stages, pre-pool map, pooled vector): "
                      f"{fix}")
