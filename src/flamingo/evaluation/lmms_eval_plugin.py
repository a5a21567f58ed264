"""A model for lmms-eval (EvolvingLMMs-Lab/lmms-eval), registered through its plugin entry point
(group `lmms_eval.models`, see pyproject.toml), so that after `pip install 'flamingo[lmms-eval]'`

    python -m lmms_eval --model flamingo --model_args pretrained=DIR_OR_HUB_ID --tasks TASK

evaluates a Flamingo on lmms-eval's tasks without a fork. `model_args`: pretrained (a saved model
directory, a Hub id, or "embedded"; default embedded), revision, quantize (int8/int4),
trust_remote_code, device (cpu/cuda), batch_size (requests per forward pass).

Requests run through the inference API in batches: a batch's prompts are encoded in one pass
(each image once), generation decodes them together, and the candidate continuations of a
log-likelihood request share its encoded prompt (flamingo.inference.scoring). Images go where
the task's text has `<image>` placeholders (interleaved few-shot: a task whose doc_to_visual
returns the support images and the query image, in order), else all of them before the text,
Flamingo's own zero-shot layout.

`FlamingoLMMAdapter` holds the logic and imports nothing of lmms-eval, so this module imports
without it; `FlamingoLMM`, the `lmms` subclass lmms-eval loads, is made when first asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from flamingo.errors import UserError, import_extra
from flamingo.inference.generation import GenerationConfig, generate
from flamingo.inference.prompt import Prompt, text_prompt
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import encode_prompts
from flamingo.model.weights import load_model

MODEL_ID = "flamingo"
# lmms-eval's generation defaults when a task names none (as its own HF models use)
DEFAULT_MAX_NEW_TOKENS = 256


def manifest() -> Any:
    """The entry point's payload: lmms-eval's registration of the model id "flamingo"."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.FlamingoLMM")


def _flat_visuals(visuals: Any) -> list[Any]:
    """doc_to_visual's output as a flat list of images (None and nested lists allowed)."""
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flat_visuals(item)]
    return [visuals]


def generation_config(gen_kwargs: dict[str, Any]) -> GenerationConfig:
    """lmms-eval's gen_kwargs (until, max_new_tokens, temperature, top_p, num_beams, do_sample)
    as our GenerationConfig; other keys (model-specific options of other models) are ignored.
    Temperature 0, lmms-eval's usual value, means greedy decoding."""
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(u for u in until if u)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sample = bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
    top_p = gen_kwargs.get("top_p")
    return GenerationConfig(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                            num_beams=int(gen_kwargs.get("num_beams") or 1), do_sample=sample,
                            temperature=temperature if sample else 1.0,
                            top_p=float(top_p) if sample and top_p is not None else 1.0, stop_strings=until)


class FlamingoLMMAdapter:
    """lmms-eval's model interface (generate_until, loglikelihood) over a Flamingo; see the
    module docstring. Each request's `args` are lmms-eval's: (context, gen_kwargs or target,
    doc_to_visual, doc_id, task, split); the documents are in `self.task_dict`, which lmms-eval
    fills."""

    def __init__(self, pretrained: str = "embedded", revision: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, quantize: str | None = None,
                 trust_remote_code: bool = False, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"the flamingo model of lmms-eval takes model_args pretrained, revision, quantize, "
                            f"trust_remote_code, device, batch_size; got also {sorted(unknown)}")
        if str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 8
        self.batch_size_per_pass = int(batch_size)
        if self.batch_size_per_pass < 1:
            raise UserError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(str(pretrained), revision=str(revision) if revision is not None else None,
                           trust_remote_code=bool(trust_remote_code))
        model.to(self.device).eval()
        if quantize:  # on the evaluation device: quantized weights are packed for their backend
            from flamingo.model.quantize import quantize_model

            quantize_model(model, str(quantize))
        self.model = model
        if not hasattr(self, "task_dict"):  # set by lmms' __init__; the adapter alone (tests) keeps its own
            self.task_dict: dict[str, Any] = {}

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_pass

    # ------------------------------------------------------------------ prompts
    def _prompt(self, context: str, doc_to_visual: Callable[[Any], Any] | None, doc_id: Any, task: str,
                split: str) -> Prompt:
        """The request's prompt: its images at the text's placeholders, or before the text."""
        images = []
        if doc_to_visual is not None:
            images = _flat_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
        for image in images:
            if not isinstance(image, Image.Image):
                raise UserError(f"task {task!r}, document {doc_id}: the flamingo model takes PIL images, got "
                                f"{type(image).__name__} (videos and audio are not supported)")
        if not context and not images:  # an unconditional score (acc_mutual_info): from the start token
            tokenizer = self.model.tokenizer
            context = tokenizer.bos_token or tokenizer.eos_token or ""
        token = self.model.config.media_token
        placeholders = context.count(token)
        if placeholders == 0:
            context = token * len(images) + context
        elif placeholders != len(images):
            raise UserError(f"task {task!r}, document {doc_id}: the text has {placeholders} {token} placeholder(s) "
                            f"but the task gives {len(images)} image(s)")
        return text_prompt(context, [image.convert("RGB") for image in images], token)

    # ------------------------------------------------------------------ requests
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Continue each request's prompt until one of its `until` strings (cut off, as lmms-eval
        expects), the end of the chunk or max_new_tokens; requests with the same options are
        decoded together, `batch_size` at a time."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            config = generation_config(dict(requests[indices[0]].args[1]))
            for start in range(0, len(indices), self.batch_size):
                part = indices[start:start + self.batch_size]
                prompts = [self._prompt(c, v, d, t, s)
                           for c, _, v, d, t, s in (requests[i].args[:6] for i in part)]
                state = encode_prompts(self.model, prompts, max_new_tokens=config.max_new_tokens)
                for i, generation in zip(part, generate(self.model, state, config)):
                    results[i] = generation.text
        return [text or "" for text in results]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(loss, whether greedy decoding gives the continuation) per request, the loss being the
        mean negative log-probability of the continuation's tokens given the context: what
        lmms-eval's own models return (their HF `outputs.loss`) and what its multiple_choice
        scoring expects (it picks the option of least value), although its interface names the
        value a log-probability. Requests with the same context and document (a multiple-choice
        question's options) share one encoded prompt; `batch_size` prompts are encoded per pass."""
        prompts: dict[tuple, list[int]] = {}
        continuations = []
        for i, request in enumerate(requests):
            # acc_mutual_info's unconditional requests carry only (context, continuation)
            context, target, doc_to_visual, doc_id, task, split = (tuple(request.args) + (None,) * 6)[:6]
            doc = self.task_dict[task][split][doc_id] if task in self.task_dict else None
            continuations.append(target if isinstance(target, str) else target(doc))
            prompts.setdefault((context, doc_to_visual, doc_id, task, split), []).append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        keys = list(prompts)
        for start in range(0, len(keys), self.batch_size):
            part = keys[start:start + self.batch_size]
            state = encode_prompts(self.model, [self._prompt(*key) for key in part])
            candidates = [[continuations[i] for i in prompts[key]] for key in part]
            scores = score_candidates(self.model, state, candidates)
            for row, key in enumerate(part):
                for slot, i in enumerate(prompts[key]):
                    results[i] = (-float(scores.mean_logprob[row, slot]), bool(scores.greedy[row, slot]))
        return results

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("the flamingo model of lmms-eval does not run multi-round tasks yet")


_CLASS: type | None = None


def lmms_class() -> type:
    """`FlamingoLMM`: the adapter as a subclass of lmms-eval's `lmms` (needs the lmms-eval extra)."""
    global _CLASS
    if _CLASS is None:
        lmms = import_extra("lmms_eval.api.model", "lmms-eval", "the lmms-eval plugin").lmms
        from lmms_eval.api import instance

        members: dict[str, Any] = {"__module__": __name__, "__doc__": FlamingoLMMAdapter.__doc__, "is_simple": True}
        # lmms-eval 0.7's evaluator passes every response through unwrap_generation_output, which
        # turns a (loglikelihood, is_greedy) pair into its str() and so breaks multiple_choice tasks
        # for every model; a GenerationResult's text it passes through as it is.
        if not isinstance(instance.unwrap_generation_output((0.0, False))[0], tuple):
            def loglikelihood(self: Any, requests: Sequence[Any]) -> list[Any]:
                return [instance.GenerationResult(text=pair)
                        for pair in FlamingoLMMAdapter.loglikelihood(self, requests)]

            members["loglikelihood"] = loglikelihood
        _CLASS = type("FlamingoLMM", (FlamingoLMMAdapter, lmms), members)
    return _CLASS


def __getattr__(name: str) -> Any:
    if name == "FlamingoLMM":
        return lmms_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
