"""The lmms-eval plugin (flamingo.evaluation.lmms_eval_plugin): its request methods against our
own inference API on the same questions, and, when lmms-eval is installed (the lmms-eval extra),
`python -m lmms_eval --model flamingo` run offline on the local tasks in tests/lmms_eval_tasks
(a JSON-lines dataset of solid-colour PNGs in the working directory), its per-sample outputs and
scores checked against the same computation through our API."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import build_with_vision, randomize_gates, solid_image
from flamingo.errors import UserError
from flamingo.evaluation.lmms_eval_plugin import FlamingoLMMAdapter, generation_config, manifest
from flamingo.inference import generate_text
from flamingo.inference.generation import GenerationConfig, generate
from flamingo.inference.prompt import interleaved_prompt
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import encode_prompts
from flamingo.model.weights import save_pretrained

TASKS = Path(__file__).resolve().parent / "lmms_eval_tasks"
# the tasks' own functions: the same prompts on both sides
_spec = importlib.util.spec_from_file_location("lmms_eval_task_utils", TASKS / "utils.py")
task_utils = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_utils)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
GEN = {"max_new_tokens": 5, "until": ["<|endofchunk|>", "\n"], "temperature": 0, "do_sample": False}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(lm_dir, clip_dir, tmp_path_factory):
    """A tiny saved model, the dataset of the local tasks (colours.jsonl + PNGs) and its documents."""
    root = tmp_path_factory.mktemp("lmms")
    model = build_with_vision(lm_dir("llama"), clip_dir)
    randomize_gates(model)
    save_pretrained(model, root / "model")
    names, docs = list(COLOURS), []
    for i in range(6):
        answer, support = names[i % 3], names[(i + 1) % 3]
        solid_image(COLOURS[answer]).save(root / f"q{i}.png")
        solid_image(COLOURS[support]).save(root / f"s{i}.png")
        docs.append({"id": i, "image": f"q{i}.png", "answer": answer, "support_image": f"s{i}.png",
                     "support_answer": support})
    (root / "colours.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return SimpleNamespace(root=root, model=model.eval(), docs=docs)


def images(root: Path, doc: dict, few_shot: bool) -> list[Image.Image]:
    names = [doc["support_image"], doc["image"]] if few_shot else [doc["image"]]
    return [Image.open(root / name).convert("RGB") for name in names]


def our_answer(setup, doc: dict, few_shot: bool) -> str:
    """The task's question answered one at a time through generate_text, as a user of our API would."""
    found = images(setup.root, doc, few_shot)
    items = ([found[0], f"{task_utils.QUESTION} {doc['support_answer']}<|endofchunk|>", found[1]] if few_shot
             else [found[0]]) + [task_utils.QUESTION]
    return generate_text(setup.model, items, max_new_tokens=5, stop_strings=("<|endofchunk|>", "\n"))


def our_losses(setup, doc: dict) -> list[float]:
    """Each option's mean negative log-probability per token after the question, through our API
    (lmms-eval's value for a loglikelihood request: what its own models return, the loss)."""
    state = encode_prompts(setup.model, [interleaved_prompt([*images(setup.root, doc, False), task_utils.QUESTION])])
    return (-score_candidates(setup.model, state, [" " + c for c in task_utils.CHOICES]).mean_logprob[0]).tolist()


@pytest.fixture(scope="module")
def adapter(setup):
    lmm = FlamingoLMMAdapter(pretrained=str(setup.root / "model"), device="cpu", batch_size="4")
    lmm.task_dict = {"colours": {"test": setup.docs}}
    return lmm


def request(context: str, second, visual, doc_id: int) -> SimpleNamespace:
    return SimpleNamespace(args=(context, second, visual, doc_id, "colours", "test"))


def with_root(setup, function):
    """A task function reading the images relative to the dataset's folder."""
    return lambda doc: function({k: str(setup.root / v) if k.endswith("image") else v for k, v in doc.items()})


def test_generate_until_batches_requests_and_answers_as_our_api_does(setup, adapter):
    """Batched (4 per pass, zero-shot and interleaved one-shot prompts mixed in a group) == one
    question at a time through generate_text; `until` strings cut the text."""
    zero = with_root(setup, task_utils.doc_to_visual)
    one = with_root(setup, task_utils.fewshot_doc_to_visual)
    requests = [request(task_utils.QUESTION, dict(GEN), zero, i) for i in range(6)]
    requests += [request(task_utils.fewshot_doc_to_text(d), dict(GEN), one, i) for i, d in enumerate(setup.docs)]
    answers = adapter.generate_until(requests)
    expected = [our_answer(setup, d, False) for d in setup.docs] + [our_answer(setup, d, True) for d in setup.docs]
    assert answers == expected
    assert len(set(answers[:6])) > 1 and not any("\n" in a or "<|endofchunk|>" in a for a in answers)


def test_loglikelihood_shares_a_prompt_between_candidates_and_matches_our_losses(setup, adapter, monkeypatch):
    from flamingo.evaluation import lmms_eval_plugin

    encoded = []
    real = lmms_eval_plugin.encode_prompts
    monkeypatch.setattr(lmms_eval_plugin, "encode_prompts",
                        lambda model, prompts, **kw: encoded.append(len(prompts)) or real(model, prompts, **kw))
    visual = with_root(setup, task_utils.doc_to_visual)
    requests = [request(task_utils.QUESTION, " " + choice, visual, i)
                for i in range(6) for choice in task_utils.CHOICES]
    results = adapter.loglikelihood(requests)
    assert encoded == [4, 2]  # 6 documents' prompts, each once, 4 per pass: not 18 prompts
    for i, doc in enumerate(setup.docs):
        got = [ll for ll, _ in results[3 * i:3 * i + 3]]
        assert got == pytest.approx(our_losses(setup, doc), abs=1e-4)
    # is_greedy: true exactly for the tokens greedy decoding produces (the tiny model's are partial
    # UTF-8 bytes, which no text tokenizes back to: two names stand for the token sequences)
    state = encode_prompts(adapter.model, [adapter._prompt(task_utils.QUESTION, visual, 0, "colours", "test")],
                           max_new_tokens=3)
    ids = generate(adapter.model, state, GenerationConfig(max_new_tokens=3, stop_at_end_of_chunk=False))[0].token_ids
    tokens = {"GREEDY": list(ids), "SECOND-NOT": [ids[0], (ids[1] + 1) % 300, ids[2]],
              "FIRST-NOT": [(ids[0] + 1) % 300]}
    tokenizer = adapter.model.tokenizer

    class Named:
        def __call__(self, text, **kwargs):
            return {"input_ids": tokens[text]} if text in tokens else tokenizer(text, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    monkeypatch.setattr(adapter.model, "tokenizer", Named())
    flags = [greedy for _, greedy in adapter.loglikelihood([request(task_utils.QUESTION, name, visual, 0)
                                                            for name in tokens])]
    assert flags == [True, False, False]
    monkeypatch.setattr(adapter.model, "tokenizer", tokenizer)
    # acc_mutual_info's unconditional requests: (context, continuation) and no image
    [(unconditional, _)] = adapter.loglikelihood([SimpleNamespace(args=("", " red"))])
    assert unconditional > 0


def test_placeholders_images_and_model_args_are_checked(setup, adapter):
    visual = with_root(setup, task_utils.fewshot_doc_to_visual)
    with pytest.raises(UserError, match="the text has 1 <image> placeholder.* but the task gives 2 image"):
        adapter.generate_until([request("<image>Output:", dict(GEN), visual, 0)])
    with pytest.raises(UserError, match="takes PIL images, got str"):
        adapter.generate_until([request("Output:", dict(GEN), lambda doc: ["clip.mp4"], 0)])
    with pytest.raises(UserError, match=r"got also \['temperature'\]"):
        FlamingoLMMAdapter(pretrained=str(setup.root / "model"), temperature=0.2)
    config = generation_config({"until": "Q:", "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 3})
    assert config.stop_strings == ("Q:",) and config.do_sample and config.temperature == 0.7 and config.top_p == 0.9
    assert not generation_config({"temperature": 0, "do_sample": True}).do_sample


def test_the_plugin_module_needs_lmms_eval_only_for_the_lmms_subclass():
    """Importing the module (and the adapter) needs no lmms-eval; `FlamingoLMM` says which extra."""
    code = ("import sys\nsys.modules['lmms_eval'] = None\n"
            "from flamingo.evaluation import lmms_eval_plugin\n"
            "try:\n    lmms_eval_plugin.FlamingoLMM\nexcept ImportError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout == "the lmms-eval plugin needs the lmms-eval extra: pip install 'flamingo[lmms-eval]'\n", \
        done.stderr


needs_lmms_eval = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                     reason="lmms-eval is not installed (pip install 'flamingo[lmms-eval]')")


@needs_lmms_eval
def test_lmms_eval_registers_the_plugin_through_its_entry_point():
    from lmms_eval import models

    cls = models.get_model("flamingo")
    assert cls.__name__ == "FlamingoLMM" and issubclass(cls, FlamingoLMMAdapter)
    assert manifest().simple_class_path == "flamingo.evaluation.lmms_eval_plugin.FlamingoLMM"


@needs_lmms_eval
def test_python_m_lmms_eval_runs_offline_and_scores_as_our_api(setup, tmp_path):
    """The three local tasks (open-ended, interleaved one-shot, multiple choice) through lmms-eval's
    own command line, offline, batch size 2: every sample's output == ours, and so the scores."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "flamingo", "--model_args",
         f"pretrained={setup.root / 'model'},device=cpu", "--tasks",
         "flamingo_colours,flamingo_colours_fewshot,flamingo_colours_choice", "--include_path", str(TASKS),
         "--batch_size", "2", "--output_path", str(out), "--log_samples"],
        cwd=setup.root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [results_file] = glob.glob(str(out / "*" / "*_results.json"))
    scores = json.loads(Path(results_file).read_text())["results"]

    def samples(task: str) -> list[dict]:
        [path] = glob.glob(str(out / "*" / f"*_samples_{task}.jsonl"))
        return sorted((json.loads(line) for line in Path(path).read_text().splitlines()), key=lambda s: s["doc_id"])

    for task, few_shot in (("flamingo_colours", False), ("flamingo_colours_fewshot", True)):
        ours = [our_answer(setup, doc, few_shot) for doc in setup.docs]
        assert [s["filtered_resps"] for s in samples(task)] == ours
        exact = sum(a.strip() == d["answer"] for a, d in zip(ours, setup.docs)) / len(ours)
        assert scores[task]["exact_match,none"] == pytest.approx(exact)
    correct = 0
    for sample, doc in zip(samples("flamingo_colours_choice"), setup.docs):
        ours = our_losses(setup, doc)
        assert [float(loss) for loss, _ in sample["filtered_resps"]] == pytest.approx(ours, abs=1e-4)
        correct += task_utils.CHOICES[min(range(3), key=ours.__getitem__)] == doc["answer"]
    assert scores["flamingo_colours_choice"]["acc,none"] == pytest.approx(correct / len(setup.docs))
