"""FeatureExtractor (forward hooks) and layer_table."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kdbook_utils.features import FeatureExtractor, TrainingModeFeaturesWarning, eval_mode, layer_table
from kdbook_utils.metrics import count_parameters
from kdbook_utils.models import create_model


def hook_count(model: nn.Module) -> int:
    """Forward hooks currently registered on any module of ``model``."""
    return sum(len(module._forward_hooks) for module in model.modules())


@pytest.fixture(scope="module")
def resnet8() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", 10).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_features_equal_the_stage_outputs(resnet8: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad(), FeatureExtractor(resnet8, resnet8.feature_points) as extractor:
        logits, features = extractor.forward_with_features(images)
        expected, x = {}, images
        for name, stage in resnet8.named_children():
            x = stage(x)
            expected[name] = x
    assert list(features) == list(resnet8.feature_points)
    for name, feature in features.items():
        assert torch.equal(feature, expected[name])
    assert torch.equal(logits, expected["classifier"])
    assert features["stem"].shape == (2, 16, 32, 32)
    assert features["stage3"].shape == (2, 64, 8, 8)


def test_any_module_path_and_the_requested_order(resnet8: nn.Module, images: torch.Tensor) -> None:
    layers = ["stage3", "stage2.0.conv1", "stem.bn"]
    with torch.no_grad(), FeatureExtractor(resnet8, layers) as extractor:
        features = extractor(images)
        stage1_output = resnet8.stage1(resnet8.stem(images))
        expected_conv1 = resnet8.get_submodule("stage2.0.conv1")(stage1_output)
        expected_bn = resnet8.stem.bn(resnet8.stem.conv(images))
    assert list(features) == layers
    assert features["stage2.0.conv1"].shape == (2, 32, 16, 16)
    assert torch.equal(features["stage2.0.conv1"], expected_conv1)
    # The BN output is captured before the (non-inplace) ReLU, so it keeps its negative values.
    assert torch.equal(features["stem.bn"], expected_bn) and (features["stem.bn"] < 0).any()


def test_a_single_layer_name_is_accepted(resnet8: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad(), FeatureExtractor(resnet8, "stage2") as extractor:
        assert list(extractor(images)) == ["stage2"]


def test_gradients_flow_unless_detached(images: torch.Tensor) -> None:
    model = create_model("resnet8", 10)
    with FeatureExtractor(model, ["stage2"]) as extractor:
        features = extractor(images)
    features["stage2"].pow(2).mean().backward()
    assert model.stem.conv.weight.grad is not None and model.stem.conv.weight.grad.abs().sum() > 0
    assert model.stage3.get_submodule("0.conv1").weight.grad is None  # after stage2: no gradient
    with (
        FeatureExtractor(model, ["stage2"], detach=True) as extractor,
        pytest.warns(TrainingModeFeaturesWarning),
    ):
        logits, features = extractor.forward_with_features(
            images
        )  # read-only features of a training-mode model
    assert not features["stage2"].requires_grad
    assert logits.requires_grad  # detaching the features leaves the model's output alone


def test_hooks_do_not_leak(resnet8: nn.Module, images: torch.Tensor) -> None:
    before = hook_count(resnet8)
    extractor = FeatureExtractor(resnet8, ["stem", "stage1", "stage2.0.conv1"])
    assert hook_count(resnet8) == before + 3 and extractor.active
    extractor.remove()
    extractor.remove()  # idempotent
    assert hook_count(resnet8) == before and not extractor.active
    with pytest.raises(RuntimeError, match="removed"):
        extractor(images)
    with pytest.raises(KeyError), FeatureExtractor(resnet8, ["stem"]):
        raise KeyError("an error inside the with block still removes the hooks")
    assert hook_count(resnet8) == before
    # A bad layer among good ones: nothing is hooked at all.
    with pytest.raises(ValueError):
        FeatureExtractor(resnet8, ["stem", "no_such_layer"])
    assert hook_count(resnet8) == before


def test_plain_forward_passes_are_not_recorded(resnet8: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad(), FeatureExtractor(resnet8, ["stage1"]) as extractor:
        resnet8(images)
        resnet8(images)
        # Were the plain calls recorded, stage1 would have three outputs and this would raise.
        features = extractor(images[:1])
    assert features["stage1"].shape == (1, 16, 32, 32)


def test_unknown_layer_lists_the_valid_names(resnet8: nn.Module) -> None:
    with pytest.raises(ValueError) as error:
        FeatureExtractor(resnet8, ["stage4"])
    message = str(error.value)
    assert "'stage4'" in message
    assert "Feature points: stem, stage1, stage2, stage3." in message
    assert "stage2.0.conv1" in message and "classifier" in message
    assert message.index("Feature points") < message.index("stage2.0.conv1")
    # A deep model: a shorter list, with the modules inside the longest valid prefix of the bad path.
    resnet110 = create_model("resnet110", 10)
    with pytest.raises(ValueError) as error:
        FeatureExtractor(resnet110, ["stage2.4.conv3"])
    message = str(error.value)
    assert "Did you mean 'stage2.4.conv2'" in message
    assert "Modules inside 'stage2.4': stage2.4.conv1," in message
    assert "stage3.17.relu2" not in message and len(message) < 3000


def test_bad_layer_requests(resnet8: nn.Module) -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        FeatureExtractor(resnet8, [])
    with pytest.raises(ValueError, match="repeated: stem"):
        FeatureExtractor(resnet8, ["stem", "stage1", "stem"])
    with pytest.raises(TypeError, match="A layer must be a module path .*; got a Sequential"):
        FeatureExtractor(resnet8, [resnet8.stem])  # the module itself instead of its name
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got a str"):
        FeatureExtractor("resnet8", ["stem"])  # type: ignore[arg-type]


def test_bad_inputs_to_the_extractor(resnet8: nn.Module, images: torch.Tensor) -> None:
    with FeatureExtractor(resnet8, ["stem"]) as extractor:
        with pytest.raises(TypeError, match=r"must be a torch.Tensor batch.*; got a list.*torch.stack"):
            extractor(list(images))
        with pytest.raises(
            ValueError, match=r"input_shape must be \(C, H, W\) or \(N, C, H, W\).*got \(32, 32\)"
        ):
            extractor.feature_shapes((32, 32))
        with pytest.raises(TypeError, match=r"input_shape must be .*; got \(3, 32.5, 32\)"):
            extractor.feature_shapes((3, 32.5, 32))
        with pytest.raises(ValueError, match="The input of resnet8 must be a batch with 3 channels"):
            extractor.feature_shapes((1, 32, 32))  # the model's own check


def test_a_reused_or_skipped_module_has_no_single_output() -> None:
    shared_relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), shared_relu, nn.Linear(4, 4), shared_relu)
    with FeatureExtractor(model, ["1"]) as extractor, pytest.raises(RuntimeError, match="ran 2 times"):
        extractor(torch.randn(3, 4))

    class SkipsItsBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with (
        FeatureExtractor(SkipsItsBranch(), ["unused"]) as extractor,
        pytest.raises(
            RuntimeError,
            match="runs exactly once per forward pass; got a module that did not run.*forward path",
        ),
    ):
        extractor(torch.randn(3, 4))


def test_feature_shapes_restore_the_training_mode() -> None:
    model = create_model("vgg8", 10, in_channels=1).train()
    running_mean = model.get_submodule("block1.bn1").running_mean.clone()
    with FeatureExtractor(model, ["block2", "pool2"]) as extractor:
        assert extractor.feature_shapes((1, 32, 32)) == {"block2": (128, 16, 16), "pool2": (128, 8, 8)}
        assert extractor.feature_shapes((4, 1, 64, 64)) == {"block2": (128, 32, 32), "pool2": (128, 16, 16)}
    assert model.training
    assert torch.equal(model.get_submodule("block1.bn1").running_mean, running_mean)  # ran in eval mode


def test_layer_table() -> None:
    model = create_model("resnet8", 100).train()
    table = layer_table(model, (3, 32, 32))
    assert list(table.columns) == ["layer", "type", "output_shape", "params", "feature_point"]
    stages = [name for name, _ in model.named_children()]
    # The named stages and the leaf modules, nothing else (no block containers such as "stage2.0").
    assert [name for name in table["layer"] if "." not in name] == stages
    assert "stage2.0" not in set(table["layer"])
    assert "stage2.0.shortcut.conv" in set(table["layer"])
    rows = table.set_index("layer")
    assert rows.loc["stage2.0.shortcut.conv", "type"] == "Conv2d"
    assert rows.loc["stage2.0.shortcut.conv", "output_shape"] == (32, 16, 16)
    assert rows.loc["stage2.0.shortcut.conv", "params"] == 16 * 32
    assert rows.loc["pool", "output_shape"] == (64,)
    assert rows.loc["classifier", "output_shape"] == (100,)
    assert rows.loc["classifier", "params"] == 64 * 100 + 100
    assert table["params"].sum() == count_parameters(model) == 83_892
    assert list(table.loc[table["feature_point"], "layer"]) == list(model.feature_points)
    with FeatureExtractor(model, model.feature_points) as extractor:
        shapes = extractor.feature_shapes((3, 32, 32))
    assert {name: rows.loc[name, "output_shape"] for name in model.feature_points} == shapes
    assert model.training
    # A plain nn.Module works too: its children are its stages.
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    plain_table = layer_table(plain, (1, 1, 5, 5))
    assert list(plain_table["output_shape"]) == [(4, 3, 3), (36,)]
    assert not plain_table["feature_point"].any()


def test_reading_features_in_training_mode_warns_once_and_training_on_them_does_not() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", 10)  # a fresh or loaded model is in training mode
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), FeatureExtractor(model, ["stage2"]) as extractor:
        running_mean = model.stem.bn.running_mean.clone()
        with pytest.warns(TrainingModeFeaturesWarning, match=r"Call model\.eval\(\) first") as caught:
            in_training_mode = extractor(images)["stage2"]
        assert len(caught) == 1
        assert not torch.equal(model.stem.bn.running_mean, running_mean), "training mode changed the model"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per model
            extractor(images)
            with eval_mode(model):
                in_eval_mode = extractor(images)["stage2"]
    assert not torch.allclose(in_training_mode, in_eval_mode, atol=1e-3), (
        "the warning is about a real difference"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student = create_model("resnet8", 10).train()  # a method training on a student's features: no warning
        FeatureExtractor(student, ["stage2"])(images)["stage2"].mean().backward()
        with torch.no_grad():
            FeatureExtractor(student.eval(), ["stage2"])(images)  # eval mode: nothing to warn about
