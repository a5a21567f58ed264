"""Few-shot evaluation benchmark: our suite (`flamingo.evaluation.evaluate`) vs OpenFlamingo
2.0.1's evaluation functions (`evaluate_captioning`, `evaluate_vqa`), same model, same data.

Data (written here, in the official formats): a Flickr30K-style Karpathy split JSON and a
VQAv2-style question/annotation pair, `--train` training images (the support pool) and `--queries`
test images of synthetic pictures; captions, questions and answers are random vocabulary words.
Settings as OpenFlamingo's defaults: 8 shots, one trial, support pool (its query_set_size) 64,
beam search width 3 with length penalty 0, 20 new tokens for captioning and 5 for VQA, stopping at
`<|endofchunk|>`, OpenFlamingo's batch size 8. Each side times its whole evaluation from the files
on disk to the predictions and the score:
  - ours: `evaluate(model, [task], data, settings, fresh out dir)`: loading, subsets, prompts,
    inference, predictions JSONL, CIDEr / VQA accuracy, results json/md/png. Its default protocol
    draws one random set of demos per trial shared by all queries, so the 8 demos are encoded once
    and every batch of queries extends that cache (D.1). The per-query protocol (fresh demos for
    every query, as OpenFlamingo samples them) is timed too and printed.
  - OpenFlamingo: its evaluation function in its own venv (`_of_eval_worker.py`: demos sampled per
    query, each batch of 8 full prompts through `generate`); its score is computed with the same
    metric code as ours, and that time is added to its side.
The model: `_inference_common.Harness` (same random backbones and OpenFlamingo's randomised
trainable weights on both sides; see that module for the weights, alternation and memory method).

    python benchmarks/eval_fewshot.py [--reps 3] [--quick] [--no-memory]

The last line is `few-shot evaluation speedup vs OpenFlamingo: X.XXx` (sum of the two tasks'
median times, OpenFlamingo's over ours).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _inference_common as IC  # noqa: E402,N812
from flamingo.evaluation import EvalSettings, evaluate, load_data_config  # noqa: E402
from flamingo.evaluation import metrics as M  # noqa: E402,N812


class EvalWorkerProcess(IC.OFWorker):
    """`OFWorker`, started on `_of_eval_worker.py` (OpenFlamingo's evaluation functions)."""

    def __init__(self, venv: Path, workdir: Path, threads: int) -> None:
        import os
        import subprocess

        self.log_path = workdir / "of_worker.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen([str(IC.venv_python(venv)), str(IC.HERE / "_of_eval_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=str(IC.HERE))


def ensure_pillow(venv: Path) -> None:
    """OpenFlamingo's evaluation datasets read images with PIL, which its inference venv lacks:
    install the same Pillow version as ours there (same decoding on both sides)."""
    import subprocess

    import PIL

    python = str(IC.venv_python(venv))
    if subprocess.run([python, "-c", f"import PIL, sys; sys.exit(PIL.__version__ != {PIL.__version__!r})"],
                      capture_output=True).returncode != 0:
        print(f"installing pillow {PIL.__version__} into {venv} ...", flush=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"pillow=={PIL.__version__}"], check=True)


def write_data(root: Path, tokenizer, images, train: int, queries: int, seed: int = 0) -> dict:
    """Flickr-style Karpathy JSON + VQAv2-style files over the same images (train first)."""
    rng = random.Random(seed)
    words = IC.vocabulary_words(tokenizer)

    def phrase(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    (root / "flickr").mkdir(parents=True)
    entries = []
    for i, im in enumerate(images):
        im.save(root / "flickr" / f"{i}.png")
        entries.append({"filename": f"{i}.png", "imgid": i, "split": "train" if i < train else "test",
                        "sentences": [{"raw": phrase(3, 8)} for _ in range(5)]})
    (root / "karpathy.json").write_text(json.dumps({"images": entries}))
    paths = {"flickr_karpathy_json_path": str(root / "karpathy.json"),
             "flickr_image_dir_path": str(root / "flickr"), "flickr_annotations_json_path": "unused"}
    for split, sub, ids in (("train", "train2014", range(train)), ("test", "val2014", range(train, train + queries))):
        (root / sub).mkdir()
        questions, annotations = [], []
        for i in ids:
            images[i].save(root / sub / f"COCO_{sub}_{i:012d}.jpg", quality=95)
            questions.append({"question_id": i, "image_id": i, "question": phrase(3, 6) + "?"})
            annotations.append({"question_id": i, "image_id": i, "answers": [{"answer": phrase(1, 2)} for _ in range(10)]})
        (root / f"{split}_q.json").write_text(json.dumps({"data_subtype": sub, "questions": questions}))
        (root / f"{split}_a.json").write_text(json.dumps({"annotations": annotations}))
        paths.update({f"vqav2_{split}_image_dir_path": str(root / sub),
                      f"vqav2_{split}_questions_json_path": str(root / f"{split}_q.json"),
                      f"vqav2_{split}_annotations_json_path": str(root / f"{split}_a.json")})
    karpathy = {"annotations": str(root / "karpathy.json"), "media": str(root / "flickr")}
    vqa = {s: {"questions": str(root / f"{s}_q.json"), "annotations": str(root / f"{s}_a.json"),
               "media": str(root / sub)} for s, sub in (("train", "train2014"), ("test", "val2014"))}
    import yaml

    (root / "data.yaml").write_text(yaml.safe_dump({"tasks": {"flickr30k": {"train": karpathy, "test": karpathy},
                                                              "vqav2": vqa}}))
    return paths


def pixel_table(model, root: Path) -> Path:
    """{file name: pixel tensor} of every image, made by our processor, for OpenFlamingo's side."""
    from PIL import Image
    from safetensors.torch import save_file

    processor = model.vision_encoder.image_processor()
    table = {}
    for path in [*(root / "flickr").iterdir(), *(root / "train2014").iterdir(), *(root / "val2014").iterdir()]:
        with Image.open(path) as im:
            table[path.name] = processor.preprocess_image(im.convert("RGB"))
    out = root / "pixels.safetensors"
    save_file({k: v.contiguous() for k, v in table.items()}, str(out))
    return out


def of_score(kind: str, predictions: list, data_root: Path) -> tuple[float, float]:
    """OpenFlamingo's predictions scored with our metric code: (score, seconds)."""
    t0 = time.perf_counter()
    if kind == "captioning":
        entries = json.loads((data_root / "karpathy.json").read_text())["images"]
        refs = {e["filename"].split(".")[0]: [s["raw"] for s in e["sentences"]] for e in entries}
        preds = {str(p["image_id"]): p["caption"] for p in predictions}
        score = 100 * M.cider(preds, {k: refs[k] for k in preds})
    else:
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
                   for a in json.loads((data_root / "test_a.json").read_text())["annotations"]}
        values = [M.vqa_accuracy(p["answer"], answers[p["question_id"]]) for p in predictions]
        score = 100 * sum(values) / len(values)
    return score, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--train", type=int, default=128, help="training images (the support pool is 64 of them)")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per forward, both sides")
    IC.add_common_args(parser, reps=3)
    args = parser.parse_args()
    if args.quick:
        args.queries, args.train = min(args.queries, 16), min(args.train, 32)
    support = min(64, args.train // 2)

    IC.ensure_of_venv(args.of_venv)
    ensure_pillow(args.of_venv)
    IC.OFWorker = EvalWorkerProcess  # the harness starts OpenFlamingo's side on the evaluation worker
    h = IC.Harness(args, default_reps=3)
    root = Path(tempfile.mkdtemp(prefix="flamingo-eval-bench-"))
    try:
        h.describe()
        images = IC.make_images(args.train + args.queries, h.sizes.image_size)
        paths = write_data(root, h.model.tokenizer, images, args.train, args.queries)
        pixels = pixel_table(h.model, root)
        data = load_data_config(root / "data.yaml")
        print(f"data: {args.train} training images (support pool {support}), {args.queries} test queries, "
              f"{args.shots} shots, 1 trial; beam 3, length penalty 0; batch size {args.batch_size}")
        totals = {"ours": 0.0, "of": 0.0, "ours_per_query": 0.0}
        for kind, task, new_tokens in (("captioning", "flickr30k", 20), ("vqa", "vqav2", 5)):
            print(f"\n== {task} ({kind}) ==", flush=True)
            h.worker.call("eval_task", config={
                "kind": kind, "shots": args.shots, "num_samples": args.queries, "query_set_size": support,
                "batch_size": args.batch_size, "seed": 42, "paths": paths, "pixels": str(pixels)})

            def ours(mode: str = "shared", task=task, new_tokens=new_tokens):
                out = Path(tempfile.mkdtemp(dir=root))
                settings = EvalSettings(shots=[args.shots], trials=1, support_size=support, demo_mode=mode,
                                        batch_size=args.batch_size, num_beams=3, max_new_tokens=new_tokens,
                                        length_penalty=0.0, max_prompt_tokens=None)
                try:
                    return evaluate(h.model, [task], data, settings, out, progress=False)
                finally:
                    shutil.rmtree(out, ignore_errors=True)

            timing = h.compare_timing(ours)
            score, metric_s = of_score(kind, timing["of_out"]["predictions"], root)
            ours_score = timing["ours_out"]["tasks"][task]["shots"][str(args.shots)]["mean"]
            _, per_query_s, _ = IC.timed(lambda: ours("per_query"))
            memory = h.compare_memory(ours)
            med = timing["median"]
            print(f"scores (random model: noise): ours {ours_score}, OpenFlamingo {score:.2f}; OpenFlamingo's "
                  f"metric computed with our code in {metric_s:.2f}s, added to its time")
            print(f"ours with per-query demos (OpenFlamingo's protocol): {per_query_s:.2f}s "
                  f"({(med['of'] + metric_s) / per_query_s:.2f}x faster than OpenFlamingo)")
            timing["median"] = {"ours": med["ours"], "of": med["of"] + metric_s}
            timing["times"] = {"ours": timing["times"]["ours"], "of": [t + metric_s for t in timing["times"]["of"]]}
            h.report(timing, memory, f"{task} evaluation")
            totals["ours"] += med["ours"]
            totals["of"] += med["of"] + metric_s
            totals["ours_per_query"] += per_query_s
        print(f"\ntotal: ours {totals['ours']:.2f}s (per-query demos {totals['ours_per_query']:.2f}s), "
              f"OpenFlamingo {totals['of']:.2f}s")
        print(f"few-shot evaluation speedup vs OpenFlamingo: {totals['of'] / totals['ours']:.2f}x")
    finally:
        h.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
