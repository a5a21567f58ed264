"""flamingo: the Flamingo visual language model over any Hugging Face causal LM and vision encoder."""

from flamingo.model.config import (
    ConfigError,
    CrossAttentionConfig,
    FlamingoConfig,
    LanguageModelConfig,
    PerceiverConfig,
    VisionConfig,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CrossAttentionConfig",
    "FlamingoConfig",
    "LanguageModelConfig",
    "PerceiverConfig",
    "VisionConfig",
    "__version__",
]
