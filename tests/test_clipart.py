"""Real drawn objects (flamingo.data.clipart) on a miniature of the clip-art packages (the
`clipart_root` fixture): the catalogue and its labels, held-out categories kept out of training,
documents and episodes, shards, the in-memory training source, and the object evaluation."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flamingo.data import clipart

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def found(clipart_root, monkeypatch):
    monkeypatch.setenv(clipart.ROOT_ENV, str(clipart_root))
    return clipart.catalogue()


def test_the_catalogue_labels_images_by_folder_and_reads_stamp_captions(found, clipart_root):
    assert sorted(found.categories) == ["bird", "dog", "fruit", "insect", "tree", "vegetable"]
    assert sorted(found.names("train")) == ["bird", "dog", "fruit"]
    assert sorted(found.names("eval")) == ["insect", "tree", "vegetable"]
    assert found.coarse("eval") == ("animal", "food", "plant")
    paths = {item.path.name for item in found.items}
    assert "icon.png" not in paths and "hand.png" not in paths  # unmapped and excluded folders
    by_name = {item.path.name: item for item in found.items}
    dog, oak, pine, bird = by_name["dog.png"], by_name["oak.png"], by_name["pine.png"], by_name["bird_0.png"]
    assert (dog.caption, dog.name, dog.category.coarse) == ("A dog.", "a dog", "animal")
    assert (oak.caption, oak.name) == ("A tall oak tree.", "a tall oak tree")
    assert (pine.stamp_caption, pine.caption, pine.name) == (None, "A drawing of a tree.", "a tree")
    assert (bird.caption, bird.name) == ("A drawing of a bird.", "a bird")
    assert clipart.catalogue(clipart_root) is found  # scanned once per root


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch, capsys):
    from flamingo.cli import main

    monkeypatch.setenv(clipart.ROOT_ENV, str(tmp_path))
    with pytest.raises(clipart.ClipartError, match="apt-get install openclipart-png tuxpaint-stamps-default"):
        clipart.catalogue()
    assert main(["data", "clipart", str(tmp_path / "out"), "--n", "2"]) == 2
    assert "apt-get install openclipart-png" in capsys.readouterr().err
    # The object tasks fail before the (slow) model load.
    assert main(["eval-offline", "--task", "objects-binding", "--model", str(tmp_path / "no-model")]) == 2
    assert "apt-get install openclipart-png" in capsys.readouterr().err


def _segment_categories(found, segment):
    """The categories a segment's true caption names."""
    return {name for name in found.categories if name in segment.true_caption().lower()}


def test_training_documents_never_show_held_out_categories(found):
    rng = np.random.default_rng(0)
    seen_tasks = set()
    for _ in range(40):
        task = clipart.TASKS[int(rng.integers(len(clipart.TASKS)))]
        seen_tasks.add(task)
        document = clipart.training_document(found, task, rng, 48)
        for segment in document:
            assert segment.image.size == (48, 48) and segment.image.mode == "RGB"
            assert _segment_categories(found, segment) <= set(found.names("train")), segment.true_caption()
            assert any(is_target for _, is_target in segment.text) or task in ("binding", "instance", "induction")
            for piece, _ in segment.text:
                for held_out in found.names("eval"):
                    assert held_out not in piece
    assert seen_tasks == set(clipart.TASKS)


def test_questions_and_scenes_say_what_is_shown(found):
    rng = np.random.default_rng(1)
    for _ in range(12):
        (segment,) = clipart.qa_document(found, rng, 48)
        (question, _), (answer, is_target) = segment.text
        category = next(iter(_segment_categories(found, segment)))
        coarse = found.categories[category].coarse
        assert is_target and answer.strip() in (coarse, clipart.with_article(category), "a dog"), (question, answer)
    for _ in range(6):
        (segment,) = clipart.scene_document(found, rng, 64)
        ((caption, _),) = segment.text
        assert len(_segment_categories(found, segment)) in (2, 3) and caption.endswith(".")


def test_binding_episodes_bind_words_to_held_out_categories(found):
    rng = np.random.default_rng(2)
    for ways in (2, 3):
        support, query, answer, candidates = clipart.binding_episode(found, rng, 48, "eval", ways=ways, shots=6)
        assert len(candidates) == ways and answer in candidates
        word_category = {}
        for segment in support:
            (category,) = _segment_categories(found, segment)
            assert category in found.names("eval")
            word = segment.text[1][0]
            assert word_category.setdefault(word, category) == category  # one category per word
        assert len(word_category) == ways
        (query_category,) = _segment_categories(found, query)
        assert word_category[answer] == query_category and query.text == [("This is a", False)]


def test_instance_episodes_bind_each_word_to_one_drawing_shown_anew(found, monkeypatch):
    shown = []  # the drawing behind each composed chunk, in order
    compose = clipart.compose
    monkeypatch.setattr(clipart, "compose", lambda objects, rng, size: shown.append(objects[0]) or compose(
        objects, rng, size))
    rng = np.random.default_rng(3)
    for ways in (2, 3):
        shown.clear()
        support, query, answer, candidates = clipart.instance_binding_episode(found, rng, 48, ways=ways, shots=6)
        assert len(candidates) == ways and answer in candidates and len(shown) == 7
        word_drawing = {}
        for segment, drawing in zip(support, shown):
            assert _segment_categories(found, segment) <= set(found.names("train"))
            assert word_drawing.setdefault(segment.text[1][0], drawing) is drawing  # one drawing per word
        assert len(set(map(id, word_drawing.values()))) == ways
        assert word_drawing[answer] is shown[-1] and query.text == [("This is a", False)]
        images = [np.asarray(s.image) for s in (*support, query)]
        assert len({image.tobytes() for image in images}) == len(images)  # composed anew each time


def test_the_grey_control_keeps_the_words_but_not_the_support_images(found):
    from flamingo.data.episodes import make_episode

    plain = make_episode("objects-binding", shots=4, seed=0, index=3, image_size=48)
    grey = make_episode("objects-binding-grey", shots=4, seed=0, index=3, image_size=48)
    assert [s.text for s in grey[0]] == [s.text for s in plain[0]] and grey[2:] == plain[2:]
    assert all(np.asarray(s.image).std() == 0 for s in grey[0])
    assert np.array_equal(np.asarray(grey[1].image), np.asarray(plain[1].image))


def test_coarse_vocabulary_recognises_the_category_named(found):
    vocabulary = clipart.coarse_vocabulary(found)
    assert clipart.names_coarse_category("A small brown dog.", "animal", vocabulary)
    assert clipart.names_coarse_category("two birds", "animal", vocabulary)
    assert clipart.names_coarse_category("Some fruit on a plate", "food", vocabulary)
    assert not clipart.names_coarse_category("A small brown dog.", "food", vocabulary)
    assert not clipart.names_coarse_category("a blue square", "animal", vocabulary)


def test_shards_hold_the_documents(found, tmp_path, capsys, monkeypatch):
    from flamingo.cli import main
    from flamingo.data.convert import validate_data

    assert main(["data", "clipart", str(tmp_path / "shards"), "--n", "7", "--shard-size", "4",
                 "--tasks", "caption,scene=2,binding"]) == 0
    assert "wrote 7 documents to 2 shard(s)" in capsys.readouterr().out
    report = validate_data(str(tmp_path / "shards"), "interleaved")
    assert report.stats.samples == 7 and report.bad == 0
    assert main(["data", "clipart", str(tmp_path / "bad"), "--tasks", "caption=x"]) == 2
    with pytest.raises(clipart.ClipartError, match="tasks"):
        clipart.write_shards(tmp_path / "other", 2, {"nope": 1.0})

    # Written shards are kept unless --overwrite; a folder of other files is never replaced;
    # an interrupted run leaves the earlier shards and no staging folder.
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "shards").iterdir())
    assert main(["data", "clipart", str(tmp_path / "shards"), "--n", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # (a context of its own: undoing the fixture's monkeypatch would also unset the clip-art root)
    with monkeypatch.context() as patch:
        patch.setattr(clipart, "training_document", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            clipart.write_shards(tmp_path / "shards", 3, overwrite=True)
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "shards").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
    assert main(["data", "clipart", str(tmp_path / "shards"), "--n", "3", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["clipart-000000.tar"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["data", "clipart", str(tmp_path / "mine"), "--n", "3", "--overwrite"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_pair_shards_caption_one_object_of_the_split(found, tmp_path, capsys):
    """`--kind pairs` writes jpg + txt pairs that the pairs pipeline reads; captions name the object
    and its coarse category; the eval split draws only held-out categories, the train split none."""
    import tarfile

    from flamingo.cli import main
    from flamingo.data.convert import validate_data

    for split in ("train", "eval"):
        out = tmp_path / split
        assert main(["data", "clipart", str(out), "--kind", "pairs", "--split", split, "--n", "12"]) == 0
        assert f"wrote 12 {split} pairs" in capsys.readouterr().out
        report = validate_data(str(out), "pairs")
        assert report.stats.samples == 12 and report.bad == 0
        with tarfile.open(out / "clipart-000000.tar") as tar:
            captions = [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
        for index, caption in enumerate(captions):  # sample i is drawn from Generator([seed, i])
            _, item = clipart.object_segment(found, np.random.default_rng([0, index]), 224, split)
            assert item.category.held_out == (split == "eval")
            assert caption == f"{item.caption} {clipart.with_article(item.category.coarse).capitalize()}."
    assert main(["data", "clipart", str(tmp_path / "x"), "--kind", "pairs", "--tasks", "caption"]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert main(["data", "clipart", str(tmp_path / "x"), "--split", "eval"]) == 2
    assert "--split eval" in capsys.readouterr().err


def test_clipart_source_labels_only_the_answers(found, lm_dir, clip_dir):
    from conftest import build_with_vision

    from flamingo.data.synthetic import ClipartSource

    model = build_with_vision(lm_dir("llama"), clip_dir)
    source = ClipartSource("objects", model.tokenizer, model.media_token_id, model.eoc_token_id,
                           model.vision_encoder.image_processor(), batch_size=3, tasks={"qa": 1.0}, image_size=32)
    batch = source.batch(0)
    assert torch.equal(batch.num_media, (batch.input_ids == model.media_token_id).sum(1))
    for row in range(3):
        labelled = batch.input_ids[row][batch.labels[row] != -100].tolist()
        text = model.tokenizer.decode([t for t in labelled if t != model.eoc_token_id])
        assert "Question" not in text and text.strip() and labelled[-1] == model.eoc_token_id
    assert torch.equal(source.batch(0).input_ids, batch.input_ids)


def test_a_training_run_mixes_clipart_and_procedural_data_from_a_saved_bridge(found, tmp_path, lm_dir, clip_dir):
    """The embedded recipe's shape (configs/embedded/train-clipart.yaml): init_from a saved
    bridge, clipart and procedural datasets in one objective."""
    from conftest import build_with_vision, randomize_gates
    from test_training import make_config, tiny_train_dict

    from flamingo.model.weights import save_pretrained
    from flamingo.training.trainer import Trainer

    start = build_with_vision(lm_dir("llama"), clip_dir)
    randomize_gates(start, 0.3)
    save_pretrained(start, tmp_path / "start")
    data = tiny_train_dict(lm_dir("llama"), clip_dir, tmp_path / "run", steps=1, init_from=str(tmp_path / "start"))
    data["datasets"] = [
        {"name": "objects", "kind": "clipart", "batch_size": 2, "image_size": 32, "tasks": {"caption": 1.0, "scene": 1.0}},
        {"name": "object-episodes", "kind": "clipart", "batch_size": 1, "image_size": 32, "tasks": {"binding": 1.0}},
        {"name": "episodes", "kind": "procedural", "batch_size": 1, "image_size": 32, "tasks": {"binding": 1.0}}]
    trainer = Trainer(make_config(data))
    assert all(float(block.attn_gate.detach()) == pytest.approx(0.3) for block in trainer.model.cross_attn_layers.values())
    result = trainer.fit()
    assert set(result.history[0].losses) == {"objects", "object-episodes", "episodes"}
    assert all(np.isfinite(v) for v in result.history[0].losses.values())


def test_object_tasks_and_captions_run_on_a_tiny_model(found, model):
    from flamingo.evaluation.procedural import caption_objects, evaluate

    results = evaluate(model, ["objects-binding", "objects-binding-3way", "objects-binding-grey", "objects-category"],
                       [0, 2], [0, 1], episodes=2)
    assert [(r.task, r.shots) for r in results][:2] == [("objects-binding", 0), ("objects-binding", 2)]
    assert all(len(r.accuracies) == 2 and 0 <= r.mean <= 1 for r in results)
    captions = caption_objects(model, count=3, max_new_tokens=3)
    assert len(captions.examples) == 3 and 0 <= captions.names_coarse <= 1
    assert (captions.cider is None) == (shutil.which("java") is None) and (captions.cider or 0) >= 0
    assert {e["category"] for e in captions.examples} == set(found.names("eval"))  # spread over categories


def test_the_feature_probe_finds_categories_that_differ_at_a_glance_separable(found):
    """scripts/clipart_feature_probe.py on the miniature packages, whose training categories differ
    in colour and shape (red ellipses, green rectangles): its probes find them apart (a broken probe
    sits at chance)."""
    import importlib.util

    from flamingo.model.config import VisionConfig
    from flamingo.model.vision import build_vision_encoder

    path = Path(__file__).resolve().parents[1] / "scripts" / "clipart_feature_probe.py"
    spec = importlib.util.spec_from_file_location("clipart_feature_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    encoder = build_vision_encoder(VisionConfig(kind="efficientnet_lite0"))
    accuracies = [probe.prototype_accuracy(encoder, found, "train", ways=2, shots=4, episodes=6, on_white=on_white)[0]
                  for on_white in (False, True)]
    [linear] = probe.linear_probe_accuracy(encoder, found, "train", folds=2)
    assert min(accuracies) >= 0.8 and linear >= 0.7, (accuracies, linear)
    # --pool each: one probe per grid cell; concat: one over all the cells
    cells = probe.prototype_accuracy(encoder, found, "train", ways=2, shots=4, episodes=6, on_white=True, pool="each")
    [concatenated] = probe.linear_probe_accuracy(encoder, found, "train", folds=2, pool="concat")
    assert len(cells) == 49 and max(cells) >= 0.8 and concatenated >= 0.7, (cells, concatenated)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e999", "0", "-1"])
def test_task_weights_must_be_finite_and_positive(tmp_path, weight):
    from bad_input import run_cli

    run_cli(["data", "clipart", str(tmp_path / "out"), "--n", "2", "--tasks", f"qa,caption={weight}"],
            expect=["tasks", "positive"], watch=[tmp_path])
    with pytest.raises(clipart.ClipartError, match="tasks"):
        clipart.write_shards(tmp_path / "out", 2, {"caption": float(weight)})


def test_the_feature_probe_reads_the_resamplers_visual_tokens(model):
    """`--stage resampler`: the probe's encoder interface gives the model's own visual tokens (vision
    encoder then Perceiver Resampler), one [latents, D] block per image."""
    import importlib.util

    import torch

    from conftest import solid_image

    path = Path(__file__).resolve().parents[1] / "scripts" / "clipart_feature_probe.py"
    spec = importlib.util.spec_from_file_location("clipart_feature_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    tokens = probe.ResamplerTokens(model)
    processor = tokens.image_processor()
    pixels = torch.stack([processor(solid_image(c)) for c in ("red", "blue")])
    with torch.inference_mode():
        got = tokens.encode(pixels)
        expected = model.encode_media(pixels[:, None, None])[:, 0]
        red_alone = model.encode_media(pixels[:1, None, None])[0, 0]
    assert got.shape == (2, model.config.perceiver.num_latents, expected.shape[-1])
    assert torch.equal(got, expected) and torch.allclose(got[0], red_alone, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_the_copy_control_queries_with_the_pixels_of_a_support_image_of_the_answer(found):
    from flamingo.data.episodes import make_episode

    plain = make_episode("objects-binding", shots=4, seed=0, index=3, image_size=48)
    copy = make_episode("objects-binding-copy", shots=4, seed=0, index=3, image_size=48)
    assert [s.text for s in copy[0]] == [s.text for s in plain[0]] and copy[2:] == plain[2:]
    same = [s for s in copy[0] if np.array_equal(np.asarray(s.image), np.asarray(copy[1].image))]
    assert same and all(s.text[1][0] == copy[2] for s in same)  # the answer's word was shown with it
    assert not np.array_equal(np.asarray(plain[1].image), np.asarray(copy[1].image))
