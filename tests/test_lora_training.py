"""LoRA in training runs (a `lora:` section): what trains, the adapters beside the weights in every
checkpoint and the final model, exact resume, and 2-process DDP/FSDP (torchrun, gloo) == 1 process."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import randomize_gates
from safetensors.torch import load_file
from test_training import make_config, tiny_train_dict
from test_training_processes import _torchrun

from flamingo.model.config import ConfigError
from flamingo.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LoraError

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = {"rank": 2, "alpha": 4, "dropout": 0.1, "targets": ["q_proj", "v_proj", "to_kv"]}
FROZEN_BRIDGE = {"perceiver": 0, "cross_attn": 0, "new_token_embeddings": 0, "new_token_logits": 0}


def lora_dict(lm_dir, clip_dir, run_dir, **top) -> dict:
    data = tiny_train_dict(lm_dir("llama"), clip_dir, run_dir, lora=LORA, **top)
    data["datasets"] = data["datasets"][:1]
    return data


def adapters(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / ADAPTER_WEIGHTS_FILE))


@pytest.mark.parametrize("bridge", ["frozen", "trained"])
def test_the_adapters_train_with_the_bridge_as_configured_and_every_model_directory_has_them(tmp_path, lm_dir,
                                                                                             clip_dir, bridge):
    from flamingo.model.weights import build_flamingo, load_pretrained
    from flamingo.training.trainer import train

    optim = {"lr": 1e-2, "lr_scale": FROZEN_BRIDGE if bridge == "frozen" else {}}
    data = lora_dict(lm_dir, clip_dir, tmp_path / "run", steps=2, optim=optim, checkpoint={"every": 1, "keep": 5})
    config = make_config(data)
    torch.manual_seed(config.seed)
    model = build_flamingo(config.model)
    randomize_gates(model)  # closed gates (a fresh bridge) pass no gradient to the cross-attention adapters
    bridge_ids = {id(p) for p in model.trainable_state_dict().values()}
    before = {name: (p.detach().clone(), id(p) in bridge_ids) for name, p in model.named_parameters()}
    result = train(config, model=model)
    lora_b = 0
    for name, param in result.model.named_parameters():
        if ".lora_B." in name:  # zero at the start: trained
            lora_b += 1
            assert bool(param.abs().sum() > 0), name
        elif ".lora_A." not in name:
            initial, in_bridge = before[name.replace(".base_layer.", ".")]
            # A frozen bridge and the frozen LM keep their values; a trained bridge's matrices move.
            assert torch.equal(param, initial) or (bridge == "trained" and in_bridge), name
            if bridge == "trained" and name.endswith("to_kv.base_layer.weight"):
                assert not torch.equal(param, initial), name
    assert lora_b == 2 * 4 + 2  # q_proj, v_proj in the four LM blocks, to_kv in the two cross-attention blocks

    for folder in [result.run_dir / "checkpoints" / "step-00000001", result.final_dir]:
        assert {p.name for p in folder.iterdir()} >= {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "bridge.safetensors"}
    first, last = (adapters(f) for f in (result.run_dir / "checkpoints" / "step-00000001", result.final_dir))
    assert any(not torch.equal(first[k], last[k]) for k in last)
    loaded = load_pretrained(result.final_dir, merge_adapters=False).eval()
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model.eval()(ids).logits)


def test_resume_is_bit_exact_with_adapters(tmp_path, lm_dir, clip_dir):
    from flamingo.training.trainer import train

    data = lora_dict(lm_dir, clip_dir, tmp_path / "resumed", steps=4, checkpoint={"every": 2, "keep": 2})
    reference = train(make_config({**data, "run_dir": str(tmp_path / "reference")}))
    train(make_config({**data, "steps": 2}))
    resumed = train(make_config(data), resume="auto")
    assert [r.step for r in resumed.history] == [3, 4]
    for name in ("bridge.safetensors", ADAPTER_WEIGHTS_FILE):
        got, expected = (load_file(str(r.final_dir / name)) for r in (resumed, reference))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), name

    with pytest.raises(ConfigError, match="holds LoRA adapters but the config has no lora section"):
        train(make_config({**data, "lora": None, "steps": 5}), resume="auto")
    with pytest.raises(LoraError, match="does not match the model's adapters"):
        train(make_config({**data, "lora": {**LORA, "rank": 3}, "steps": 5}), resume="auto")


def test_a_run_does_not_start_from_a_model_with_adapters(tmp_path, lm_dir, clip_dir):
    from flamingo.training.trainer import train

    first = train(make_config(lora_dict(lm_dir, clip_dir, tmp_path / "first", steps=1)))
    data = lora_dict(lm_dir, clip_dir, tmp_path / "second", steps=1, init_from=str(first.final_dir))
    with pytest.raises(ConfigError, match="holds LoRA adapters, which a run does not start from; .*merge-lora"):
        train(make_config(data))


def test_two_process_ddp_then_fsdp_resume_match_one_process(tmp_path, lm_dir, clip_dir):
    """2 ranks x batch B (torchrun, gloo) == 1 process x batch 2B with adapters: steps 1-2 under DDP,
    3-4 resumed under FSDP2 (the adapters sharded with their decoder blocks, gathered to be saved)."""
    from flamingo.training.trainer import train

    data = lora_dict(lm_dir, clip_dir, tmp_path / "multi", steps=4, checkpoint={"every": 2, "keep": 2})
    # No dropout: its masks are drawn per rank, not as one process draws them. No cross-attention target:
    # the gates open only after update 1, so its adapters' gradients in update 2 are tiny and Adam turns
    # their all-reduce rounding into differences of the size of the learning rate.
    data["lora"] = {**LORA, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(data))
    single = dict(data, run_dir=str(tmp_path / "single"),
                  datasets=[dict(d, batch_size=2 * d["batch_size"]) for d in data["datasets"]])
    reference = train(make_config(single))

    def close(run: str, folder: str, name: str) -> None:
        got = load_file(str(tmp_path / run / folder / name))
        expected = load_file(str(tmp_path / "single" / folder / name))
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=2e-5, msg=key)

    _torchrun(config_path, "steps=2", "distributed.strategy=ddp")
    close("multi", "checkpoints/step-00000002", ADAPTER_WEIGHTS_FILE)
    _torchrun(config_path, "steps=4", "distributed.strategy=fsdp", "--resume")
    for name in ("bridge.safetensors", ADAPTER_WEIGHTS_FILE):
        close("multi", "final", name)
    assert reference.step == 4


def test_wise_ft_interpolates_the_adapted_layers_by_scaling_the_adapters(tmp_path, lm_dir, clip_dir):
    from flamingo.model.lora import has_adapters
    from flamingo.model.weights import build_flamingo, save_pretrained
    from flamingo.training.trainer import train
    from flamingo.training.wise_ft import WiseFTError, wise_ft

    tuned = train(make_config(lora_dict(lm_dir, clip_dir, tmp_path / "tuned", steps=1))).final_dir
    torch.manual_seed(0)
    zero_shot = save_pretrained(build_flamingo(make_config(lora_dict(lm_dir, clip_dir, tmp_path)).model),
                                tmp_path / "zero-shot")
    half = wise_ft(zero_shot, tuned, 0.5, tmp_path / "half", force=True)
    for key, value in adapters(tuned).items():  # W0 + 0.5 * (alpha/r) B A: halfway along the adapted update
        assert torch.equal(adapters(half)[key], value * 0.5 if ".lora_B." in key else value), key
    assert not has_adapters(wise_ft(zero_shot, tuned, 0.0, tmp_path / "zero", force=True))
    with pytest.raises(WiseFTError, match="holds LoRA adapters: fold them into a plain model directory first"):
        wise_ft(tuned, tuned, 0.5, tmp_path / "other", force=True)


def test_a_finetuning_config_has_its_own_lora_section(tmp_path, lm_dir):
    from conftest import tiny_config

    from flamingo.model.lora import LoraSettings
    from flamingo.training.finetune import FinetuneConfig

    tiny_config(lm_dir("llama")).save(tmp_path / "config.yaml")
    config = FinetuneConfig(base=str(tmp_path), task="vqav2", data="data.yaml", lora={"rank": 4, "targets": ["q_proj"]})
    assert config.train_config(tmp_path).lora == LoraSettings(rank=4, targets=["q_proj"])
    with pytest.raises(ConfigError, match=r"train: expected training-config fields other than model, datasets, "
                                          r"init_from and lora .*\['lora'\]"):
        FinetuneConfig(base=str(tmp_path), task="vqav2", data="data.yaml", train={"lora": {"rank": 4}})
    with pytest.raises(LoraError, match="lora: unknown field"):
        FinetuneConfig(base=str(tmp_path), task="vqav2", data="data.yaml", lora={"rnak": 4}).train_config(tmp_path)
