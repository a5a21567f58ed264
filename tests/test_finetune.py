"""Fine-tuning (paper B.2.2) and WiSE-FT on a tiny model and tiny VQAv2/COCO files in the official
formats: only the chosen groups change, resume is exact, the fine-tuned model directory loads
and evaluates through `flamingo eval`, alpha 0 / 1 give the endpoints bit for bit, and
mismatched models are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import eval_fixtures as F
from bad_input import run_cli
from conftest import build_with_vision, randomize_gates
from flamingo.cli import main
from flamingo.model.config import ConfigError
from flamingo.model.weights import WEIGHTS_FILE, load_model, save_pretrained
from flamingo.training.finetune import finetune, load_finetune_config
from flamingo.training.task_source import TaskSource
from flamingo.training.wise_ft import WiseFTError, wise_ft

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, lm_dir, clip_dir):
    """A saved base model (tiny llama + CLIP, open gates) and a data config with VQAv2 and COCO."""
    root = tmp_path_factory.mktemp("finetune")
    model = build_with_vision(lm_dir("llama"), clip_dir)
    randomize_gates(model, 0.3)
    save_pretrained(model, root / "base")
    tasks = {"vqav2": (root / "vqa", F.write_vqa(root / "vqa", train=6, test=3)),
             "coco": (root / "coco", F.write_karpathy(root / "coco", train=6, test=3))}
    F.write_data_config(root / "data.yaml", tasks)
    return root


def write_config(root, name, **fields):
    """A fine-tuning YAML over the base model; `train` fields merged into a 3-step default."""
    train = {"steps": 3, "device": "cpu", "seed": 0, "optim": {"lr": 1e-2},
             "schedule": {"kind": "constant", "warmup_steps": 0},
             "checkpoint": {"every": 100, "keep": 5}, "logging": {"every": 1, "progress_bar": False},
             "run_dir": str(root / "runs" / name), **fields.pop("train", {})}
    config = {"base": str(root / "base"), "task": "vqav2", "data": "data.yaml", "batch_size": 2,
              **fields, "train": train}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def changed_groups(trained, base):
    """Trainable groups (perceiver, cross_attn.<i>, vision_encoder, lm_blocks.<i>, ...) with at
    least one tensor different from `base`; asserts every other parameter is bit-identical."""
    group_of = {}
    for key, param in trained.trainable_state_dict().items():
        parts = key.split(".")
        group_of[id(param)] = ".".join(parts[:2]) if parts[0] in ("cross_attn", "lm_blocks") else parts[0]
    base_params = dict(base.named_parameters())
    changed = set()
    for name, param in trained.named_parameters():
        same = torch.equal(param, base_params[name])
        if id(param) not in group_of:
            assert same, f"frozen parameter {name} changed"
        elif not same:
            changed.add(group_of[id(param)])
    return changed


def test_only_the_unfrozen_groups_change_and_the_model_directory_round_trips(setup):
    path = write_config(setup, "blocks", unfreeze={"vision": True, "lm_blocks": [1]})
    result, wise_dirs = finetune(load_finetune_config(path))
    assert result.step == 3 and wise_dirs == []
    base = load_model(setup / "base")
    assert changed_groups(result.model, base) == {"perceiver", "cross_attn.0", "cross_attn.2", "vision_encoder",
                                                   "lm_blocks.1", "new_token_embeddings", "new_token_logits"}
    saved = load_file(str(result.final_dir / WEIGHTS_FILE))
    assert any(k.startswith("vision_encoder.") for k in saved) and any(k.startswith("lm_blocks.1.") for k in saved)
    assert not any(k.startswith(("lm_blocks.0.", "lm_blocks.2.")) for k in saved)
    reloaded = load_model(result.final_dir)  # a normal model directory: rebuilt from the specs, strict load
    assert reloaded.config.unfreeze.lm_blocks == [1]
    trained = dict(result.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in reloaded.named_parameters())


@pytest.mark.parametrize("unfrozen", [False, True])
def test_vision_gradients_only_when_the_config_unfreezes_the_encoder(lm_dir, clip_dir, unfrozen):
    model = build_with_vision(lm_dir("llama"), clip_dir, **{"unfreeze.vision": unfrozen})
    model.vision_encoder.requires_grad_(True)  # e.g. a careless model.requires_grad_(True)
    model.encode_media(torch.randn(1, 1, 1, 3, 32, 32)).sum().backward()
    grads = [p.grad is not None for p in model.vision_encoder.parameters()]
    assert all(grads) if unfrozen else not any(grads)


def test_frozen_backbones_stay_bit_identical_by_default(setup):
    result, _ = finetune(load_finetune_config(write_config(setup, "bridge")))
    changed = changed_groups(result.model, load_model(setup / "base"))
    assert "vision_encoder" not in changed and not any(g.startswith("lm_blocks") for g in changed)
    assert "perceiver" in changed


def test_samples_follow_the_evaluation_prompt_with_loss_on_the_answer(setup):
    model = load_model(setup / "base")
    source = TaskSource("vqa", model.tokenizer, model.media_token_id, model.eoc_token_id,
                        model.vision_encoder.image_processor(), batch_size=2, task="vqav2",
                        data=str(setup / "data.yaml"))
    sample = source.sample(0)
    text = model.tokenizer.decode(sample.input_ids)
    target = model.tokenizer.decode(sample.labels[sample.labels != -100])
    assert text.startswith("<image>Question: what colour is the ")  # this tokenizer adds no BOS, as at inference
    assert text.endswith("<|endofchunk|>")
    assert target in {f" {c}<|endofchunk|>" for c in F.COLOURS}  # the majority answer, not "dark"
    assert text == text.split(" Answer:")[0] + " Answer:" + target
    assert sample.media.shape == (1, 1, 3, 32, 32)
    epochs = [[tuple(source.sample(i).input_ids.tolist()) for i in range(e * 6, e * 6 + 6)] for e in (0, 1)]
    assert len(set(epochs[0])) == 6 and set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]  # reshuffled


def test_resume_from_a_mid_run_checkpoint_is_exact(setup):
    full = load_finetune_config(write_config(setup, "full", unfreeze={"vision": True}, task="coco",
                                             train={"steps": 4, "checkpoint": {"every": 2, "keep": 5}}))
    done, _ = finetune(full)
    resumed_cfg = load_finetune_config(write_config(setup, "resumed", unfreeze={"vision": True}, task="coco",
                                                    train={"steps": 4, "checkpoint": {"every": 2, "keep": 5}}))
    again, _ = finetune(resumed_cfg, resume=done.run_dir / "checkpoints" / "step-00000002")
    assert again.step == 4 and len(again.history) == 2
    a, b = load_file(str(done.final_dir / WEIGHTS_FILE)), load_file(str(again.final_dir / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_finetune_higher_resolution_wise_ft_and_eval(setup, capsys):
    path = write_config(setup, "cli", unfreeze={"vision": True}, image_size=48)
    assert main(["finetune", str(path), "--print-config", "batch_size=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["batch_size"] == 3 and printed["unfreeze"] == {"vision": True, "lm_blocks": []}
    assert main(["finetune", str(path), "train.steps=2", "--wise-alpha", "0", "--wise-alpha", "1"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 2" in out and "wise-ft-0" in out and "wise-ft-1" in out
    final = setup / "runs" / "cli" / "final"
    model = load_model(final)
    assert model.config.vision.image_size == 48 and model.vision_encoder.image_processor().image_size == 48
    # alpha 0 / 1 reproduce the zero-shot and the fine-tuned model bit for bit, config included
    for alpha, endpoint in (("0", setup / "base"), ("1", final)):
        mixed_dir = setup / "runs" / "cli" / f"wise-ft-{alpha}"
        mixed = dict(load_model(mixed_dir).named_parameters())
        reference = dict(load_model(endpoint).named_parameters())
        assert mixed.keys() == reference.keys()
        assert all(torch.equal(mixed[k], reference[k]) for k in mixed), alpha
        assert yaml.safe_load((mixed_dir / "config.yaml").read_text())["vision"]["image_size"] == \
            yaml.safe_load((endpoint / "config.yaml").read_text())["vision"]["image_size"], alpha
        assert json.loads((mixed_dir / "provenance.json").read_text())["wise_ft"]["alpha"] == float(alpha)
    # the fine-tuned directory evaluates through the existing suite
    assert main(["eval", "--model", str(final), "--task", "vqav2", "--shots", "0,1", "--trials", "1",
                 "--support-size", "4", "--max-new-tokens", "2", "--batch-size", "2", "--no-progress",
                 "--data", str(setup / "data.yaml"), "--out", str(setup / "eval-cli")]) == 0
    results = json.loads((setup / "eval-cli" / "results.json").read_text())
    assert set(results["tasks"]["vqav2"]["shots"]) == {"0", "1"}


def test_wise_ft_interpolates_and_refuses_mismatched_models(setup, lm_dir, clip_dir, tmp_path):
    result, _ = finetune(load_finetune_config(write_config(setup, "wise", unfreeze={"lm_blocks": [2]})))
    half = load_file(str(wise_ft(setup / "base", result.final_dir, 0.5, tmp_path / "half") / WEIGHTS_FILE))
    zero_shot, tuned = load_file(str(setup / "base" / WEIGHTS_FILE)), load_file(str(result.final_dir / WEIGHTS_FILE))
    key = "perceiver.latents"
    assert not torch.equal(zero_shot[key], tuned[key])
    assert torch.allclose(half[key], (zero_shot[key] + tuned[key]) / 2, atol=1e-6)
    pretrained_block = dict(load_model(setup / "base").lm.model.layers[2].decoder_layer.named_parameters())
    name = "mlp.up_proj.weight"
    assert torch.allclose(half[f"lm_blocks.2.{name}"], (pretrained_block[name] + tuned[f"lm_blocks.2.{name}"]) / 2,
                          atol=1e-6)

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "provenance.json"):
        (broken / name).write_text((result.final_dir / name).read_text())
    save_file({k: (v[:-1] if k == "perceiver.latents" else v) for k, v in tuned.items()}, str(broken / WEIGHTS_FILE))
    with pytest.raises(WiseFTError, match="first differing tensor perceiver.latents"):
        wise_ft(setup / "base", broken, 0.5, tmp_path / "x")

    other = build_with_vision(lm_dir("llama"), clip_dir, **{"perceiver.depth": 3})
    save_pretrained(other, tmp_path / "deeper")
    with pytest.raises(WiseFTError, match=r"config field perceiver\.depth is 3 vs 2"):
        wise_ft(tmp_path / "deeper", result.final_dir, 0.5, tmp_path / "x")
    run_cli(["wise-ft", str(tmp_path / "deeper"), str(result.final_dir), "--alpha", "0.5", "--out",
             str(tmp_path / "x")], expect="config field perceiver.depth is 3 vs 2", watch=[setup, tmp_path])
    run_cli(["wise-ft", str(setup / "base"), str(result.final_dir), "--alpha", "2", "--out", str(tmp_path / "y")],
            expect="--alpha", watch=[setup, tmp_path])
    save_pretrained(build_with_vision(lm_dir("llama"), clip_dir, activation="gelu"), tmp_path / "gelu")
    with pytest.raises(WiseFTError, match="config field activation is 'gelu' vs 'sqrelu'"):
        wise_ft(tmp_path / "gelu", result.final_dir, 0.5, tmp_path / "x")


def test_models_record_their_provenance_and_wise_ft_refuses_another_base(setup, lm_dir, clip_dir, tmp_path,
                                                                         monkeypatch):
    """The fine-tuned model records its base (spec, hash of its weights); a WiSE-FT model records
    alpha and both endpoints. An unrelated zero-shot model of the same shape is refused unless
    --force; a model without provenance too; a different architecture is refused before any
    backbone is built; --out may not be (or hold, or lie in) an input, even with --overwrite."""
    from flamingo.model.weights import weights_digest
    from flamingo.training import wise_ft as wise_module

    result, _ = finetune(load_finetune_config(write_config(setup, "provenance")))
    final = result.final_dir
    base_digest = weights_digest(load_file(str(setup / "base" / WEIGHTS_FILE)))
    recorded = json.loads((final / "provenance.json").read_text())
    assert recorded["base"] == {"spec": str(setup / "base"), "directory": str(setup / "base"),
                                "weights_sha256": base_digest}
    mixed = wise_ft(setup / "base", final, 0.25, tmp_path / "mixed")
    wise = json.loads((mixed / "provenance.json").read_text())["wise_ft"]
    assert wise["alpha"] == 0.25 and wise["zero_shot"]["weights_sha256"] == base_digest
    assert wise["fine_tuned"]["weights_sha256"] == weights_digest(load_file(str(final / WEIGHTS_FILE)))
    assert wise["fine_tuned"]["base"] == recorded["base"] and wise["forced"] is False

    unrelated = tmp_path / "unrelated"
    save_pretrained(build_with_vision(lm_dir("llama"), clip_dir, seed=1), unrelated)  # same shapes, other weights
    run_cli(["wise-ft", str(unrelated), str(final), "--alpha", "0.5", "--out", str(tmp_path / "x")],
            expect=["is not the base model of", "--force"], watch=[setup, tmp_path])
    assert main(["wise-ft", str(unrelated), str(final), "--alpha", "0.5", "--out", str(tmp_path / "forced"),
                 "--force"]) == 0
    assert json.loads((tmp_path / "forced" / "provenance.json").read_text())["wise_ft"]["forced"] is True
    with pytest.raises(WiseFTError, match="does not record the base model"):
        wise_ft(setup / "base", unrelated, 0.5, tmp_path / "x")

    def no_build(*args, **kwargs):
        raise AssertionError("a backbone was built before the configs were compared")

    monkeypatch.setattr(wise_module, "build_flamingo", no_build)
    save_pretrained(build_with_vision(lm_dir("llama"), clip_dir, **{"cross_attention.every": 4}), tmp_path / "sparse")
    with pytest.raises(WiseFTError, match="config field cross_attention.every"):
        wise_ft(tmp_path / "sparse", final, 0.5, tmp_path / "x", force=True)
    for out in (final, final / "inside", final.parent):
        run_cli(["wise-ft", str(setup / "base"), str(final), "--alpha", "0.5", "--out", str(out), "--overwrite"],
                expect=["--out", "is read from there"], watch=[setup, tmp_path])


def test_non_finite_weights_are_refused_by_finetune_and_wise_ft(setup, tmp_path):
    """A base with a NaN weight is refused when it is loaded (it used to "train" and save a NaN
    model); wise-ft refuses an endpoint holding infinity instead of writing a broken model."""
    import shutil

    damaged = shutil.copytree(setup / "base", tmp_path / "nan-base")
    tensors = load_file(str(damaged / WEIGHTS_FILE))
    tensors["perceiver.latents"][0, 0] = float("nan")
    save_file(tensors, str(damaged / WEIGHTS_FILE))
    path = write_config(setup, "nan-base", base=str(damaged), train={"run_dir": str(tmp_path / "run")})
    run_cli(["finetune", str(path)], expect=["nan-base", "NaN or infinite weights", "perceiver.latents"],
            watch=[setup, tmp_path])

    tensors["perceiver.latents"][0, 0] = float("inf")
    save_file(tensors, str(damaged / WEIGHTS_FILE))
    run_cli(["wise-ft", str(setup / "base"), str(damaged), "--alpha", "0.5", "--out", str(tmp_path / "mixed"),
             "--force"], expect=["nan-base", "NaN or infinite weights", "perceiver.latents"], watch=[setup, tmp_path])


def test_unwritable_outputs_are_one_line_errors_and_leave_nothing_half_written(setup, tmp_path, monkeypatch):
    """finetune into a run_dir that is a file or read-only: refused before the model is built;
    a full disk while saving the model (finetune, wise-ft): an error naming the folder, nothing
    half-written."""
    import errno
    import os

    from safetensors import SafetensorError

    from flamingo.model import weights
    from flamingo.training import trainer

    (tmp_path / "a-file").write_text("")
    path = write_config(setup, "unwritable")
    monkeypatch.setattr(weights, "build_flamingo", lambda *a, **k: pytest.fail("the model was built"))
    run_cli(["finetune", str(path), f"train.run_dir={tmp_path / 'a-file'}"], expect=["run_dir", "not a folder"],
            watch=[setup, tmp_path])
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p) != tmp_path)
    run_cli(["finetune", str(path), f"train.run_dir={tmp_path / 'run'}"], expect=["run_dir", "read-only"],
            watch=[setup, tmp_path])
    monkeypatch.undo()

    def full(*args, **kwargs):  # what safetensors raises on a full disk (not an OSError)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(trainer.Trainer, "save_checkpoint", lambda self: None)  # only the final model is written
    monkeypatch.setattr("flamingo.model.tensor_files.save_file", full)
    run_cli(["finetune", str(path), f"train.run_dir={tmp_path / 'run'}", "train.steps=1"],
            expect=[str(tmp_path / "run" / "final"), os.strerror(errno.ENOSPC)], watch=[setup, tmp_path],
            allowed=[tmp_path / "run"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "train_config.yaml"]
    run_cli(["wise-ft", str(setup / "base"), str(setup / "base"), "--alpha", "0.5", "--out", str(tmp_path / "mixed"),
             "--force"], expect=["mixed", os.strerror(errno.ENOSPC)], watch=[setup, tmp_path])


@pytest.mark.parametrize("fields, message", [
    ({"task": "nope"}, "unknown task 'nope'"),
    ({"task": "rareact"}, "zero-shot only"),
    ({"unfreeze": {"lm_blocks": [9]}}, "unfreeze.lm_blocks: expected block indices < 4"),
    ({"image_size": 36}, "multiple of the clip patch size 8"),
    ({"train": {"datasets": []}}, "other than model, datasets, init_from and lora"),
    ({"wise_alpha": [1.5]}, "wise_alpha"),
    ({"image_size": 1000000}, "image_size: expected null or an integer in [1, 4096]"),
])
def test_bad_fine_tuning_configs_are_one_line_errors(setup, fields, message):
    path = write_config(setup, "bad", **fields)
    run_cli(["finetune", str(path)], expect=message, watch=[setup])


def test_lm_blocks_in_reduced_precision_need_bf16_autocast(setup):
    config = load_finetune_config(write_config(setup, "bf16", unfreeze={"lm_blocks": [0]},
                                               train={"frozen_dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match="train.precision: bf16"):
        config.train_config(setup / "base")


def test_shipped_fine_tuning_configs_parse():
    from pathlib import Path

    paths = sorted((Path(__file__).parent.parent / "configs" / "finetune").glob("*.yaml"))
    assert {p.name for p in paths} >= {"tiny-vqa.yaml", "tiny-vqa-lora.yaml", "vqav2.yaml"}
    for path in paths:
        config = load_finetune_config(path)
        assert config.train["run_dir"] == f"runs/{path.stem}"
        if path.name == "tiny-shapes-shift.yaml":  # the robustness guide's WiSE-FT endpoint: the bridge alone
            assert config.task == "shapes" and not config.unfreeze.vision and not config.lora
            continue
        assert config.task == "vqav2"
        # the paper's recipe (the encoder unfrozen at a higher resolution), or LoRA adapters alone
        assert (config.unfreeze.vision and config.image_size) or (config.lora and not config.unfreeze.vision)


def test_two_process_fine_tuning_matches_one_process_ddp_then_fsdp(setup):
    """2 ranks x batch 1 (torchrun, gloo) == 1 process x batch 2 with the vision encoder and an LM
    block unfrozen: steps 1-2 under DDP, step 3 resumed from its checkpoint under FSDP."""
    import subprocess
    import sys

    from bad_input import checkout_env
    from test_training_processes import HANG_S

    unfreeze = {"vision": True, "lm_blocks": [1]}
    # Adam turns gradients that are zero up to rounding (attention key biases) into updates of
    # +-lr at the first step, whatever their sign: a small lr keeps that below the tolerance.
    train = {"optim": {"lr": 1e-3}, "checkpoint": {"every": 2, "keep": 2}}
    single = write_config(setup, "single", unfreeze=unfreeze, batch_size=2, train=train)
    reference, _ = finetune(load_finetune_config(single))
    multi = write_config(setup, "multi", unfreeze=unfreeze, batch_size=1, train=train)
    env = checkout_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for overrides in (["train.steps=2", "train.distributed.strategy=ddp"],
                      ["train.distributed.strategy=fsdp", "--resume"]):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "flamingo.training", "finetune", str(multi), *overrides],
                              env=env, capture_output=True, text=True, timeout=HANG_S)
        assert done.returncode == 0, done.stderr[-5000:]
    got = load_file(str(setup / "runs" / "multi" / "final" / WEIGHTS_FILE))
    expected = load_file(str(reference.final_dir / WEIGHTS_FILE))
    assert got.keys() == expected.keys() and any(k.startswith("vision_encoder.") for k in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=5e-5, msg=name)
