"""Hub-ready model directories: the model card every writer adds (its Hub metadata, backbones,
licenses, training record, evaluation tables), `push_to_hub` / `flamingo push` against a mocked
HfApi (no network), and a model laid out as a Hub snapshot in the huggingface_hub cache loading
offline at a pinned revision."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from conftest import build_with_vision, randomize_gates, tiny_config
from flamingo.cli import main
from flamingo.model.card import (
    CARD_FILE,
    EVAL_END,
    EVAL_START,
    NO_EVAL,
    card_metadata,
    record_eval,
    render_card,
    with_eval_run,
    with_model_id,
)
from flamingo.model.config import FlamingoConfig
from flamingo.model.hub import HubError, push_to_hub
from flamingo.model.weights import WEIGHTS_FILE, load_model, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_card(source: Path, target: Path, license_id: str) -> Path:
    """A copy of a backbone directory whose own model card declares `license_id`."""
    shutil.copytree(source, target)
    (target / CARD_FILE).write_text(f"---\nlicense: {license_id}\n---\n# a backbone\n")
    return target


@pytest.fixture(scope="module")
def saved(lm_dir, clip_dir, tmp_path_factory):
    """A tiny model saved with save_pretrained over backbones whose cards both say MIT."""
    root = tmp_path_factory.mktemp("hub")
    lm, vision = with_card(lm_dir("llama"), root / "lm", "mit"), with_card(clip_dir, root / "clip", "MIT")
    model = build_with_vision(lm, vision)
    randomize_gates(model)
    return save_pretrained(model, root / "model")


def test_save_pretrained_writes_a_card_with_the_hubs_metadata(saved):
    card = ModelCard.load(saved / CARD_FILE)
    assert card.data.library_name == "flamingo" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "mit"  # both backbones' own cards say MIT (one spelt "MIT")
    assert card.data.base_model is None  # local backbones: no Hub ids to name
    assert "| language model |" in card.text and "| vision encoder |" in card.text
    assert "No training record" in card.text and NO_EVAL in card.text


def test_base_models_are_the_backbones_hub_ids_and_a_license_only_when_all_agree(tmp_path, monkeypatch):
    """Hub ids become base_model; a license read from a backbone's card in the local Hub cache
    (never fetched) counts; disagreeing or unknown licenses leave the field out."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    make_snapshot(cache, "acme/lm", {"main": {CARD_FILE: b"---\nlicense: apache-2.0\n---\n"}})
    make_snapshot(cache, "acme/clip", {"main": {CARD_FILE: b"---\nlicense: mit\n---\n"}})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    config = FlamingoConfig.from_dict({"lm": {"name_or_path": "acme/lm"},
                                       "vision": {"kind": "clip", "name_or_path": "acme/clip"}})
    meta = card_metadata(config)
    assert meta["base_model"] == ["acme/lm", "acme/clip"] and "license" not in meta  # apache-2.0 vs mit
    config.vision.name_or_path = "acme/lm"
    assert card_metadata(config)["license"] == "apache-2.0"
    config.vision.name_or_path = "acme/uncached"
    assert "license" not in card_metadata(config)  # unknown: not guessed
    embedded = card_metadata(FlamingoConfig.load(ROOT / "src/flamingo/assets/embedded/config.yaml"))
    assert embedded["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_the_card_regenerates_its_sections_and_keeps_what_a_user_wrote(tmp_path):
    config = tiny_config("some/lm")
    text = render_card(config) + "\n## Notes\nmine\n"
    once = with_eval_run(text, "runs/a", "| task | metric |\n|---|---|\n| coco | CIDEr 10 |\n")
    twice = with_eval_run(with_eval_run(once, "runs/b", "| vqav2 | 20 |"), "runs/a", "| coco | CIDEr 30 |")
    section = twice[twice.index(EVAL_START):twice.index(EVAL_END)]
    assert "CIDEr 30" in section and "CIDEr 10" not in section and "| vqav2 | 20 |" in section
    assert section.index("runs/a") < section.index("runs/b") and NO_EVAL not in section
    assert twice.endswith("## Notes\nmine\n")
    named = with_model_id(twice, "acme/flamingo-tiny")
    assert 'load_model("acme/flamingo-tiny")' in named and "--model acme/flamingo-tiny" in named
    assert named.replace("acme/flamingo-tiny", "path/to/this/directory") == twice
    assert with_eval_run("# a card written by hand\n", "runs/a", "| x |") is None
    (tmp_path / CARD_FILE).write_text("# a card written by hand\n")
    assert record_eval(tmp_path, "runs/a", "| x |") is None
    assert (tmp_path / CARD_FILE).read_text() == "# a card written by hand\n"


def test_a_trained_model_card_says_how_it_was_trained():
    provenance = {"base": {"spec": "embedded", "weights_sha256": "0123456789abcdef" * 4},
                  "training": {"steps": 7, "seed": 3, "precision": "fp32", "accumulation": 2, "processes": 2,
                               "datasets": [{"name": "shapes", "kind": "synthetic_shapes", "weight": 1.0}],
                               "optim": {"lr": 0.001, "weight_decay": 0.1},
                               "schedule": {"kind": "constant", "warmup_steps": 0}}}
    text = render_card(tiny_config("some/lm"), provenance)
    assert "started from `embedded` (weights sha256 `0123456789abcdef`)" in text
    assert "7 optimizer steps (2 process(es), accumulation 2, seed 3" in text
    assert "on shapes (synthetic_shapes, weight 1.0)" in text and "learning rate 0.001" in text


def test_push_to_hub_commits_the_directory_with_the_card_naming_the_repository(saved):
    (saved / ".cache").mkdir(exist_ok=True)
    (saved / ".cache" / "junk").write_text("not uploaded")
    api = mock.MagicMock()
    api.create_commit.return_value.commit_url = "https://huggingface.co/acme/tiny/commit/abc"
    assert push_to_hub(saved, "acme/tiny", revision="v1", api=api) == "https://huggingface.co/acme/tiny/commit/abc"
    api.create_repo.assert_called_once_with("acme/tiny", repo_type="model", private=None, exist_ok=True)
    api.create_branch.assert_called_once_with("acme/tiny", branch="v1", repo_type="model", exist_ok=True)
    (repo, operations), kwargs = api.create_commit.call_args
    assert repo == "acme/tiny" and kwargs["revision"] == "v1"
    uploaded = {op.path_in_repo: op for op in operations}
    assert sorted(uploaded) == [CARD_FILE, WEIGHTS_FILE, "config.yaml"]
    card = uploaded[CARD_FILE].path_or_fileobj.decode()
    assert 'load_model("acme/tiny")' in card and "license: mit" in card
    assert "acme/tiny" not in (saved / CARD_FILE).read_text()  # the local card is left as it was


def test_flamingo_push_uses_the_hub_api_and_reports_failures_in_one_line(saved, tmp_path, capsys):
    from huggingface_hub.errors import HfHubHTTPError

    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.create_commit.return_value.commit_url = "https://hub/acme/tiny/commit/1"
        assert main(["push", str(saved), "acme/tiny", "--private"]) == 0
        assert api_class.return_value.create_repo.call_args.kwargs["private"] is True
        assert capsys.readouterr().out == f"pushed {saved} -> https://hub/acme/tiny/commit/1\n"
        api_class.return_value.create_commit.side_effect = HfHubHTTPError("401 Unauthorized: no token\nmore",
                                                                             response=mock.MagicMock())
        assert main(["push", str(saved), "acme/tiny"]) == 2
        assert capsys.readouterr().err == ("flamingo push: error: pushing "
                                           f"{saved} to acme/tiny failed: 401 Unauthorized: no token\n")
    for args, message in [([str(tmp_path), "acme/tiny"], "is not a saved Flamingo model directory"),
                          ([str(saved), "not a repo"], "expected 'org/name'")]:
        with pytest.raises(HubError, match=message):
            push_to_hub(*args, api=mock.MagicMock())


def make_snapshot(cache: Path, repo_id: str, revisions: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """`repo_id` in huggingface_hub's cache layout under `cache`: blobs named by content hash,
    snapshots/<commit>/ linking to them, refs/<name> holding the commit. Returns name -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commits = {}
    for name, files in revisions.items():
        commit = hashlib.sha1(name.encode() + b"".join(sorted(files.values()))).hexdigest()
        for filename, content in files.items():
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(content)
            link = repo / "snapshots" / commit / filename
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
        commits[name] = commit
    return commits


def test_a_hub_snapshot_in_the_cache_loads_offline_at_each_pinned_revision(saved, tmp_path):
    """main, the tag v2 (other weights) and v2's commit hash load from the cache layout with
    HF_HUB_OFFLINE=1 and HF_HOME/HF_HUB_CACHE in a temporary folder; an uncached revision and a
    uncached revision is a one-line error."""
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    tensors = load_file(str(saved / WEIGHTS_FILE))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in tensors.items()}, str(other / WEIGHTS_FILE))
    files = lambda d: {n: (d / n).read_bytes() for n in ("config.yaml", WEIGHTS_FILE, CARD_FILE)}  # noqa: E731
    commits = make_snapshot(tmp_path / "home" / "hub", "acme/tiny", {"main": files(saved), "v2": files(other)})
    code = f"""
import json
from flamingo import load_model
from flamingo.errors import UserError
out = {{}}
for revision in (None, "v2", {commits["v2"]!r}):
    out[str(revision)] = float(load_model("acme/tiny", revision=revision).perceiver.latents.sum())
try:
    load_model("acme/tiny", revision="v3")
except UserError as err:
    out["v3"] = str(err)
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(tmp_path / "home" / "hub"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    main_sum, v2_sum = float(tensors["perceiver.latents"].sum()), float((tensors["perceiver.latents"] + 1).sum())
    assert out["None"] == pytest.approx(main_sum, abs=1e-4)
    assert out["v2"] == pytest.approx(v2_sum, abs=1e-4) and out[commits["v2"]] == out["v2"]
    assert "could not be fetched from the hub" in out["v3"]


def test_a_revision_for_anything_but_a_hub_id_is_refused(saved, capsys):
    from flamingo.errors import UserError

    with pytest.raises(UserError, match="only a hub id"):
        load_model(saved, revision="v2")
    assert main(["generate", "--model", "embedded", "--revision", "v2", "--prompt", "x"]) == 2
    assert "only a hub id (org/name) has revisions" in capsys.readouterr().err
