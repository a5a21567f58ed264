"""Training data: readers for interleaved documents, image-text and video-text pairs, the paper's
processing, and batching."""
