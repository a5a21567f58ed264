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

# `from flamingo import load_model` without importing torch and transformers at `import flamingo`
# (the command line imports this package first, for every subcommand).
_WEIGHTS = ("build_flamingo", "load_model", "load_pretrained", "save_pretrained")


def __getattr__(name: str):
    if name in _WEIGHTS:
        from flamingo.model import weights

        return getattr(weights, name)
    if name == "push_to_hub":
        from flamingo.model.hub import push_to_hub

        return push_to_hub
    raise AttributeError(f"module 'flamingo' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "CrossAttentionConfig",
    "FlamingoConfig",
    "LanguageModelConfig",
    "PerceiverConfig",
    "VisionConfig",
    "__version__",
    "build_flamingo",
    "load_model",
    "load_pretrained",
    "push_to_hub",
    "save_pretrained",
]
