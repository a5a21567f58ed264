"""Inference: interleaved prompts, cached generation, few-shot context reuse, scoring."""

from flamingo.inference.api import FewShotContext, generate_text
from flamingo.inference.generation import Generation, GenerationConfig, GenerationConfigError, generate
from flamingo.inference.prompt import Prompt, PromptError, interleaved_prompt, text_prompt
from flamingo.inference.scoring import CandidateScores, rank_classes, score_candidates
from flamingo.inference.state import FlamingoState, encode_prompts, extend

__all__ = [
    "CandidateScores", "FewShotContext", "FlamingoState", "Generation", "GenerationConfig",
    "GenerationConfigError", "Prompt", "PromptError", "encode_prompts", "extend", "generate",
    "generate_text", "interleaved_prompt", "rank_classes", "score_candidates", "text_prompt",
]
