"""The CIFAR ResNet and VGG zoo: layouts, parameter counts, feature points and the ZooModel contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdbook_utils.features import FeatureExtractor
from kdbook_utils.metrics import count_parameters
from kdbook_utils.models import ZooModel, create_model, list_models, model_options
from kdbook_utils.models.resnet import RESNET_CONFIGS, BasicBlock
from kdbook_utils.models.resnet import describe as describe_resnets
from kdbook_utils.models.vgg import VGG_CONFIGS
from kdbook_utils.models.vgg import describe as describe_vggs

OUR_MODELS = [*RESNET_CONFIGS, *VGG_CONFIGS]


def test_every_resnet_and_vgg_is_registered() -> None:
    assert set(OUR_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", OUR_MODELS)
def test_model_is_a_zoo_model_with_its_feature_points(name: str) -> None:
    model = create_model(name, 10)
    assert isinstance(model, ZooModel)
    assert model.arch == name and model.num_classes == 10
    stages = [stage for stage, _ in model.named_children()]
    assert stages[-2:] == ["pool", "classifier"]
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 10
    # Feature points are stages, in forward order.
    positions = [stages.index(point) for point in model.feature_points]
    assert positions == sorted(positions)
    expected = ("stem", "stage1", "stage2", "stage3") if name.startswith("resnet") else None
    if expected:
        assert model.feature_points == expected
    else:
        assert model.feature_points == tuple(f"block{i}" for i in range(1, len(VGG_CONFIGS[name]) + 1))


@pytest.mark.parametrize("name", OUR_MODELS)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_forward_shape(name: str, in_channels: int, size: int) -> None:
    model = create_model(name, 7, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, in_channels, size, size))
    assert logits.shape == (1, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", OUR_MODELS)
def test_forward_equals_running_the_stages_in_order(name: str) -> None:
    model = create_model(name, 5).eval()
    images = torch.randn(2, 3, 16, 16)  # small: the stage order does not depend on the size
    with torch.no_grad():
        expected = images
        for stage in model.children():
            expected = stage(expected)
        assert torch.equal(model(images), expected)


def test_resnet8_parameter_count_for_100_classes() -> None:
    # stem conv 3*16*9 = 432; stage1 block 2 * 16*16*9 = 4,608;
    # stage2 block 16*32*9 + 32*32*9 + 1x1 projection 16*32 = 4,608 + 9,216 + 512 = 14,336;
    # stage3 block 32*64*9 + 64*64*9 + 32*64 = 18,432 + 36,864 + 2,048 = 57,344;
    # classifier 64*100 + 100 = 6,500. Without BatchNorm: 432 + 4,608 + 14,336 + 57,344 + 6,500 = 83,220
    # (the spec's §1.4 figure). BatchNorm adds 2 per channel: 2 * (16 + 2*16 + 3*32 + 3*64) = 672.
    model = create_model("resnet8", 100)
    assert count_parameters(model) == 83_892
    assert count_parameters(model, include_batchnorm=False) == 83_220


def test_resnet32_parameter_count_matches_the_spec() -> None:
    # n = 5 blocks per stage. stage1: 10 convs of 16*16*9 = 23,040;
    # stage2: 14,336 (first block, as in resnet8) + 4 blocks * 2 * 32*32*9 = 14,336 + 73,728 = 88,064;
    # stage3: 57,344 + 4 * 2 * 64*64*9 = 57,344 + 294,912 = 352,256;
    # plus stem 432 and classifier 6,500: 470,292 without BatchNorm (spec §1.4: 470,292 vs 83,220).
    model = create_model("resnet32", 100)
    assert count_parameters(model, include_batchnorm=False) == 470_292


def test_wide_resnets_match_the_spec_tf_base_counts() -> None:
    # resnet8x4: stem 3*32*9 = 864; stage1 32*64*9 + 64*64*9 + 32*64 = 18,432 + 36,864 + 2,048 = 57,344;
    # stage2 64*128*9 + 128*128*9 + 64*128 = 73,728 + 147,456 + 8,192 = 229,376;
    # stage3 128*256*9 + 256*256*9 + 128*256 = 294,912 + 589,824 + 32,768 = 917,504;
    # classifier 256*100 + 100 = 25,700. Sum 1,230,788: the spec's REC ResNet-8 of §1.4 (32-channel
    # stem, 64/128/256 stages), whose ResNet-32 (7,423,940) is our resnet32x4.
    assert count_parameters(create_model("resnet8x4", 100), include_batchnorm=False) == 1_230_788
    assert count_parameters(create_model("resnet32x4", 100), include_batchnorm=False) == 7_423_940


def test_vgg_parameter_counts_match_the_spec_without_batchnorm() -> None:
    # Convs keep their bias (RepDistiller). vgg8 (cfg S, the spec's VGG-6):
    # 3*64*9+64 = 1,792; 64*128*9+128 = 73,856; 128*256*9+256 = 295,168; 256*512*9+512 = 1,180,160;
    # 512*512*9+512 = 2,359,808; FC 512*100+100 = 51,300 -> 3,962,084 ("3.96 M").
    # vgg11 (cfg A): 1,792 + 73,856 + (295,168 + 256*256*9+256 = 590,080) + (1,180,160 + 2,359,808)
    # + 2 * 2,359,808 + 51,300 = 9,271,780 ("9.27 M").
    # With BatchNorm's 2 per channel they would be 3,965,028 and 9,277,284, i.e. 3.97 M and 9.28 M, so
    # the spec counted without BatchNorm.
    vgg8, vgg11 = create_model("vgg8", 100), create_model("vgg11", 100)
    assert count_parameters(vgg8, include_batchnorm=False) == 3_962_084
    assert count_parameters(vgg11, include_batchnorm=False) == 9_271_780
    assert count_parameters(vgg8) == 3_962_084 + 2 * (64 + 128 + 256 + 512 + 512)
    assert count_parameters(vgg11) == 9_271_780 + 2 * (64 + 128 + 2 * 256 + 4 * 512)


def test_resnet_feature_shapes() -> None:
    resnet8 = create_model("resnet8", 10)
    shapes = FeatureExtractor(resnet8, resnet8.feature_points).feature_shapes((3, 32, 32))
    assert shapes == {
        "stem": (16, 32, 32),
        "stage1": (16, 32, 32),
        "stage2": (32, 16, 16),
        "stage3": (64, 8, 8),
    }
    wide = create_model("resnet8x4", 10, in_channels=1)
    shapes = FeatureExtractor(wide, wide.feature_points).feature_shapes((1, 64, 64))
    assert shapes == {
        "stem": (32, 64, 64),
        "stage1": (64, 64, 64),
        "stage2": (128, 32, 32),
        "stage3": (256, 16, 16),
    }


def test_vgg_feature_shapes_and_the_last_pool_rule() -> None:
    vgg11 = create_model("vgg11", 10)
    stages = [name for name, _ in vgg11.named_children()]
    assert stages == [
        "block1", "pool1", "block2", "pool2", "block3", "pool3", "block4", "block5", "pool", "classifier",
    ]  # fmt: skip
    shapes = FeatureExtractor(vgg11, vgg11.feature_points).feature_shapes((3, 32, 32))
    assert shapes == {
        "block1": (64, 32, 32),
        "block2": (128, 16, 16),
        "block3": (256, 8, 8),
        "block4": (512, 4, 4),
        "block5": (512, 4, 4),
    }
    # For 64 px inputs RepDistiller keeps the 4th max-pool, so block5 still sees 4x4 maps.
    vgg64 = create_model("vgg11", 10, image_size=64)
    assert "pool4" in dict(vgg64.named_children())
    shapes = FeatureExtractor(vgg64, vgg64.feature_points).feature_shapes((3, 64, 64))
    assert shapes["block4"] == (512, 8, 8) and shapes["block5"] == (512, 4, 4)
    # The 32-px layout still runs at 64 px (global pooling), with larger last maps.
    assert FeatureExtractor(vgg11, ["block5"]).feature_shapes((3, 64, 64)) == {"block5": (512, 8, 8)}


def test_vgg_blocks_follow_the_repdistiller_configs() -> None:
    for name, blocks in VGG_CONFIGS.items():
        model = create_model(name, 10)
        for index, widths in enumerate(blocks, start=1):
            convs = [m for m in model.get_submodule(f"block{index}").modules() if isinstance(m, nn.Conv2d)]
            assert [conv.out_channels for conv in convs] == list(widths)
            assert all(conv.kernel_size == (3, 3) and conv.padding == (1, 1) for conv in convs)
    assert [len(b) for b in VGG_CONFIGS["vgg13"]] == [2, 2, 2, 2, 2]


@pytest.mark.parametrize("name", list(RESNET_CONFIGS))
def test_resnet_depth_and_projection_shortcuts(name: str) -> None:
    config = RESNET_CONFIGS[name]
    model = create_model(name, 10)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3 * config.blocks_per_stage
    convs_on_main_path = 1 + 2 * len(blocks)  # stem + two per block; the classifier makes depth 6n + 2
    assert convs_on_main_path + 1 == config.depth
    for stage_index, stage in enumerate([model.stage1, model.stage2, model.stage3]):
        for block_index, block in enumerate(stage):
            changes_shape = (
                block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv1.out_channels
            )
            assert changes_shape == (
                block_index == 0 and (stage_index > 0 or config.stem_width != config.stage_widths[0])
            )
            if changes_shape:
                assert isinstance(block.shortcut[0], nn.Conv2d) and block.shortcut[0].kernel_size == (1, 1)
                assert isinstance(block.shortcut[1], nn.BatchNorm2d)
            else:
                assert isinstance(block.shortcut, nn.Identity)


def test_basic_block_adds_its_shortcut() -> None:
    # With the last BatchNorm's scale and shift at zero the residual branch vanishes:
    # an identity block returns relu(x), a projection block relu(bn(conv1x1(x))).
    torch.manual_seed(0)
    identity_block = BasicBlock(8, 8).eval()
    projection_block = BasicBlock(8, 16, stride=2).eval()
    x = torch.randn(2, 8, 6, 6)
    for block in (identity_block, projection_block):
        nn.init.zeros_(block.bn2.weight)
        nn.init.zeros_(block.bn2.bias)
    with torch.no_grad():
        assert torch.allclose(identity_block(x), torch.relu(x))
        assert torch.allclose(projection_block(x), torch.relu(projection_block.shortcut(x)))
        assert projection_block(x).shape == (2, 16, 3, 3)


def test_initialisation() -> None:
    torch.manual_seed(0)
    resnet = create_model("resnet32x4", 10)
    conv = resnet.get_submodule("stage3.1.conv1")  # 256 -> 256, 3x3: 589,824 weights
    expected_std = math.sqrt(2.0 / (3 * 3 * conv.out_channels))  # Kaiming normal, fan-out, ReLU gain
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    vgg = create_model("vgg13", 10)
    conv = vgg.get_submodule("block5.conv2")
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (9 * 512)), rel=0.02)
    assert torch.count_nonzero(conv.bias) == 0
    assert vgg.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    for model in (resnet, vgg):
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_one_channel_input_and_every_parameter_gets_a_gradient() -> None:
    for name in ("resnet8", "vgg8"):
        model = create_model(name, 4, in_channels=1)
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first_conv.in_channels == 1
        loss = nn.functional.cross_entropy(model(torch.randn(3, 1, 32, 32)), torch.tensor([0, 1, 3]))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="in_channels must be a positive integer; got 0"):
        create_model("resnet8", 10, in_channels=0)
    with pytest.raises(ValueError, match="in_channels"):
        create_model("vgg8", 10, in_channels=0)
    # Only VGG's layout depends on the image size: the error lists what resnet8 does take.
    with pytest.raises(TypeError, match=r"unknown keyword 'image_size'\. Valid keywords: in_channels=3\."):
        create_model("resnet8", 10, image_size=64)


IMAGE_MODELS = [name for name in list_models() if name != "tiny_gpt"]
"""Every model but lesson 5's language model reads images (tested in tests/test_lm.py)."""


def test_every_builder_declares_its_options() -> None:
    # create_model can only list the valid options of builders that name them (no **options).
    for name in IMAGE_MODELS:
        assert "in_channels" in model_options(name), name
    assert model_options("tiny_gpt") == {"context": 32, "width": 64, "layers": 2, "heads": 4, "dropout": 0.0}
    assert model_options("vgg8") == {"in_channels": 3, "image_size": 32}
    assert model_options("alexnet_lsl_student_eighth") == {
        "in_channels": 3,
        "batch_norm": True,
        "dropout": 0.0,
    }
    plain = create_model("alexnet_lsl_student_eighth", 10, dropout=0.5)
    assert plain.fc1[0].p == 0.5


# ------------------------------------------------------------------------------------------ input checks


EXPECTED_MIN_SIZE = {"resnet8": 1, "vgg8": 8, "small_cnn": 4, "wrn16_2": 1, "torchvision_inception_v3": 1}


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, {}) for name in IMAGE_MODELS]
    + [("small_cnn", {"blocks": blocks}) for blocks in (1, 3, 5)]
    + [("vgg11", {"image_size": 64}), ("mobilenet9", {"stem_stride": 2})],
)
def test_min_input_size_is_the_smallest_size_that_runs(name: str, options: dict) -> None:
    with torch.device("meta"):  # shapes only: nothing is allocated or computed
        model = create_model(name, 10, **options).eval()
    size, channels = model.min_input_size, model.in_channels
    if not options and name in EXPECTED_MIN_SIZE:
        assert size == EXPECTED_MIN_SIZE[name]
    assert model(torch.empty(2, channels, size, size, device="meta")).shape == (2, 10)
    assert model(torch.empty(2, channels, size, 3 * size + 1, device="meta")).shape == (2, 10)
    if size > 1:
        smaller = torch.empty(2, channels, size - 1, size - 1, device="meta")
        with pytest.raises(RuntimeError):  # the stages themselves fail one pixel below
            nn.Sequential.forward(model, smaller)
        with pytest.raises(
            ValueError, match=f"at least {size}x{size} pixels.*; got {size - 1}x{size - 1} images"
        ):
            model(smaller)


def test_downsampling_sets_the_minimum() -> None:
    assert [create_model("small_cnn", 2, blocks=b).min_input_size for b in (1, 3, 5)] == [2, 8, 32]
    assert create_model("vgg11", 2, image_size=64).min_input_size == 16  # RepDistiller keeps a 4th pool


def test_the_input_check_reads_only_shape_and_dtype() -> None:
    model = create_model("resnet8", 10, in_channels=1).eval()
    assert model.in_channels == 1
    with torch.no_grad():
        nan_images = torch.full((2, 1, 8, 8), float("nan"))
        assert torch.isnan(model(nan_images)).all()  # values are not the model's business: fit checks them
        half = model.to(torch.bfloat16)(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16


def test_channels_last_hooks_and_stage_by_stage_runs_still_work() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", 10).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        assert torch.allclose(model(images.to(memory_format=torch.channels_last)), expected, atol=1e-5)
        with FeatureExtractor(model, model.feature_points) as extractor:
            logits, features = extractor.forward_with_features(images)
        assert torch.equal(logits, expected) and features["stage3"].shape == (4, 64, 8, 8)
        # Code that runs the stages itself (multi-exit heads) skips the check, or calls it first.
        model.check_input(images)
        staged = images
        for stage in model:
            staged = stage(staged)
    assert torch.equal(staged, expected)


def test_the_input_check_compiles_without_a_graph_break() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", 10).eval()
    images = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a break would raise
        assert torch.allclose(compiled(images), model(images), atol=1e-6)
        with pytest.raises(ValueError, match="3 channels.*got 1 channel"):
            torch.compile(model, backend="eager")(torch.randn(2, 1, 16, 16))
    torch._dynamo.reset()


def test_describe_tables() -> None:
    resnets = describe_resnets()
    assert list(resnets.index) == list(RESNET_CONFIGS)
    assert resnets.loc["resnet8", "params"] == 83_892
    assert resnets.loc["resnet32", "params_without_bn"] == 470_292
    assert resnets.loc["resnet110", "blocks_per_stage"] == 18
    assert (resnets["macs"] > 0).all()
    vggs = describe_vggs()
    assert vggs.loc["vgg11", "params_without_bn"] == 9_271_780
    assert vggs.loc["vgg8", "weight_layers"] == 6 and vggs.loc["vgg13", "weight_layers"] == 11
