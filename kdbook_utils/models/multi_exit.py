"""Multi-exit networks: a zoo model with extra classifier heads ("exits") after intermediate stages.

``MultiExit(create_model("resnet8", 10))`` attaches heads after ``stage1`` and ``stage2``; ``forward``
runs the backbone once, stage by stage (a zoo model's forward is exactly its named stages in order),
branches each head off its stage's output and returns the list of every exit's logits. The last exit is
the backbone's own classifier, so the deployed single-path network is the ordinary model. The wrapped
model is read, never edited.

Two head designs (what goes into a head is an open question of multi-exit distillation papers):

* ``heads="copy"``: a freshly initialised copy of the backbone's remaining stages, then pooling and a new
  classifier (HSAKD's auxiliary classifiers). Strong exits, but exit 1 costs about as much as the whole
  single-exit network: built for accuracy (an ensemble of exits), not for saving computation.
* ``heads="light"``: one 3x3 stride-2 conv-BN-ReLU to the final feature width, pooling and a classifier
  (BYOT/SCAN-style). Cheap exits, so early exit can save computation; weaker early exits.

:func:`exit_costs` tabulates what reaching each exit costs (MACs; FLOPs = 2 x MACs).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from kdbook_utils.metrics import count_flops, count_parameters

FINAL_EXIT = "final"
"""Name of the last exit: the backbone's own classifier."""

HEAD_STYLES: tuple[str, ...] = ("copy", "light")


def _stage_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


def _check_zoo_model(model: nn.Module) -> None:
    """MultiExit needs a zoo model: an nn.Sequential of named stages with feature points and a classifier."""
    if not isinstance(model, nn.Sequential) or not getattr(model, "feature_points", None):
        raise TypeError(
            "MultiExit needs a zoo model (an nn.Sequential of named stages with .feature_points), "
            f"e.g. create_model('resnet8', 10); got {type(model).__name__}."
        )
    if (
        not isinstance(getattr(model, "classifier", None), nn.Linear)
        or _stage_names(model)[-1] != "classifier"
    ):
        raise TypeError(
            f"MultiExit needs the model's last stage to be an nn.Linear called 'classifier'; its stages are "
            f"{_stage_names(model)}."
        )


def valid_exit_points(model: nn.Module) -> tuple[str, ...]:
    """Stages an exit may follow: every feature point except the last (whose exit is the model's own)."""
    _check_zoo_model(model)
    return tuple(model.feature_points[:-1])


def default_exit_points(model: nn.Module, max_heads: int = 3) -> tuple[str, ...]:
    """The first ``max_heads`` feature points after the stem, but not the last.

    ResNet-18/50 (``stem, stage1..stage4``): stage1, stage2, stage3, so 4 exits as in MSKD's tables.
    VGG8/13 (``block1..block5``): block1, block2, block3. CIFAR ResNets and WRNs (three stages):
    stage1, stage2, so 3 exits.
    """
    points = [name for name in valid_exit_points(model) if name != "stem"]
    return tuple(points[:max_heads])


def reinitialise(module: nn.Module) -> None:
    """Fresh weights for a copied head: PyTorch's defaults, then He-normal convolutions as the zoo uses."""
    for submodule in module.modules():
        if hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()
        if isinstance(submodule, nn.Conv2d):
            nn.init.kaiming_normal_(submodule.weight, mode="fan_out", nonlinearity="relu")


def _first_conv_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise TypeError("The model has no nn.Conv2d, so MultiExit cannot tell its input channels.")


@torch.no_grad()
def stage_output_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch dimension) of every named stage for one input of ``input_shape``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((1, *input_shape), device=device)
        shapes = {}
        for name, stage in model.named_children():
            x = stage(x)
            shapes[name] = tuple(x.shape[1:])
    finally:
        model.train(was_training)
    return shapes


class MultiExit(nn.Module):
    """A zoo model with extra classifier heads after named stages; ``forward`` returns every exit.

    Args:
        model: a zoo model (``create_model(...)``); its weights become the shared backbone.
        exits: the stages to attach heads after; default :func:`default_exit_points`.
        heads: ``"copy"`` or ``"light"`` (see the module's docstring).
        input_shape: ``(C, H, W)`` of one image, used to size light heads (default: 32x32).

    The exits are named by the stage they follow and the last is ``"final"``, so ``exit_names`` is e.g.
    ``("stage1", "stage2", "final")``.
    """

    def __init__(
        self,
        model: nn.Module,
        exits: Sequence[str] | None = None,
        heads: str = "copy",
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_zoo_model(model)
        if heads not in HEAD_STYLES:
            raise ValueError(f"heads must be one of {HEAD_STYLES}; got {heads!r}.")
        valid = valid_exit_points(model)
        if isinstance(exits, str):
            raise TypeError(f"exits must be a sequence of stage names, e.g. ({exits!r},), not a string.")
        chosen = default_exit_points(model) if exits is None else tuple(exits)
        unknown = [name for name in chosen if name not in valid]
        if unknown:
            raise ValueError(
                f"Cannot attach an exit after {unknown}: this {getattr(model, 'arch', type(model).__name__)} "
                f"can have exits after {list(valid)} (its last feature point's exit is the model's own "
                f"classifier, {FINAL_EXIT!r})."
            )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"Each stage can carry one exit; got duplicates in {list(chosen)}.")
        stages = _stage_names(model)
        self.exit_points: tuple[str, ...] = tuple(sorted(chosen, key=stages.index))
        self.head_style = heads
        self.backbone = model
        self.input_shape = (
            tuple(input_shape) if input_shape is not None else (_first_conv_channels(model), 32, 32)
        )
        self.heads = nn.ModuleDict({name: self._make_head(name) for name in self.exit_points})

    @property
    def exit_names(self) -> tuple[str, ...]:
        """Names of the exits in forward order; the last is ``"final"`` (the backbone's classifier)."""
        return (*self.exit_points, FINAL_EXIT)

    @property
    def arch(self) -> str:
        """E.g. ``resnet20+exits(stage1,stage2;copy)``: checkpoints of other exit layouts are refused."""
        backbone = getattr(self.backbone, "arch", type(self.backbone).__name__)
        return f"{backbone}+exits({','.join(self.exit_points)};{self.head_style})"

    @property
    def num_exits(self) -> int:
        return len(self.exit_points) + 1

    @property
    def num_classes(self) -> int:
        return self.backbone.classifier.out_features

    def _make_head(self, after: str) -> nn.Sequential:
        stages = dict(self.backbone.named_children())
        names = list(stages)
        classifier = self.backbone.classifier
        new_classifier = nn.Linear(classifier.in_features, classifier.out_features)
        if self.head_style == "copy":
            rest = names[names.index(after) + 1 : names.index("classifier")]
            layers = {name: copy.deepcopy(stages[name]) for name in rest}
            head = nn.Sequential(OrderedDict([*layers.items(), ("classifier", new_classifier)]))
        else:
            in_channels = stage_output_shapes(self.backbone, self.input_shape)[after][0]
            head = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, classifier.in_features, 3, stride=2, padding=1, bias=False),
                    bn=nn.BatchNorm2d(classifier.in_features),
                    relu=nn.ReLU(),
                    pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                    classifier=new_classifier,
                )
            )
        reinitialise(head)
        return head

    def forward(self, x: Tensor) -> list[Tensor]:
        check_input = getattr(self.backbone, "check_input", None)
        if check_input is not None:  # the stages run one by one here, so the backbone's own check would not
            check_input(x)
        outputs = []
        for name, stage in self.backbone.named_children():
            x = stage(x)
            if name in self.heads:
                outputs.append(self.heads[name](x))
        outputs.append(x)  # after 'classifier': the backbone's own logits
        return outputs

    def exit_costs(self, input_shape: Sequence[int] | None = None) -> pd.DataFrame:
        """Parameters and MACs up to each exit (see :func:`exit_costs`)."""
        return exit_costs(self, input_shape)


def exit_costs(multi_exit: MultiExit, input_shape: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per exit: what it costs to reach that exit, per image (MACs; FLOPs are 2 x MACs).

    * ``backbone_macs``: the backbone up to the exit's stage (the whole network for ``final``);
    * ``head_macs`` / ``head_params``: the exit's own head (0 for ``final``);
    * ``path_macs`` / ``path_params``: backbone up to the exit + its head, i.e. the cost of a network
      that *only* has this exit (the final row is the plain single-exit model);
    * ``early_exit_macs``: the cost of an image that *leaves* at this exit during early exit: the
      backbone up to the exit plus every head evaluated on the way, the rejected earlier ones included;
    * ``relative_macs``: ``early_exit_macs`` / the single-exit model's MACs.
    """
    shape = tuple(input_shape) if input_shape is not None else multi_exit.input_shape
    was_training = multi_exit.training
    try:
        backbone = multi_exit.backbone
        stages = list(backbone.named_children())
        names = [name for name, _ in stages]
        shapes = stage_output_shapes(backbone, shape)
        full = count_flops(backbone, shape)
        rows = []
        heads_so_far = 0
        for exit_name in multi_exit.exit_names:
            if exit_name == FINAL_EXIT:
                backbone_macs, head_macs, head_params = full.macs, 0, 0
                path_params = count_parameters(backbone)
            else:
                prefix = nn.Sequential(OrderedDict(stages[: names.index(exit_name) + 1]))
                backbone_macs = count_flops(prefix, shape).macs
                head = multi_exit.heads[exit_name]
                head_macs = count_flops(head, shapes[exit_name]).macs
                head_params = count_parameters(head)
                path_params = count_parameters(prefix) + head_params
            heads_so_far += head_macs
            early = backbone_macs + heads_so_far
            rows.append({
                "exit": exit_name, "backbone_macs": backbone_macs, "head_macs": head_macs,
                "head_params": head_params, "path_macs": backbone_macs + head_macs, "path_params": path_params,
                "early_exit_macs": early, "relative_macs": early / full.macs,
            })  # fmt: skip
    finally:
        multi_exit.train(was_training)  # counting runs stages in eval mode through temporary containers
    return pd.DataFrame(rows).set_index("exit")
