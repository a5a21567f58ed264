"""The procedural generator behind the embedded default: deterministic, and its labels are true
(checked by rendering and measuring pixels), its held-out splits never leak into training."""

from collections import deque

import numpy as np
import pytest
import torch

from flamingo.data import procedural
from flamingo.data.procedural import COLOURS, HELD_OUT_COLOURS, HELD_OUT_KINDS, KINDS, Scene, SceneObject


def object_mask(scene: Scene, size: int) -> np.ndarray:
    """Pixels that differ from the plain background."""
    pixels = np.asarray(procedural.render(scene, size)).astype(int)
    return np.abs(pixels - np.array(scene.background)).sum(-1) > 30


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components (a small flood fill; images are tiny)."""
    seen = np.zeros_like(mask)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, pixels = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(pixels)
    return found


def test_generation_is_deterministic_per_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        docs = [procedural.training_document(task, rng, 64) for task in ("caption", "qa", "binding", "induction")]
        return [(np.asarray(s.image).tobytes(), s.text) for doc in docs for s in doc]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


@pytest.mark.parametrize("seed", range(6))
def test_colour_count_and_position_labels_match_the_pixels(seed):
    rng = np.random.default_rng(seed)
    for count in (1, 2, 3, 4):
        scene = procedural.sample_scene(rng, count=count, texture="solid")
        scene = Scene(scene.objects, scene.background, "plain")
        image = np.asarray(procedural.render(scene, 160)).astype(int)
        mask = object_mask(scene, 160)
        blobs = [b for b in components(mask) if len(b) > 20]
        assert len(blobs) == count, (procedural.describe(scene), len(blobs))
        # The object pixels have the named colour.
        colours, counts = np.unique(image[mask].reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == COLOURS[scene.colour]
        if count == 1:
            ys, xs = np.nonzero(mask)
            measured = SceneObject(scene.kind, scene.colour, "solid", (xs.mean() / 160, ys.mean() / 160), 0.2)
            assert measured.position_word == scene.objects[0].position_word
            assert procedural.describe(scene).split()[-1] == scene.kind


def test_each_kind_has_its_own_silhouette():
    masks = {k: object_mask(Scene((SceneObject(k, "red", "solid", (0.5, 0.5), 0.3),), (250, 250, 250)), 96)
             for k in KINDS}
    for a in KINDS:
        assert masks[a].sum() > 300, a
        for b in KINDS:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.9, (a, b, iou)


def test_textures_change_the_pixels_but_not_the_named_colour():
    obj = dict(kind="square", colour="blue", centre=(0.5, 0.5), radius=0.3)
    solid, striped = (np.asarray(procedural.render(Scene((SceneObject(texture=t, **obj),), (250, 250, 250)), 96))
                      for t in ("solid", "striped"))
    assert (solid != striped).any()
    assert tuple(solid[48, 48]) == COLOURS["blue"]


def test_training_documents_never_use_held_out_kinds_colours_or_words():
    rng = np.random.default_rng(0)
    for _ in range(60):
        for task in ("caption", "qa", "binding", "induction"):
            for segment in procedural.training_document(task, rng, 32):
                assert segment.scene.kind not in HELD_OUT_KINDS and segment.scene.colour not in HELD_OUT_COLOURS
                text = "".join(piece for piece, _ in segment.text)
                if text.startswith("This is a "):
                    assert procedural.word_split(text[len("This is a "):].rstrip(".")) == "train"


def test_binding_episode_answer_is_the_word_shown_with_the_same_kind():
    rng = np.random.default_rng(1)
    for _ in range(20):
        support, query, answer, candidates = procedural.binding_episode(rng, 32, "eval", ways=3, shots=6)
        assert answer in candidates and len(set(candidates)) == 3
        assert query.scene.kind in HELD_OUT_KINDS
        words = {s.scene.kind: s.text[1][0] for s in support}
        assert words[query.scene.kind] == answer
        # A word is a target only after it has been shown once.
        seen = set()
        for s in support:
            piece, is_target = s.text[1]
            assert is_target == (piece in seen)
            seen.add(piece)


def test_procedural_source_labels_only_the_answers(lm_dir, clip_dir):
    from conftest import build_with_vision

    from flamingo.data.synthetic import ProceduralSource

    model = build_with_vision(lm_dir("llama"), clip_dir)
    source = ProceduralSource("episodes", model.tokenizer, model.media_token_id, model.eoc_token_id,
                              model.vision_encoder.image_processor(), batch_size=4, tasks={"binding": 1.0}, image_size=32)
    batch = source.batch(0)
    assert torch.equal(batch.num_media, (batch.input_ids == model.media_token_id).sum(1))
    for row in range(4):
        ids, labels = batch.input_ids[row], batch.labels[row]
        labelled = ids[labels != -100].tolist()
        text = model.tokenizer.decode([t for t in labelled if t != model.eoc_token_id])
        assert "This is" not in text and text.strip()  # only the made-up words
        assert model.media_token_id not in labelled
        assert labelled[-1] == model.eoc_token_id  # the answer's end of chunk is learned
    assert torch.equal(source.batch(0).input_ids, batch.input_ids)  # a pure function of the position


def test_question_episode_answers_describe_the_query_scene():
    rng = np.random.default_rng(2)
    for attribute in ("kind", "colour"):
        for _ in range(10):
            support, query, answer, candidates = procedural.question_episode(rng, 32, shots=3, attribute=attribute)
            truth = query.scene.kind if attribute == "kind" else query.scene.colour
            assert answer == f" {truth}" and answer in candidates and len(candidates) == len(set(candidates)) == 9
            for s in support:  # answered examples, each about its own scene
                (question, _), (shown, is_target) = s.text
                assert is_target and shown == f" {s.scene.kind if attribute == 'kind' else s.scene.colour}"
                assert (s.scene.kind in question) == (attribute == "colour")


def test_episode_items_can_replace_images_by_their_captions():
    from flamingo.data.episodes import episode_items

    support, query, _, _ = procedural.binding_episode(np.random.default_rng(3), 32, "eval", ways=2, shots=2)
    with_images = episode_items(support, query)
    as_text = episode_items(support, query, images_as_text=True)
    assert sum(not isinstance(item, str) for item in with_images) == 3
    assert all(isinstance(item, str) for item in as_text) and len(as_text) == len(with_images)
    caption = procedural.describe(query.scene)
    assert as_text[-2] == caption[0].upper() + caption[1:] + ". " and as_text[-1] == "This is a"
