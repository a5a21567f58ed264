"""The Flamingo model: configuration, vision encoders, the Perceiver Resampler, gated cross-attention, the
language-model adapter, weights and OpenFlamingo conversion."""
