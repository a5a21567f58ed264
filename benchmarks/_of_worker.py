"""The OpenFlamingo side of the inference benchmarks; runs in OpenFlamingo's own venv
(transformers 4.46.3, open-flamingo 2.0.1), started and driven by `_inference_common.OFWorker`
with one JSON command per line on stdin and one JSON reply per line on stdout.

OpenFlamingo is run the way its evaluation code runs it. The open-flamingo 2.0.1 wheel ships
`open_flamingo/eval/evaluate.py` but not the `EvalModel` it imports (`open_flamingo.eval.models.
open_flamingo`), so `OFEvalModel` below reproduces that class from the OpenFlamingo repository
(the version matching 2.0.1's evaluate.py: `get_outputs`, `get_rank_classifications`,
`__call__`, `cache_media`, `_prepare_images`, `_prepare_text`), with these changes only:
  - no autocast / dtype cast (fp32 on CPU; its `get_autocast("fp32")` is a no-op anyway);
  - `image_processor(image)` returns the pixel tensor our image processor made of that image
    (the PIL -> tensor step is therefore not in OpenFlamingo's timing; ours pays it);
  - `get_outputs` also keeps the generated ids, for the equivalence check.
The loops over the queries are evaluate.py's: batches of `--batch_size` (8) queries, each with
the full few-shot prompt (`evaluate_vqa` / `evaluate_captioning` -> `get_outputs`;
`evaluate_classification` -> `get_rank_classifications(use_cache=True, normalize_length=True)`
-> `utils.get_predicted_classnames`).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import suppress
from pathlib import Path
from typing import Any

# Protocol on a private copy of stdout; anything the libraries print goes to stderr (the log).
_PROTOCOL = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402,N812 - import_openflamingo / build_openflamingo / open_gates
import _inference_common as IC  # noqa: E402,N812
import torch  # noqa: E402
import transformers  # noqa: E402
from einops import repeat  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402


# ------------------------------------------------------------------------- vision stub
class CLIPVisualStub(nn.Module):
    """open_clip's `model.visual` with output_tokens=True: x -> (pooled, patch tokens). The
    tokens are the CLIP tower's post-layernormed last hidden state without the CLS token (what
    our HFVisionEncoder returns); only the tokens are used by OpenFlamingo."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor):
        hidden = self.clip(pixel_values=x).last_hidden_state
        tokens = self.clip.vision_model.post_layernorm(hidden[:, 1:])
        return tokens.mean(1), tokens


class VisionEncoderStub(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = CLIPVisualStub(clip)


# ---------------------------------------------------------- OpenFlamingo's eval model
def unwrap_model(model):
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


class OFEvalModel:
    """open_flamingo/eval/models/open_flamingo.py `EvalModel` (see the module docstring)."""

    def __init__(self, model, tokenizer, image_processor) -> None:
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.device = "cpu"
        self.model.eval()
        self.tokenizer.padding_side = "left"
        self.autocast = suppress
        self.cast_dtype = None
        self.last_output_ids = None

    def _prepare_images(self, batch):
        images_per_example = max(len(x) for x in batch)
        batch_images = None
        for iexample, example in enumerate(batch):
            for iimage, image in enumerate(example):
                preprocessed = self.image_processor(image)
                if batch_images is None:
                    batch_images = torch.zeros((len(batch), images_per_example, 1) + preprocessed.shape,
                                               dtype=preprocessed.dtype)
                batch_images[iexample, iimage, 0] = preprocessed
        if batch_images is not None:
            batch_images = batch_images.to(self.device, dtype=self.cast_dtype, non_blocking=True)
        return batch_images

    def _prepare_text(self, batch, padding="longest", truncation=True, max_length=2000):
        encodings = self.tokenizer(batch, padding=padding, truncation=truncation, return_tensors="pt",
                                   max_length=max_length)
        input_ids, attention_mask = encodings["input_ids"], encodings["attention_mask"]
        input_ids = input_ids.to(self.device, dtype=self.cast_dtype, non_blocking=True)
        attention_mask = attention_mask.to(self.device, dtype=self.cast_dtype, non_blocking=True)
        return input_ids, attention_mask.bool()

    def get_outputs(self, batch_text, batch_images, min_generation_length, max_generation_length, num_beams,
                    length_penalty):
        batch_images = self._prepare_images(batch_images)
        input_ids, attention_mask = self._prepare_text(batch_text)
        with torch.inference_mode():
            with self.autocast():
                outputs = unwrap_model(self.model).generate(
                    batch_images, input_ids, attention_mask, min_new_tokens=min_generation_length,
                    max_new_tokens=max_generation_length, num_beams=num_beams, length_penalty=length_penalty)
        outputs = outputs[:, len(input_ids[0]):]
        self.last_output_ids = outputs
        return self.tokenizer.batch_decode(outputs, skip_special_tokens=True)

    def get_rank_classifications(self, batch_text, batch_images, all_class_names, use_cache, normalize_length):
        batch_images = self._prepare_images(batch_images)
        ctx_input_ids, ctx_attention_mask = self._prepare_text(batch_text)
        if use_cache:
            self.cache_media(input_ids=ctx_input_ids, vision_x=batch_images)
            precomputed = self.__call__(vision_x=None, lang_x=ctx_input_ids, attention_mask=ctx_attention_mask,
                                        clear_conditioned_layers=False, use_cache=True)
            precomputed_logits = precomputed.logits
            precomputed_pkvs = precomputed.past_key_values
        else:
            precomputed_pkvs = None
        overall_probs = []
        for class_name in all_class_names:
            classname_tokens = self.tokenizer(class_name, add_special_tokens=False,
                                              return_tensors="pt")["input_ids"].to(self.device)
            assert classname_tokens.ndim == 2
            classname_tokens = repeat(classname_tokens, "b s -> (repeat b) s", repeat=len(batch_text))
            num_tokens_in_classname = classname_tokens.shape[1]
            if not use_cache:
                _lang_x = torch.cat([ctx_input_ids, classname_tokens], dim=1)
                _attention_mask = torch.cat([ctx_attention_mask, torch.ones_like(classname_tokens).bool()], dim=1)
                _vision_x = batch_images
            else:
                _lang_x, _attention_mask, _vision_x = classname_tokens, None, None
            outputs = self.__call__(vision_x=_vision_x, lang_x=_lang_x, attention_mask=_attention_mask,
                                    clear_conditioned_layers=(not use_cache), past_key_values=precomputed_pkvs)
            logits = outputs.logits
            if use_cache:
                logits = torch.cat([precomputed_logits, logits], dim=1)
            logprobs = torch.log_softmax(logits, dim=-1)
            gen_probs = logprobs[:, -num_tokens_in_classname - 1:-1, :]
            gen_probs = torch.gather(gen_probs, 2, classname_tokens[:, :, None]).squeeze(-1)
            class_prob = torch.mean(gen_probs, dim=1) if normalize_length else torch.sum(gen_probs, dim=1)
            overall_probs.append(class_prob)
        self.uncache_media()
        return torch.vstack(overall_probs).T.cpu()

    def __call__(self, lang_x, vision_x, attention_mask, past_key_values=None, clear_conditioned_layers=False,
                 use_cache=False):
        if past_key_values is None:
            with torch.inference_mode():
                with self.autocast():
                    return self.model(vision_x=vision_x, lang_x=lang_x, attention_mask=attention_mask,
                                      clear_conditioned_layers=clear_conditioned_layers,
                                      past_key_values=past_key_values, use_cache=use_cache)
        logits = []
        for token_idx in range(lang_x.shape[1]):
            _lang_x = lang_x[:, token_idx].reshape((-1, 1))
            _attention_mask = attention_mask[:, token_idx].reshape((-1, 1)) if attention_mask is not None else None
            with torch.inference_mode():
                with self.autocast():
                    outputs = self.model(vision_x=vision_x, lang_x=_lang_x, attention_mask=_attention_mask,
                                         clear_conditioned_layers=False, past_key_values=past_key_values,
                                         use_cache=True)
            past_key_values = outputs.past_key_values
            logits.append(outputs.logits)
        return CausalLMOutputWithPast(logits=torch.cat(logits, dim=1), past_key_values=past_key_values)

    def uncache_media(self):
        unwrap_model(self.model).uncache_media()

    def cache_media(self, input_ids, vision_x):
        unwrap_model(self.model).cache_media(input_ids=input_ids, vision_x=vision_x)


def get_predicted_classnames(logprobs, k, class_id_to_name):
    """open_flamingo/eval/utils.py"""
    _, predictions = torch.topk(logprobs, k=k, dim=1)
    predicted_classnames = [[class_id_to_name[ix] for ix in item] for item in predictions.tolist()]
    predicted_logprobs = torch.gather(logprobs, 1, predictions)
    return predicted_classnames, predicted_logprobs


# --------------------------------------------------------------------------------- worker
class Worker:
    def __init__(self) -> None:
        self.eval_model: OFEvalModel | None = None
        self.task: IC.Task | None = None

    def setup(self, workdir: str, threads: int, every: int, vis_dim: int) -> dict:
        """Load the backbones written by the benchmark, build OpenFlamingo as its factory does,
        randomise its trainable weights and save them for ours."""
        from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

        torch.set_num_threads(threads)
        self.dir = Path(workdir)
        specials = json.loads((self.dir / "tokenizer" / "special_tokens.json").read_text())
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(self.dir / "tokenizer" / "tokenizer.json"), **specials)
        lm = AutoModelForCausalLM.from_pretrained(self.dir / "lm", attn_implementation="sdpa", torch_dtype=torch.float32)
        clip = CLIPVisionModel(CLIPVisionConfig(**json.loads((self.dir / "clip" / "config.json").read_text())))
        clip.vision_model.load_state_dict(load_file(str(self.dir / "clip" / "tower.safetensors")), strict=True)
        clip.eval().requires_grad_(False)

        torch.manual_seed(1234)  # the resized embedding rows and OpenFlamingo's own initialisation
        model = C.build_openflamingo(lm, tokenizer, VisionEncoderStub(clip), vis_dim, every)
        model.eval()
        with torch.no_grad():  # LayerNorms away from (1, 0) too, so every weight is exercised
            for name, p in model.named_parameters():
                if p.requires_grad and ("norm" in name or name.endswith((".0.weight", ".0.bias"))) and p.ndim == 1:
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
        C.open_gates(model)
        trainable = {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}
        save_file(trainable, str(self.dir / "of_trainable.safetensors"))
        self.model, self.tokenizer = model, tokenizer
        import open_flamingo

        return {"versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                             "open_flamingo": getattr(open_flamingo, "__version__", IC.OF_VERSION)},
                "trainable": sum(v.numel() for v in trainable.values())}

    def load_task(self) -> dict:
        self.task = IC.Task(**json.loads((self.dir / "task.json").read_text()))
        pixels = load_file(str(self.dir / "pixels.safetensors"))["pixels"]
        self.eval_model = OFEvalModel(self.model, self.tokenizer, image_processor=lambda index: pixels[index])
        return {}

    # ------------------------------------------------------------------------------ tasks
    def _batches(self):
        t = self.task
        for start in range(0, len(t.query_texts), t.of_batch_size):
            stop = start + t.of_batch_size
            yield ([t.support_images + [img] for img in t.query_images[start:stop]],
                   [t.support_text + text for text in t.query_texts[start:stop]])

    def run_task(self) -> Any:
        """One pass over all queries, as evaluate.py's loop does."""
        t, em = self.task, self.eval_model
        if t.kind == "generate":
            ids, texts = [], []
            for batch_images, batch_text in self._batches():
                texts += em.get_outputs(batch_text=batch_text, batch_images=batch_images, min_generation_length=0,
                                        max_generation_length=t.max_new_tokens, num_beams=t.num_beams,
                                        length_penalty=t.length_penalty)
                ids += em.last_output_ids.tolist()
            return {"ids": ids, "texts": texts}
        if t.kind == "rank":
            class_id_to_name = dict(enumerate(t.class_names))
            scores = []
            for batch_images, batch_text in self._batches():
                logprobs = em.get_rank_classifications(batch_text, batch_images, t.class_names, use_cache=True,
                                                       normalize_length=t.normalize_length)
                get_predicted_classnames(logprobs, min(5, len(t.class_names)), class_id_to_name)
                scores += logprobs.tolist()
            return {"scores": scores}
        raise ValueError(f"unknown task kind {t.kind!r}")

    def run(self, want_outputs: bool = False) -> dict:
        outputs, seconds, others = IC.timed(self.run_task)
        reply = {"seconds": seconds, "others": others}
        if want_outputs:
            reply["outputs"] = outputs
        return reply

    def memory(self) -> dict:
        return IC.measure_peak(self.run_task)

    def check(self, query: int, greedy_tokens: int) -> dict:
        """Support + query `query` alone: prompt ids, the next-token logits of a plain forward
        (saved to of_check.safetensors) and greedy generation."""
        t, em = self.task, self.eval_model
        images = em._prepare_images([t.support_images + [t.query_images[query]]])
        ids, mask = em._prepare_text([t.support_text + t.query_texts[query]])
        with torch.inference_mode():
            logits = self.model(vision_x=images, lang_x=ids, attention_mask=mask).logits[0, -1]
            greedy = self.model.generate(images, ids, mask, max_new_tokens=greedy_tokens, num_beams=1)
        save_file({"logits": logits.contiguous()}, str(self.dir / "of_check.safetensors"))
        return {"prompt_ids": ids[0].tolist(), "greedy": greedy[0, ids.shape[1]:].tolist()}


def main() -> None:
    worker = Worker()
    commands = {"setup": worker.setup, "task": lambda: worker.load_task(), "run": worker.run,
                "memory": worker.memory, "check": worker.check}
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            _PROTOCOL.write("{}\n")
            _PROTOCOL.flush()
            break
        try:
            reply = commands[cmd](**request)
        except Exception:  # noqa: BLE001 - reported to the benchmark, which raises
            reply = {"error": traceback.format_exc()}
        _PROTOCOL.write(json.dumps(reply) + "\n")
        _PROTOCOL.flush()


if __name__ == "__main__":
    main()
