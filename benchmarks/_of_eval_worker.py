"""The OpenFlamingo side of `eval_fewshot.py`: runs OpenFlamingo 2.0.1's own evaluation functions
(`open_flamingo/eval/evaluate.py`: `evaluate_captioning`, `evaluate_vqa`) in OpenFlamingo's venv,
driven like `_of_worker.py` (whose model setup, `OFEvalModel` and protocol it reuses).

What is OpenFlamingo's own code here: the evaluation functions themselves (its datasets
`CaptionDataset` / `VQADataset` reading the fixture files, `prepare_eval_samples`, `get_query_set`,
`sample_batch_demos_from_query_set`, prompt building, batching, `get_outputs` -> `generate`,
`postprocess_*_generation`, the all-gather). What is substituted:
  - modules evaluate.py imports but these functions do not use (sklearn, torchvision, nltk,
    inflection, pycocotools; open_clip as in `_common`) are stubbed;
  - the final metric call (`compute_cider` / `compute_vqa_accuracy`, which need pycocotools /
    pycocoevalcap) is replaced by capturing the predictions file; the benchmark scores them with
    the same metric functions as ours and adds that time to OpenFlamingo's;
  - the eval model is `_of_worker.OFEvalModel` plus the prompt methods of OpenFlamingo's
    `eval/models/open_flamingo.py` (not shipped in the wheel); its image processor returns the
    pixel tensor our processor made of the same file (so OpenFlamingo does not pay that step).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import types
from pathlib import Path

import _of_worker as W  # noqa: N812 - sets up the protocol channel on import
import torch
from safetensors.torch import load_file


def _stub_modules() -> None:
    def stub(name: str, **attrs) -> None:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules.setdefault(name, module)

    class _Unused:  # a class evaluate.py's imports name but these evaluations never use
        pass

    stub("open_clip")
    stub("sklearn")
    stub("sklearn.metrics", roc_auc_score=None)
    stub("torchvision")
    stub("torchvision.datasets", ImageFolder=_Unused)
    stub("pycocotools")
    stub("pycocotools.coco", COCO=_Unused)
    stub("pycocoevalcap")
    stub("pycocoevalcap.eval", COCOEvalCap=_Unused)
    stub("nltk", stem=types.SimpleNamespace(WordNetLemmatizer=_Unused))  # made at import by ok_vqa_utils
    stub("nltk.corpus")
    stub("nltk.corpus.reader", VERB="v")
    stub("inflection")


class EvalModel(W.OFEvalModel):
    """OpenFlamingo's eval model (see _of_worker) with its prompt formats."""

    def get_vqa_prompt(self, question, answer=None) -> str:
        return (f"<image>Question:{question} Short answer:{answer if answer is not None else ''}"
                f"{'<|endofchunk|>' if answer is not None else ''}")

    def get_caption_prompt(self, caption=None) -> str:
        return (f"<image>Output:{caption if caption is not None else ''}"
                f"{'<|endofchunk|>' if caption is not None else ''}")


class EvalWorker(W.Worker):
    def eval_task(self, config: dict) -> dict:
        """config: {"kind": "captioning"|"vqa", "shots", "num_samples", "query_set_size",
        "batch_size", "seed", "paths": {...}, "pixels": file of {image file name: tensor}}."""
        _stub_modules()
        import open_flamingo

        sys.path.insert(0, str(Path(open_flamingo.__file__).parent / "eval"))
        import evaluate as of_eval  # noqa: PLC0415 - OpenFlamingo's evaluate.py, run as its eval dir does

        if not torch.distributed.is_initialized():  # its functions all-gather the predictions
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self.captured: list = []

        def capture(result_path, *_args, **_kwargs):
            self.captured = json.loads(Path(result_path).read_text())
            return {"CIDEr": 0.0} if config["kind"] == "captioning" else 0.0

        os.chdir(self.dir)  # evaluate.py writes its predictions file into the working directory
        of_eval.compute_cider = capture
        of_eval.compute_vqa_accuracy = capture
        pixels = load_file(config["pixels"])
        self.eval_model = EvalModel(self.model, self.tokenizer, image_processor=lambda im: pixels[Path(im.filename).name])
        self.of_eval, self.config = of_eval, config
        return {}

    def run_task(self) -> dict:
        c = self.config
        args = argparse.Namespace(model="open_flamingo", num_samples=c["num_samples"], batch_size=c["batch_size"],
                                  query_set_size=c["query_set_size"], rices=False, rank=0, world_size=1, **c["paths"])
        if c["kind"] == "captioning":
            self.of_eval.evaluate_captioning(args, self.eval_model, seed=c["seed"], num_shots=c["shots"],
                                             dataset_name="flickr")
        else:
            self.of_eval.evaluate_vqa(args, self.eval_model, seed=c["seed"], num_shots=c["shots"],
                                      dataset_name="vqav2")
        return {"predictions": self.captured}


def main() -> None:
    worker = EvalWorker()
    commands = {"setup": worker.setup, "eval_task": worker.eval_task, "run": worker.run, "memory": worker.memory}
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            W._PROTOCOL.write("{}\n")
            W._PROTOCOL.flush()
            break
        try:
            reply = commands[cmd](**request)
        except Exception:  # noqa: BLE001 - reported to the benchmark, which raises
            reply = {"error": W.traceback.format_exc()}
        W._PROTOCOL.write(json.dumps(reply) + "\n")
        W._PROTOCOL.flush()


if __name__ == "__main__":
    main()
