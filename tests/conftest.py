"""Shared fixtures: a tokenizer trained locally and tiny random causal LMs of several families,
saved to disk and loaded back through the library's own loading code. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

CORPUS = [
    "a red circle on a blue background", "two green squares and a yellow triangle",
    "This is a dax. This is a wug.", "Question: what colour is the ball? Answer: red",
    "An image of a cat sitting on a mat.", "Output: a small purple star in the corner",
    "the quick brown fox jumps over the lazy dog", "Flamingo is a visual language model.",
] * 4


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_lm_config(family: str, vocab_size: int, layers: int = 4):
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=family == "qwen2",
                   **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=256, sliding_window=16, pad_token_id=0, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=256, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=256, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=32, pad_token_id=0, **common)
    if family == "mpt":
        return tf.MptConfig(d_model=32, n_heads=4, n_layers=layers, max_seq_len=256, expansion_ratio=2, **common)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "gpt2", "gpt_neox", "opt", "mpt"]
if not hasattr(transformers, "Gemma3TextConfig"):  # Gemma 3 arrived in transformers 4.50
    FAMILIES.remove("gemma3")


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """lm_dir(family) -> directory with a tiny random LM of that family and the local tokenizer."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(family: str = "llama") -> Path:
        if family not in made:
            torch.manual_seed(0)
            tokenizer = make_tokenizer()
            # Some families get a padded embedding table (as Pythia, Qwen and MPT have), so the
            # added tokens land on unused rows instead of after the table.
            padded = family in ("qwen2", "gpt_neox", "mpt")
            model = AutoModelForCausalLM.from_config(make_lm_config(family, len(tokenizer) + 8 * padded))
            path = tmp_path_factory.mktemp(f"lm-{family}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


REMOTE_CODE = """import os
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path(os.environ.get("FLAMINGO_TEST_CODE_RAN", os.devnull)).write_text("the model's own code ran")


class MarkedConfig(LlamaConfig):
    model_type = "marked"


class MarkedForCausalLM(LlamaForCausalLM):
    config_class = MarkedConfig
"""


@pytest.fixture(scope="session")
def remote_code_lm_dir(lm_dir, tmp_path_factory):
    """A tiny LM that comes with its own Python code (`auto_map`, as MPT's hub repo has): loading
    it with trust_remote_code runs that code, which writes the file named by the environment
    variable FLAMINGO_TEST_CODE_RAN."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("lm-remote-code")
    shutil.copytree(lm_dir("llama"), path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="marked", architectures=["MarkedForCausalLM"],
                  auto_map={"AutoConfig": "marked.MarkedConfig", "AutoModelForCausalLM": "marked.MarkedForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "marked.py").write_text(REMOTE_CODE)
    return path


FEATURE_DIM = 24


def tiny_config(lm_path, **overrides):
    """A small Flamingo config over the LM at `lm_path`; overrides are 'section.field' = value."""
    from flamingo import FlamingoConfig

    config = FlamingoConfig.from_dict({
        "vision": {"kind": "clip", "name_or_path": "unused-features-given"},
        "lm": {"name_or_path": str(lm_path)},
        "perceiver": {"depth": 2, "num_latents": 4, "heads": 2, "head_dim": 8, "max_frames": 4},
        "cross_attention": {"every": 2, "first_layer": 0, "heads": 2, "head_dim": 8},
    })
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(config, section) if section else config, name, value)
    config.validate()
    return config


def build_tiny(lm_path, seed: int = 0, **overrides):
    """A Flamingo fed with precomputed vision features of width FEATURE_DIM."""
    from flamingo.model.flamingo import Flamingo
    from flamingo.model.language_model import load_language_model

    config = tiny_config(lm_path, **overrides)
    lm, tokenizer = load_language_model(config.lm)
    torch.manual_seed(seed)
    return Flamingo(config, lm, tokenizer, vision_feature_dim=FEATURE_DIM)


def randomize_gates(model, value: float = 0.7) -> None:
    """Open the tanh gates (they start at 0) so the bridge actually changes the output."""
    with torch.no_grad():
        for block in model.cross_attn_layers.values():
            block.attn_gate.fill_(value)
            block.ffw_gate.fill_(-value)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP vision tower (32 px, patch 8, width FEATURE_DIM) saved to disk."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=FEATURE_DIM, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(path)
    return path


def build_with_vision(lm_path, vision_path, seed: int = 0, **overrides):
    """A Flamingo whose frozen vision encoder is the tiny CLIP at `vision_path`."""
    from flamingo.model.weights import build_flamingo

    config = tiny_config(lm_path, **overrides)
    config.vision.name_or_path = str(vision_path)
    torch.manual_seed(seed)
    return build_flamingo(config)


def solid_image(colour, size: int = 40):
    from PIL import Image

    return Image.new("RGB", (size, size), colour)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module, restored afterwards: tiny models run fastest and
    deterministically on one, and on a busy machine OpenMP's spinning threads make every op many
    times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(lm_dir, clip_dir):
    """A tiny Flamingo (llama LM, CLIP tower) with random non-zero gates, in eval mode."""
    m = build_with_vision(lm_dir("llama"), clip_dir)
    randomize_gates(m)
    return m.eval()


@pytest.fixture(scope="session")
def clipart_root(tmp_path_factory):
    """A miniature of the two clip-art packages (see flamingo.data.clipart): a few RGBA drawings
    in mapped folders (two training and two held-out categories per package layout), stamp
    captions, and folders that must be ignored (unmapped, excluded)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("share")

    def drawing(path: Path, colour, shape: str, seed: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGBA", (48 + 4 * seed, 40), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        box = (4 + seed, 4, 40 + seed, 36)
        (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=colour)
        image.save(path)

    art = root / "openclipart" / "png"
    stamps = root / "tuxpaint" / "stamps"
    for i in range(3):
        drawing(art / "animals" / "birds" / f"bird_{i}.png", (200, 40, 40, 255), "ellipse", i)  # bird
        drawing(art / "food" / "fruit" / f"fruit_{i}.png", (40, 200, 40, 255), "rectangle", i)  # fruit
        drawing(art / "animals" / "bugs" / f"bug_{i}.png", (40, 40, 200, 255), "ellipse", i)  # insect (held out)
        drawing(art / "food" / "vegetables" / f"veg_{i}.png", (220, 200, 30, 255), "rectangle", i)  # vegetable (held out)
    drawing(stamps / "animals" / "mammals" / "dogs" / "dog.png", (120, 70, 30, 255), "ellipse", 0)
    (stamps / "animals" / "mammals" / "dogs" / "dog.txt").write_text("A dog.\nfr.utf8=Un chien.\n")
    drawing(stamps / "plants" / "trees" / "oak.png", (20, 120, 20, 255), "rectangle", 1)  # tree (held out)
    (stamps / "plants" / "trees" / "oak.txt").write_text("A tall oak tree.\n")
    drawing(stamps / "plants" / "trees" / "pine.png", (20, 90, 60, 255), "ellipse", 2)
    (stamps / "plants" / "trees" / "pine.txt").write_text("Wow, look at this!\n")  # not a description
    drawing(art / "computer" / "icons" / "icon.png", (0, 0, 0, 255), "rectangle", 0)  # unmapped folder
    drawing(art / "people" / "bodypart" / "hand.png", (0, 0, 0, 255), "rectangle", 0)  # excluded folder
    return root
