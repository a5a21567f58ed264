"""The benchmarks: name -> loader, prompt template, open/close-ended, metric (paper Table 6, B.1.5).

Templates (B.1.5): "Output: {answer}" for non-QA tasks, "Question: {question} Answer: {answer}"
for QA and VisDial (the caption and earlier rounds prepended without a prompt), the HatefulMemes
prompt with the meme text, and "Caption: a person {answer}" for RareAct. A demo is the template
filled in; a query is the template up to `{answer}`; close-ended candidates are " " + answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from flamingo.data.benchmarks.samples import EvalDataError, Sample

Kind = Literal["caption", "vqa", "classification", "binary", "choice", "visdial", "retrieval"]

CAPTION = "Output: {answer}"
QA = "Question: {question} Answer: {answer}"
HATEFUL = 'is an image with written: "{meme_text}" on it. Is it hateful? Answer: {answer}'


@dataclass(frozen=True)
class TaskSpec:
    name: str
    loader: str  # key of loaders.LOADERS
    kind: Kind
    metric: str  # the reported (primary) metric
    template: str
    video: bool = False
    val_query_size: int | None = 1024  # B.1.4 validation query subset; None: per class
    max_new_tokens: int = 0  # open-ended only
    zero_shot_only: bool = False
    fields: tuple[str, ...] = ("annotations", "media", "media_pattern")  # data config fields it reads

    @property
    def open_ended(self) -> bool:
        return self.kind in ("caption", "vqa")

    @property
    def per_class(self) -> bool:
        """Classification: support and validation query subsets are drawn per class (B.1.4)."""
        return self.kind == "classification"

    # ---------------------------------------------------------------------------- prompts
    def fields_of(self, sample: Sample) -> dict[str, Any]:
        history = "".join(f" Question: {q} Answer: {a}." for q, a in sample.extra.get("history", []))
        return {"question": sample.question, "meme_text": sample.extra.get("meme_text", ""),
                "dialogue": f"{sample.extra['caption']}.{history} " if "caption" in sample.extra else ""}

    def query_text(self, sample: Sample) -> str:
        """The template up to the answer: what the model continues."""
        head = self.template[:self.template.index("{answer}")]
        return head.format(**self.fields_of(sample)).rstrip()

    def demo_answer(self, sample: Sample) -> str:
        """The answer shown in a demo: the label; else the most frequent reference (VQA's
        multiple-choice answer; the first caption when all differ)."""
        if self.kind == "retrieval":  # RareAct is zero-shot: its text-only examples show a positive
            return sample.answers[0] if sample.answers else sample.extra["classes"][0]
        if sample.label:
            return sample.label
        return Counter(sample.answers).most_common(1)[0][0]

    def demo_text(self, sample: Sample) -> str:
        return f"{self.query_text(sample)} {self.demo_answer(sample)}"

    def candidates(self, sample: Sample, classes: list[str]) -> list[str]:
        """Close-ended options, each as it follows the query text."""
        if self.kind == "binary":
            options = ["yes", "no"]
        elif self.kind in ("choice", "visdial"):
            options = sample.choices
        elif self.kind == "retrieval":
            options = sample.extra["classes"]
        else:
            options = classes
        return [" " + o for o in options]


def _t(name: str, loader: str, kind: Kind, metric: str, template: str, **kw: Any) -> TaskSpec:
    return TaskSpec(name, loader, kind, metric, template, **kw)


_VQA_FIELDS = ("questions", "annotations", "media", "media_pattern")
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _t("coco", "karpathy", "caption", "CIDEr", CAPTION, val_query_size=5000, max_new_tokens=20,
       fields=("annotations", "media")),
    _t("flickr30k", "karpathy", "caption", "CIDEr", CAPTION, val_query_size=5000, max_new_tokens=20,
       fields=("annotations", "media")),
    _t("vqav2", "vqa", "vqa", "VQA accuracy", QA, max_new_tokens=5, fields=_VQA_FIELDS),
    _t("okvqa", "vqa", "vqa", "OK-VQA accuracy", QA, max_new_tokens=5, fields=_VQA_FIELDS),
    _t("textvqa", "textvqa", "vqa", "VQA accuracy", QA, max_new_tokens=10),
    _t("vizwiz", "vizwiz", "vqa", "VQA accuracy", QA, max_new_tokens=10),
    _t("hatefulmemes", "hateful_memes", "binary", "ROC-AUC", HATEFUL),
    _t("visdial", "visdial", "visdial", "NDCG", "{dialogue}" + QA,
       fields=("annotations", "relevance", "media", "media_pattern")),
    _t("imagenet", "class_folders", "classification", "top-1", CAPTION, val_query_size=None,
       fields=("media", "class_names")),
    # ImageNet's shifted test sets (flamingo.data.benchmarks.imagenet): ImageNet's prompt and class names
    *[_t(name, name, "classification", "top-1", CAPTION, val_query_size=None, fields=("media", "class_names"))
      for name in ("imagenetv2", "imagenet_r", "imagenet_sketch", "imagenet_a")],
    _t("objectnet", "objectnet", "classification", "top-1", CAPTION, val_query_size=None,
       fields=("media", "class_names", "annotations")),
    # ImageNet on a shift's classes: the ID accuracy that effective robustness pairs with ImageNet-R, -A and
    # ObjectNet (flamingo.evaluation.robustness), as the testbed's val-on-imagenet-r-classes etc.
    *[_t(f"imagenet_on_{name}_classes", f"imagenet_on_{name}_classes", "classification", "top-1", CAPTION,
         val_query_size=None, fields=("media", "class_names")) for name in ("r", "a")],
    _t("imagenet_on_objectnet_classes", "imagenet_on_objectnet_classes", "classification", "top-1", CAPTION,
       val_query_size=None, fields=("media", "class_names", "annotations")),
    # A synthetic shift the project generates (flamingo data shapes --kind shift): procedural shapes
    # (ID) and the same classes drawn as outlines on a new background family (OOD).
    _t("shapes", "class_folders", "classification", "top-1", CAPTION, val_query_size=None,
       fields=("media", "class_names")),
    _t("shapes_sketch", "class_folders", "classification", "top-1", CAPTION, val_query_size=None,
       fields=("media", "class_names")),
    _t("msvdqa", "video_qa", "vqa", "top-1", QA, video=True, max_new_tokens=5,
       fields=("annotations", "media", "video_map", "media_pattern")),
    _t("msrvttqa", "video_qa", "vqa", "top-1", QA, video=True, max_new_tokens=5,
       fields=("annotations", "media", "video_map", "media_pattern")),
    _t("ivqa", "ivqa", "vqa", "iVQA accuracy", QA, video=True, max_new_tokens=5),
    _t("nextqa", "nextqa", "vqa", "WUPS", QA, video=True, max_new_tokens=10,
       fields=("annotations", "media", "video_map", "media_pattern")),
    _t("star", "star", "choice", "top-1", QA, video=True),
    _t("vatex", "vatex", "caption", "CIDEr", CAPTION, video=True, max_new_tokens=20),
    _t("youcook2", "youcook2", "caption", "CIDEr", CAPTION, video=True, max_new_tokens=20),
    _t("kinetics700", "kinetics", "classification", "top-1", CAPTION, video=True, val_query_size=None),
    _t("rareact", "rareact", "retrieval", "mWAP", "Caption: a person {answer}", video=True, zero_shot_only=True),
]}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise EvalDataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
