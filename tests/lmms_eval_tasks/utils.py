"""The functions of the local lmms-eval tasks in this folder (tests/test_lmms_eval.py): questions
about the colour of solid images, read from colours.jsonl and its PNG files in the working
directory."""

from PIL import Image

QUESTION = "Question: What colour is this? Answer:"
CHOICES = ["red", "green", "blue"]


def _image(path):
    with Image.open(path) as image:
        return image.convert("RGB")


def doc_to_visual(doc):
    return [_image(doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return QUESTION


def fewshot_doc_to_visual(doc):
    """The support image, then the query image: the order of the text's placeholders."""
    return [_image(doc["support_image"]), _image(doc["image"])]


def fewshot_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"<image>{QUESTION} {doc['support_answer']}<|endofchunk|><image>{QUESTION}"


def doc_to_choice(doc):
    return CHOICES


def doc_to_target_index(doc):
    return CHOICES.index(doc["answer"])


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
