"""The `kind: dialogue` training data (flamingo.training.dialogue): chats built exactly as the chat
path builds its prompts, with the loss on the assistant turns only."""

from __future__ import annotations

import pytest
import torch

from flamingo.inference.family import dialogue_text, family_io
from flamingo.model.config import ConfigError
from flamingo.model.families import MEDIA

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(lm_dir, clip_dir):
    from conftest import build_with_vision

    return build_with_vision(lm_dir("llama"), clip_dir)


def source(model, **options):
    from flamingo.training.dialogue import DialogueSource

    return DialogueSource("chat", model.tokenizer, model.config.media_token, model.config.end_of_chunk_token,
                          model.media_token_id, model.eoc_token_id, model.vision_encoder.image_processor(),
                          batch_size=2, image_size=32, **options)


def test_each_answer_follows_the_chat_paths_prompt_token_for_token_and_only_answers_are_learned(built):
    chats = source(built)
    family = family_io(built)
    seen_turns = set()
    for index in range(32):
        sample = chats.sample(index)
        messages, images = chats.chat(index)
        ids, labels = sample.input_ids.tolist(), sample.labels
        assert sample.media.shape[0] == len(images) == ids.count(built.media_token_id)
        learned = (labels != -100).tolist()
        position = 0
        for turn in range(1, len(messages), 2):
            prompt = family.tokenize(built, dialogue_text(messages[:turn], built.config.media_token,
                                                          built.config.end_of_chunk_token), True)
            assert ids[:len(prompt)] == prompt  # what the server's engine is given before this answer
            assert not any(learned[position:len(prompt)])  # no loss on the prompt (preamble, user turns)
            answer = family.tokenize(built, " " + messages[turn].content[0], False) + [built.eoc_token_id]
            end = len(prompt) + len(answer)
            assert ids[len(prompt):end] == answer and all(learned[len(prompt):end])  # the reply, then its stop
            position = end
        assert position == len(ids)
        seen_turns.add(len(messages) // 2)
    assert seen_turns == {1, 2, 3}  # single answers, follow-ups and a second image all drawn


def test_answers_say_what_the_image_shows(built):
    from flamingo.data import procedural
    from flamingo.training.dialogue import conversation

    chats = source(built)
    for index in range(20):
        scenes = []

        def draw(rng):
            image, caption, question = chats.draw("procedural")(rng)
            scenes.append(caption)
            return image, caption, question

        messages, _ = conversation(chats.rng(index), draw)
        first = messages[1].content[0]
        assert first.endswith(".") and first[0].isupper()
        if messages[0].content[1] in ("What is in this image?", "Describe this image."):
            assert first == scenes[0][0].upper() + scenes[0][1:] + "."  # the caption of the image shown
        words = set(first.lower().strip(".").split())
        assert words & {*procedural.KINDS, *procedural.COLOURS, *procedural.NUMBER_WORDS, "left", "right", "top",
                        "bottom", *(procedural.plural(k) for k in procedural.KINDS)}
    assert messages[0].content[0] is MEDIA


def test_clipart_chats_and_bad_options(built, clipart_root):
    chats = source(built, images={"clipart": 1.0}, root=str(clipart_root))
    batch = chats.batch(0)
    assert torch.equal(batch.num_media, (batch.input_ids == built.media_token_id).sum(1))
    assert torch.equal(chats.batch(0).input_ids, batch.input_ids)  # a pure function of the position
    with pytest.raises(ConfigError, match="images: expected a mapping"):
        source(built, images={"photos": 1.0})


def _script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def test_chat_answers_counts_an_answer_right_when_it_names_the_shape_or_colour():
    chat = _script("chat_answers")
    [shown] = chat.procedural_images(1, seed=0)
    kind, colour = shown.truth.split()[-1], shown.truth.split()[-2]
    assert shown.right(f"A {kind}.") and shown.right(f" {colour}") and not shown.right("")
    assert not shown.right("A drawing of a person.")
    assert chat.wilson(0, 10).startswith("0.0% (0/10; 95% CI 0.0-")


def test_binding_attention_finds_each_support_chunk_from_its_image_to_its_end():
    spans = _script("binding_attention").chunk_spans([1, 9, 5, 6, 8, 9, 5, 8, 9, 5], media_id=9, eoc_id=8)
    assert spans == [(1, 5), (5, 8)]  # the query's chunk (no <|endofchunk|>) is not a support chunk
