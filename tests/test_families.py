"""Other members of the Flamingo family as configuration of our model, proven against transformers'
own classes on tiny random models built here (offline, fp32): Llama 3.2 Vision
(`MllamaForConditionalGeneration`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)

from flamingo import load_model
from flamingo.errors import UserError
from flamingo.model.families import mllama
from flamingo.model.weights import CheckpointError

VOCAB = 120  # the text model's vocab_size; <|image|> is the first of the 8 extra rows
TOLERANCE = 1e-5


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer "t0 ... t117" plus Llama 3.2 Vision's special tokens, <|image|> = VOCAB."""
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB - 2)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t1", eos_token="t2", pad_token="t3")
    tokenizer.add_tokens(["<|eot_id|>", "<|python_tag|>", "<|image|>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<|image|>") == VOCAB
    return tokenizer


def tiny_mllama_config() -> MllamaConfig:
    return MllamaConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, num_hidden_layers=6, cross_attention_layers=[1, 4],
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        vision_config=dict(hidden_size=16, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=32, vision_output_dim=48, image_size=28, patch_size=14,
                           intermediate_layers_indices=[0, 1]),
        image_token_index=VOCAB)


@pytest.fixture(scope="module")
def family():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 28, "width": 28},
                                                                       max_image_tiles=4), tokenizer=tokenizer)
    reference = MllamaForConditionalGeneration(tiny_mllama_config()).eval()
    with torch.no_grad():  # the gates start at 0 (no image would matter) and the norms at 1: move them
        for name, param in reference.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.8)
            elif "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model = mllama.build_model(reference.config, tiny_tokenizer())
    mllama.load_state_dict(model, reference.state_dict())
    return processor, reference, model.eval()


def image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def run_ours(model, inputs) -> torch.Tensor:
    ids = inputs["input_ids"]
    if "pixel_values" not in inputs:
        return mllama.forward(model, ids, attention_mask=inputs["attention_mask"]).logits
    tokens, key_mask = mllama.encode_images(model, inputs["pixel_values"], inputs["aspect_ratio_ids"],
                                            inputs["aspect_ratio_mask"])
    return mllama.forward(model, ids, visual_tokens=tokens, key_mask=key_mask,
                          num_media=(ids == VOCAB).sum(1), attention_mask=inputs["attention_mask"]).logits


PROMPTS = {
    "no image": (["t5 t6 t7 t8"], None),
    "one image": (["<|image|> t5 t6 t7"], [[image(1, 40, 30)]]),
    "three images, text first, two consecutive": (["t9 t10 <|image|> t5 t6 <|image|><|image|> t7 t8"],
                                                   [[image(2, 30, 30), image(3, 20, 70), image(4, 90, 25)]]),
    "multi-tile images": (["<|image|> t5 <|image|> t6"], [[image(5, 100, 28), image(6, 56, 56)]]),
    "a batch with 2, 0 and 1 images": (["<|image|> t5 <|image|> t6 t7", "t8 t9 t10", "t11 <|image|> t12"],
                                       [[image(7, 30, 60), image(8, 60, 30)], [], [image(9, 28, 28)]]),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_mllama_logits_equal_the_reference(family, name):
    processor, reference, model = family
    text, images = PROMPTS[name]
    images = None if images is None else images
    inputs = processor(text=text, images=images, padding=True, return_tensors="pt")
    if name == "multi-tile images":
        assert int(inputs["aspect_ratio_mask"].sum(-1).max()) > 1
    with torch.no_grad():
        theirs = reference(**inputs).logits
        ours = run_ours(model, inputs)
    real = inputs["attention_mask"].bool()
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs()[real].max()) <= TOLERANCE
    if images is not None:  # the images matter: without them the logits differ
        with torch.no_grad():
            blind = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        assert float((blind - theirs).abs()[real].max()) > 1e-2


GENERATION_PROMPTS = ["t5 t6 t7", "<|image|> t5 t6", "t9 <|image|> t5 <|image|><|image|> t6"]
GENERATION_IMAGES = [None, [[image(10, 60, 30)]], [[image(11, 28, 28), image(12, 30, 90), image(13, 50, 50)]]]


@pytest.mark.parametrize("index", range(len(GENERATION_PROMPTS)))
def test_mllama_cached_decoding_equals_the_uncached_forward(family, index):
    processor, _, model = family
    inputs = processor(text=GENERATION_PROMPTS[index], images=GENERATION_IMAGES[index], return_tensors="pt")
    ids = inputs["input_ids"]
    media = {}
    if "pixel_values" in inputs:
        tokens, key_mask = mllama.encode_images(model, inputs["pixel_values"], inputs["aspect_ratio_ids"],
                                                inputs["aspect_ratio_mask"])
        media = dict(visual_tokens=tokens, key_mask=key_mask, num_media=(ids == VOCAB).sum(1))
    new, cached = mllama.greedy_generate(model, ids, max_new_tokens=6, **media)
    with torch.no_grad():
        full = mllama.forward(model, torch.cat([ids, new], 1), **media).logits
    assert float((cached - full[:, ids.shape[1] - 1:-1]).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("index", range(len(GENERATION_PROMPTS)))
def test_mllama_greedy_generation_equals_the_reference_generate(family, index):
    processor, reference, model = family
    inputs = processor(text=GENERATION_PROMPTS[index], images=GENERATION_IMAGES[index], return_tensors="pt")
    ids = inputs["input_ids"]
    with torch.no_grad():
        theirs = reference.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    media = {}
    if "pixel_values" in inputs:
        tokens, key_mask = mllama.encode_images(model, inputs["pixel_values"], inputs["aspect_ratio_ids"],
                                                inputs["aspect_ratio_mask"])
        media = dict(visual_tokens=tokens, key_mask=key_mask)
    ours, _ = mllama.greedy_generate(model, ids, max_new_tokens=20, **media)
    assert theirs.shape == (1, 20)
    assert ours.tolist() == theirs.tolist()


def test_mllama_checkpoint_with_a_missing_or_an_extra_tensor_is_refused(family):
    _, reference, _ = family
    state = dict(reference.state_dict())
    model = mllama.build_model(reference.config, tiny_tokenizer())
    missing = {k: v for k, v in state.items() if k != "model.language_model.layers.4.cross_attn.k_norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors: lm\.model\.layers\.3\.cross_attn\.attn\.k_norm"):
        mllama.load_state_dict(model, missing)
    extra = dict(state, **{"model.language_model.layers.4.cross_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"model\.language_model\.layers\.4\.cross_attn\.extra\.weight"):
        mllama.load_state_dict(model, extra)
    lone_key = {k: v for k, v in state.items() if k != "model.language_model.layers.1.cross_attn.v_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors: lm\.model\.layers\.1\.cross_attn\.attn\.to_kv"):
        mllama.load_state_dict(model, lone_key)


def save_checkpoint(reference, processor, directory) -> None:
    """A transformers checkpoint directory as `save_pretrained` writes it, in several shards."""
    reference.save_pretrained(directory, max_shard_size="40KB")
    processor.save_pretrained(directory)


def rewrite_shards(directory, change) -> None:
    """Apply `change` to the {name: tensor} dict of every shard and keep the index in step."""
    import json

    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = change(shard, load_file(str(directory / shard)))
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
        index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))


def test_a_saved_mllama_checkpoint_loads_strictly_and_computes_the_same(family, tmp_path):
    processor, reference, _ = family
    save_checkpoint(reference, processor, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2  # sharded
    model = load_model(tmp_path)
    inputs = processor(text=["<|image|> t5 t6"], images=[[image(20, 60, 30)]], return_tensors="pt")
    with torch.no_grad():
        assert float((run_ours(model, inputs) - reference(**inputs).logits).abs().max()) <= TOLERANCE


def test_a_saved_mllama_checkpoint_with_a_missing_or_an_extra_tensor_is_refused(family, tmp_path):
    processor, reference, _ = family
    gone = "language_model.model.layers.4.mlp.up_proj.weight"  # the layout save_pretrained writes
    save_checkpoint(reference, processor, tmp_path / "missing")
    rewrite_shards(tmp_path / "missing", lambda shard, tensors: {k: v for k, v in tensors.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"missing tensors: lm\.model\.layers\.3\.cross_attn\.ffw\.fc_up"):
        load_model(tmp_path / "missing")
    save_checkpoint(reference, processor, tmp_path / "extra")
    rewrite_shards(tmp_path / "extra", lambda shard, tensors: dict(tensors, **{f"model.extra_{shard}": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"no place in the model: model\.extra_model-00001"):
        load_model(tmp_path / "extra")
    (tmp_path / "extra" / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(CheckpointError, match="model_type 'llava' is not a model family"):
        load_model(tmp_path / "extra")


# The published config.json of meta-llama/Llama-3.2-11B-Vision and -90B-Vision (the fields that size
# the model; rope_scaling as transformers 5 reads it).
_VISION = dict(model_type="mllama_vision_model", attention_heads=16, hidden_act="gelu", hidden_size=1280,
               image_size=560, intermediate_layers_indices=[3, 7, 15, 23, 30], intermediate_size=5120,
               max_num_tiles=4, norm_eps=1e-05, num_channels=3, num_global_layers=8, num_hidden_layers=32,
               patch_size=14, vision_output_dim=7680,
               supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
_TEXT_11B = dict(model_type="mllama_text_model", bos_token_id=128000, eos_token_id=128001, pad_token_id=128004,
                 cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], dropout=0, hidden_act="silu",
                 hidden_size=4096, intermediate_size=14336, max_position_embeddings=131072,
                 num_attention_heads=32, num_hidden_layers=40, num_key_value_heads=8, rms_norm_eps=1e-05,
                 rope_scaling=dict(factor=8.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                   original_max_position_embeddings=8192, rope_type="llama3"),
                 rope_theta=500000.0, tie_word_embeddings=False, vocab_size=128256)
_TEXT_90B = dict(_TEXT_11B, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38, 43, 48, 53, 58, 63, 68, 73, 78,
                                                    83, 88, 93, 98],
                 hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=100)
PUBLISHED = {  # name: (config.json, parameters of its safetensors on the hub: 10.7B and 88.6B shown there)
    "Llama-3.2-11B-Vision": (dict(architectures=["MllamaForConditionalGeneration"], model_type="mllama",
                                  image_token_index=128256, text_config=_TEXT_11B, vision_config=_VISION),
                             10_670_220_835),
    "Llama-3.2-90B-Vision": (dict(architectures=["MllamaForConditionalGeneration"], model_type="mllama",
                                  image_token_index=128256, text_config=_TEXT_90B, vision_config=_VISION),
                             88_593_355_323),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_flamingo_params_on_the_published_mllama_configs(name, tmp_path, capsys):
    import json

    from flamingo.cli import main

    config, published = PUBLISHED[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    main(["params", str(tmp_path)])
    report = capsys.readouterr().out
    total = int(report.splitlines()[-1].split()[1].replace(",", ""))
    assert total == published
    with torch.device("meta"):  # transformers' own class from the same file counts the same
        reference = MllamaForConditionalGeneration(MllamaConfig.from_pretrained(str(tmp_path)))
    assert total == sum(p.numel() for p in reference.parameters())
    assert "gated xattn-dense layers" in report and "linear projector" in report


def test_generate_text_on_a_loaded_mllama_checkpoint_builds_the_processors_inputs_and_equals_generate(
        family, tmp_path):
    from flamingo.inference.api import generate_text

    processor, reference, _ = family
    save_checkpoint(reference, processor, tmp_path)
    model = load_model(tmp_path)
    picture = image(30, 70, 40)
    items = ["t9 t4", picture, "t5 t6"]
    ours = mllama.prompt_inputs(model, items)
    theirs = processor(text=["t9 t4<|image|>t5 t6"], images=[[picture]], return_tensors="pt")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    with torch.no_grad():
        expected = reference.generate(**theirs, max_new_tokens=12, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    stops = (2, processor.tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    cut = [i for i, t in enumerate(expected.tolist()) if t in stops]
    expected_text = processor.tokenizer.decode(expected[:cut[0]] if cut else expected)  # every token before the stop
    assert generate_text(model, items, max_new_tokens=12) == expected_text
    leading = mllama.prompt_inputs(model, [picture, "t5"])["input_ids"][0].tolist()
    assert leading[:2] == [VOCAB, processor.tokenizer.bos_token_id]  # BOS after leading images, as theirs


def test_few_shot_context_and_rank_on_a_loaded_mllama_checkpoint_equal_the_reference(family, tmp_path):
    from flamingo.inference.api import FewShotContext, generate_text

    processor, reference, _ = family
    save_checkpoint(reference, processor, tmp_path)
    model = load_model(tmp_path)
    support = [image(40, 50, 50), "t5 t6<|eot_id|>", image(41, 80, 30), "t7 t8<|eot_id|>"]
    query = [image(42, 30, 30), "t9"]
    classes = ["t10", "t11 t12", "t13"]
    context = FewShotContext(model, support)
    order, scores = context.rank([query], classes)
    inputs = processor(text=["<|image|>t5 t6<|eot_id|><|image|>t7 t8<|eot_id|><|image|>t9"],
                       images=[[support[0], support[2], query[0]]], return_tensors="pt")
    expected = []
    with torch.no_grad():
        for name in classes:
            ids = processor.tokenizer(name, add_special_tokens=False)["input_ids"]
            full = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
            mask = inputs["cross_attention_mask"]
            mask = torch.cat([mask, mask[:, -1:].expand(-1, len(ids), -1, -1)], 1)  # as generate extends it
            images = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
            logits = reference(input_ids=full, cross_attention_mask=mask,
                               **images).logits[0, inputs["input_ids"].shape[1] - 1:-1]
            expected.append(float(logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum()))
    assert torch.allclose(scores[0], torch.tensor(expected), atol=1e-4)
    assert order[0].tolist() == sorted(range(3), key=lambda c: -expected[c])
    answer = context.generate([query], max_new_tokens=8)[0]
    assert answer.text == generate_text(model, support + query, max_new_tokens=8)
    with pytest.raises(UserError, match="must start with an image"):  # such text would see the queries' images
        FewShotContext(model, ["t4"] + support)


LLAMA3_CHAT_TEMPLATE = (  # the Llama 3 chat format with <|image|>, as Llama 3.2 Vision's template writes it
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|image|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_a_chat_on_a_loaded_mllama_checkpoint_uses_its_chat_template_and_answers_as_generate(family, tmp_path):
    _, reference, _ = family
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>"], special_tokens=True)
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 28, "width": 28},
                                                                       max_image_tiles=4),
                                tokenizer=tokenizer, chat_template=LLAMA3_CHAT_TEMPLATE)
    save_checkpoint(reference, processor, tmp_path)
    model = load_model(tmp_path)
    picture = image(50, 40, 90)
    ours = mllama.chat_inputs(model, [{"role": "user", "content": [picture, "t5 t6"]}])
    words = processor.tokenizer.convert_ids_to_tokens(ours["input_ids"][0].tolist())  # role names are unknown: t0
    assert words == ["t1", "<|start_header_id|>", "t0", "<|end_header_id|>", "<|image|>", "t5", "t6", "<|eot_id|>",
                     "<|start_header_id|>", "t0", "<|end_header_id|>"]
    theirs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "t5 t6"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        expected = reference.generate(**theirs, max_new_tokens=10, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    ids, finish = mllama.generate_ids(model, ours, max_new_tokens=10)
    assert ids == expected.tolist()[:len(ids)]
    assert finish == "stop_token" or len(ids) == 10


# ------------------------------------------------------------------ served through the engine
def chat_processor() -> MllamaProcessor:
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>"], special_tokens=True)
    return MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 28, "width": 28},
                                                                   max_image_tiles=4),
                           tokenizer=tokenizer, chat_template=LLAMA3_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def served(family, tmp_path_factory):
    """The tiny checkpoint saved with a chat template, loaded back as `flamingo serve` loads it."""
    _, reference, _ = family
    directory = tmp_path_factory.mktemp("mllama")
    save_checkpoint(reference, chat_processor(), directory)
    return directory, load_model(directory)


def png(picture: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(picture: Image.Image) -> Image.Image:
    """The image as the server sees it (PNG bytes decoded again: the same pixels, RGB)."""
    import io

    return Image.open(io.BytesIO(png(picture))).convert("RGB")


PICTURES = [image(60 + i, *size) for i, size in enumerate([(40, 30), (28, 28), (90, 25), (30, 70), (56, 56)])]
SUPPORT_TEXT = "<|image|>t5 t6<|eot_id|><|image|>t7 t8<|eot_id|>"
# Few-shot prompts over one support set, prompts with text before their first image (which attends to
# every image), with consecutive images (one group), and without images: 0 to 4 images. (No word
# starts with t1, t2 or t3: the tiny tokenizer's BOS, EOS and pad would split it.)
ENGINE_REQUESTS = [
    (SUPPORT_TEXT + "<|image|>t9", [0, 1, 2]),
    ("t9 t47 <|image|> t5 t6 <|image|><|image|> t7", [3, 4, 0]),
    (SUPPORT_TEXT + "<|image|><|image|>t46", [0, 1, 2, 3]),
    ("t5 t6 t7", []),
    ("<|image|> t50 t51", [4]),
    (SUPPORT_TEXT + "<|image|>t9", [0, 1, 4]),
    ("t52 <|image|> t53", [2]),
    (SUPPORT_TEXT + "<|image|>t44 t45", [0, 1, 3]),
]


def engine_reference(model, text: str, pictures: list[int], **options) -> str:
    from flamingo.inference import generate_text, text_prompt

    return generate_text(model, text_prompt(text, [decoded(PICTURES[i]) for i in pictures], "<|image|>"), **options)


def run_engine(model, requests, params, config=None):
    """Queue every request before the engine starts, then collect every answer (texts by choice)."""
    import asyncio

    from flamingo.serving.engine import Engine, EngineRequest

    async def collect(stream):
        texts: dict[int, str] = {}
        async for delta in stream:
            texts[delta.index] = texts.get(delta.index, "") + delta.text
        return texts

    async def main():
        engine = Engine(model, config)
        streams = [engine.generate(EngineRequest(text, [png(PICTURES[i]) for i in pictures], p))
                   for (text, pictures), p in zip(requests, params)]
        await engine.start()
        try:
            return await asyncio.gather(*(collect(s) for s in streams)), engine.metrics
        finally:
            await engine.stop()
    return asyncio.run(main())


def test_mllama_engine_batched_answers_equal_each_alone(served):
    """8 concurrent requests (0 to 4 images, text before images, a group of two, a shared support
    set), 4 decode slots, no prefix cache: each answer equals generate_text's."""
    from flamingo.serving.engine import EngineConfig, SamplingParams

    _, model = served
    params = [SamplingParams(max_tokens=4 + i % 3 * 2) for i in range(len(ENGINE_REQUESTS))]
    answers, _ = run_engine(model, ENGINE_REQUESTS, params, EngineConfig(max_running=4, prefix_cache_bytes=0))
    for i, ((text, pictures), texts) in enumerate(zip(ENGINE_REQUESTS, answers)):
        assert texts == {0: engine_reference(model, text, pictures, max_new_tokens=params[i].max_tokens)}, i


def test_mllama_engine_prefix_cache_hit_equals_miss(served):
    """The support set is encoded once and reused by the other few-shot requests (sent one by one);
    a prompt with text before its first image is never cut (that text sees every image)."""
    import asyncio

    from flamingo.serving.engine import Engine, EngineRequest, SamplingParams

    _, model = served
    requests = [ENGINE_REQUESTS[i] for i in (0, 2, 5, 0, 7)]

    async def main():
        engine = Engine(model)
        await engine.start()
        try:
            out = []
            for text, pictures in requests:
                texts = ""
                async for delta in engine.generate(EngineRequest(text, [png(PICTURES[i]) for i in pictures],
                                                                 SamplingParams(max_tokens=6))):
                    texts += delta.text
                out.append(texts)
            text, pictures = ENGINE_REQUESTS[1]
            return out, engine.metrics, engine.processor.prompt(text, [png(PICTURES[i]) for i in pictures], 6)
        finally:
            await engine.stop()

    answers, metrics, leading = asyncio.run(main())
    for (text, pictures), answer in zip(requests, answers):
        assert answer == engine_reference(model, text, pictures, max_new_tokens=6)
    assert metrics.prefix_cache_misses._value.get() == 1 and metrics.prefix_cache_hits._value.get() == 4
    assert leading.cuts == [] and leading.split is None


def data_url(picture: Image.Image) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png(picture)).decode()


def test_the_openai_client_talks_to_a_served_mllama_checkpoint(served):
    """Chats in the checkpoint's chat template and completions, streamed or not, equal generate_text."""
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from flamingo.inference import text_prompt
    from flamingo.model.families import MEDIA, ChatMessage
    from flamingo.serving.app import create_app
    from flamingo.serving.engine import Engine
    from flamingo.serving.limits import ServerSettings

    _, model = served
    with TestClient(create_app(Engine(model), ServerSettings(model_name="mllama"))) as client:
        api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", http_client=client)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(PICTURES[0])}},
                                                 {"type": "text", "text": "t5 t6"}]}]
        answer = api.chat.completions.create(model="mllama", messages=messages, max_tokens=6)
        chat_text = mllama.MLLAMA.chat_text(model, [ChatMessage("user", [MEDIA, "t5 t6"])])
        assert chat_text.startswith("t1<|start_header_id|>user<|end_header_id|>\n\n<|image|>t5 t6<|eot_id|>")
        from flamingo.inference import generate_text

        expected = generate_text(model, text_prompt(chat_text, [decoded(PICTURES[0])], "<|image|>"), max_new_tokens=6)
        assert answer.choices[0].message.content == expected and answer.usage.prompt_tokens > 0
        stream = api.chat.completions.create(model="mllama", messages=messages, max_tokens=6, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        text, pictures = ENGINE_REQUESTS[0]
        completion = api.completions.create(model="mllama", prompt=text, max_tokens=5,
                                            extra_body={"images": [data_url(PICTURES[i]) for i in pictures]})
        assert completion.choices[0].text == engine_reference(model, text, pictures, max_new_tokens=5)
        streamed = api.completions.create(model="mllama", prompt=text, max_tokens=5, stream=True,
                                          extra_body={"images": [data_url(PICTURES[i]) for i in pictures]})
        assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
        ranked = client.post("/v1/rank", json={"prompt": text, "images": [data_url(PICTURES[i]) for i in pictures],
                                               "candidates": ["t44", "t45 t46", "t47"]}).json()["results"]
        from flamingo.inference.scoring import score_candidates
        from flamingo.inference.state import encode_prompts

        state = encode_prompts(model, [text_prompt_of(text, [decoded(PICTURES[i]) for i in pictures])])
        scores = score_candidates(model, state, ["t44", "t45 t46", "t47"]).sum_logprob[0].tolist()
        assert [r["index"] for r in ranked] == sorted(range(3), key=lambda i: -scores[i])
        assert [r["logprob"] for r in ranked] == pytest.approx(sorted(scores, reverse=True), abs=1e-4)


def test_mllama_seeded_sampling_is_reproducible_in_the_engine_and_equals_generate_text(served):
    from flamingo.serving.engine import SamplingParams

    _, model = served
    request = ENGINE_REQUESTS[4]
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=11, n=2)
    (first, second), _ = run_engine(model, [request, request], [params, params])
    assert first == second and first[0] != first[1]
    for choice in range(2):  # choice i draws with seed + i
        assert first[choice] == engine_reference(model, *request, max_new_tokens=8, do_sample=True, temperature=0.9,
                                                 top_p=0.95, seed=11 + choice)


@pytest.mark.parametrize("index", [0, 1, 4])
def test_mllama_beam_search_equals_the_reference_beam_search(family, served, index):
    """Beam search (3 beams, length penalty 1, stopping at the end-of-text or end-of-turn token)
    picks the hypothesis transformers' `generate(num_beams=3)` picks."""
    from flamingo.inference import generate_text

    processor, reference, _ = family
    _, model = served
    text, pictures = ENGINE_REQUESTS[index]
    images = [decoded(PICTURES[i]) for i in pictures]
    inputs = processor(text=[text], images=[images] if images else None, return_tensors="pt")
    stops = [2, processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    with torch.no_grad():
        theirs = reference.generate(**inputs, max_new_tokens=10, num_beams=3, do_sample=False, length_penalty=1.0,
                                    eos_token_id=stops, pad_token_id=3)[0, inputs["input_ids"].shape[1]:].tolist()
    cut = next((i for i, token in enumerate(theirs) if token in stops), len(theirs))
    assert generate_text(model, text_prompt_of(text, images), max_new_tokens=10, num_beams=3) == \
        processor.tokenizer.decode(theirs[:cut])


def text_prompt_of(text: str, images: list[Image.Image]):
    from flamingo.inference import text_prompt

    return text_prompt(text, images, "<|image|>")


# ------------------------------------------------------------------ converted once, then trained
def test_flamingo_convert_writes_a_model_directory_that_computes_the_same(served, tmp_path, capsys):
    from flamingo.cli import main

    directory, model = served
    assert main(["convert", str(directory), str(tmp_path / "ours")]) in (0, None)
    assert "converted" in capsys.readouterr().out
    assert {"config.yaml", "bridge.safetensors", "family"} <= {p.name for p in (tmp_path / "ours").iterdir()}
    converted = load_model(tmp_path / "ours")
    inputs = chat_processor()(text=["t9 <|image|> t5 t6 <|image|><|image|> t7"],
                              images=[[decoded(PICTURES[i]) for i in (3, 4, 0)]], return_tensors="pt")
    assert torch.equal(run_ours(converted, inputs), run_ours(model, inputs))  # bit for bit
    text, pictures = ENGINE_REQUESTS[2]
    assert engine_reference(converted, text, pictures, max_new_tokens=8) == \
        engine_reference(model, text, pictures, max_new_tokens=8)
    assert main(["convert", str(directory), str(tmp_path / "ours")]) == 2  # exists: refused without --overwrite


def test_a_training_step_on_a_converted_mllama_changes_only_its_trainable_parts(served, tmp_path):
    """One optimizer step on the next-token loss of an interleaved batch: the cross-attention layers
    (and the projector and the extra vocabulary rows, the rest of the bridge) change; the frozen
    Llama and vision model stay bit-identical."""
    from flamingo.model.families.convert import convert_family

    directory, _ = served
    model = load_model(convert_family(directory, tmp_path / "ours"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert len(trainable) == len(model.trainable_state_dict()) and any(".cross_attn." in name for name in trainable)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    texts = [SUPPORT_TEXT + "<|image|>t9 t44", "t5 <|image|> t6 t7 t8"]
    ids = [mllama.MLLAMA.tokenize(model, text, True) for text in texts]
    media = mllama.MLLAMA.encode(model, [[mllama.MLLAMA.preprocess(model, [decoded(PICTURES[i])]) for i in pictures]
                                         for pictures in ([0, 1, 2], [3])])
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [3] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    labels = input_ids.masked_fill((mask == 0) | (input_ids == VOCAB), -100)  # <|image|> is never predicted
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    context = model.media_context(input_ids, media.visual_tokens, num_media=media.num_media, key_mask=media.key_mask)
    nll = model.training_nll(input_ids, context, labels, attention_mask=mask)
    nll.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= trainable
    crosses = {name for name in trainable if ".cross_attn." in name}
    assert {name for name in changed if ".cross_attn." in name} == crosses
    assert any(name.startswith("perceiver.") for name in changed)


def test_flamingo_chat_on_an_mllama_checkpoint_uses_its_chat_template(served, tmp_path):
    from flamingo.inference.chat import run_chat
    from flamingo.inference.generation import GenerationConfig

    _, model = served
    decoded(PICTURES[1]).save(tmp_path / "picture.png")
    script = iter([f"/image {tmp_path / 'picture.png'}", "t5 t6", "t7", "/quit"])
    shown = []
    history = run_chat(model, GenerationConfig(max_new_tokens=5), lambda prompt: next(script), shown.append)
    first = mllama.chat_inputs(model, [{"role": "user", "content": [decoded(PICTURES[1]), "t5 t6"]}])
    ids, _ = mllama.generate_ids(model, first, max_new_tokens=5)
    reply = model.tokenizer.decode(ids)
    assert history[1].message.content == [reply.strip()] and reply in "".join(shown)
    assert [turn.message.role for turn in history] == ["user", "assistant", "user", "assistant"]


def test_flamingo_eval_offline_runs_on_an_mllama_checkpoint(served, tmp_path):
    import json

    from flamingo.cli import main

    directory, _ = served
    assert main(["eval-offline", "--model", str(directory), "--task", "induction", "--shots", "0,2", "--seeds", "1",
                 "--episodes", "3", "--json", str(tmp_path / "out.json")]) in (0, None)
    assert (tmp_path / "out.json").is_file() and json.loads((tmp_path / "out.json").read_text())


def test_mllama_prompts_encoded_together_equal_each_alone(served):
    """Prompts with 0 to 4 images, one with text before its images (which sees every image, and
    must not see another prompt's padding image slots), encoded in one batch and continued one
    step: the logits equal each prompt's alone."""
    from flamingo.inference.state import encode_prompts

    _, model = served
    prompts = [text_prompt_of(text, [decoded(PICTURES[i]) for i in pictures])
               for text, pictures in (ENGINE_REQUESTS[i] for i in (1, 2, 3, 4))]
    together = encode_prompts(model, prompts)
    alone = [encode_prompts(model, [prompt]) for prompt in prompts]
    for row, state in enumerate(alone):
        assert float((together.next_token_logits[row] - state.next_token_logits[0]).abs().max()) <= TOLERANCE, row
    token = torch.tensor([[7]] * len(prompts))
    with torch.no_grad():
        stepped = together.step(model, token)[:, -1]  # the states step in place
        for row, state in enumerate(alone):
            assert float((stepped[row] - state.step(model, token[:1])[0, -1]).abs().max()) <= TOLERANCE, row
        # the step's token sees the whole group of the last two images, as in one uncached forward pass
        text, pictures = ENGINE_REQUESTS[1]
        ids = torch.tensor([mllama.MLLAMA.tokenize(model, text, True) + [7]])
        media = mllama.MLLAMA.encode(model, [[mllama.MLLAMA.preprocess(model, [decoded(PICTURES[i])])
                                              for i in pictures]])
        full = mllama.forward(model, ids, visual_tokens=media.visual_tokens, key_mask=media.key_mask).logits
        assert float((stepped[0] - full[0, -1]).abs().max()) <= TOLERANCE


def test_flamingo_generate_on_an_mllama_checkpoint_takes_image_placeholders(served, tmp_path, capsys):
    from flamingo.cli import main

    directory, model = served
    decoded(PICTURES[0]).save(tmp_path / "picture.png")
    assert main(["generate", "--model", str(directory), "--prompt", "<image>t5 t6", "--image",
                 str(tmp_path / "picture.png"), "--max-new-tokens", "5"]) in (0, None)
    assert capsys.readouterr().out.strip() == engine_reference(model, "<|image|>t5 t6", [0], max_new_tokens=5).strip()


def test_flamingo_eval_runs_on_an_mllama_checkpoint(served, tmp_path, capsys, monkeypatch):
    """The paper's benchmarks (tiny datasets in the official formats): captioning (generation) and
    hateful memes (ranking), 0 and 2 shots, prompts `<|image|>text<|eot_id|>`."""
    import eval_fixtures

    import flamingo.evaluation.runner as runner
    from flamingo.cli import main

    prompts = []
    encode = runner.encode_prompts
    monkeypatch.setattr(runner, "encode_prompts", lambda model, batch, **kw: prompts.extend(p.text for p in batch)
                        or encode(model, batch, **kw))

    directory, _ = served
    tasks = {"coco": (tmp_path / "coco", eval_fixtures.write_karpathy(tmp_path / "coco", train=8, test=4)),
             "hatefulmemes": (tmp_path / "hm", eval_fixtures.write_hateful_memes(tmp_path / "hm", n=10))}
    eval_fixtures.write_data_config(tmp_path / "data.yaml", tasks)
    code = main(["eval", "--model", str(directory), "--task", "coco,hatefulmemes", "--shots", "0,2",
                 "--trials", "1", "--support-size", "4", "--max-new-tokens", "4", "--data", str(tmp_path / "data.yaml"),
                 "--out", str(tmp_path / "out"), "--no-progress", "--no-card"])
    out = capsys.readouterr().out
    assert code == 0 and "| coco | CIDEr |" in out and "| hatefulmemes | ROC-AUC |" in out
    demos = [text for text in prompts if text.count("<|image|>") >= 2]
    assert demos and all("<|eot_id|>" in text and "<|endofchunk|>" not in text for text in demos)


def vqa_finetune_config(tmp_path, base, **fields):
    """A fine-tuning config over 4 tiny VQA records (words the tiny tokenizer knows), 3 steps of 2."""
    import eval_fixtures
    import yaml

    eval_fixtures.write_data_config(tmp_path / "data.yaml", {
        "vqav2": (tmp_path / "vqa", eval_fixtures.write_vqa_in_words(tmp_path / "vqa", train=4, test=2))})
    config = {"base": str(base), "task": "vqav2", "data": str(tmp_path / "data.yaml"), "batch_size": 2,
              "train": {"steps": 3, "device": "cpu", "run_dir": str(tmp_path / "run"), "optim": {"lr": 1e-2},
                        "logging": {"every": 1}}, **fields}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "finetune.yaml"


def test_mllama_training_loss_on_a_padded_multi_image_batch_equals_the_references(family):
    """Flamingo.forward(labels, vision_inputs): multi-tile images, 2 and 1 images per sample (a padding
    slot, not encoded: no token sees it), loss on text only: the reference's loss within 1e-5, and a
    gradient reaches the cross-attention layers only through the trainable tensors."""
    processor, reference, model = family
    inputs = processor(text=["<|image|> t5 t6 <|image|><|image|> t7 t8", "<|image|> t9 t10 t11"],
                       images=[[image(30, 100, 28), image(31, 30, 30), image(32, 56, 56)], [image(33, 28, 90)]],
                       padding=True, return_tensors="pt")
    ids = inputs["input_ids"]
    labels = ids.masked_fill((inputs["attention_mask"] == 0) | (ids == VOCAB), -100)
    vision_inputs = {k: inputs[k] for k in ("aspect_ratio_ids", "aspect_ratio_mask")}
    out = model(ids, inputs["pixel_values"], attention_mask=inputs["attention_mask"], labels=labels,
                num_media=(ids == VOCAB).sum(1), vision_inputs=vision_inputs)
    with torch.no_grad():
        theirs = reference(**inputs, labels=labels).loss
    assert abs(float(out.loss.detach()) - float(theirs)) <= TOLERANCE
    out.loss.backward()
    assert all(param.grad is None for param in model.parameters() if not param.requires_grad)
    assert all(block.attn.to_q.weight.grad is not None for block in model.cross_attn_layers.values())
    model.zero_grad(set_to_none=True)
    with pytest.raises(UserError, match="give vision_inputs"):  # its tiles without their layout
        model(ids, inputs["pixel_values"], labels=labels, num_media=(ids == VOCAB).sum(1))


def test_mllama_finetuning_samples_are_its_processors_inputs_and_the_loss_is_the_references(family, served,
                                                                                              tmp_path):
    """A VQA record becomes exactly what MllamaProcessor builds for its demo text and image (BOS after
    the image, aspect-ratio tiles), the loss on the answer and <|eot_id|> only; a batch's training loss
    equals MllamaForConditionalGeneration's loss with the same labels."""
    from flamingo.data.batch import collate
    from flamingo.data.benchmarks.media import read_media
    from flamingo.model.families.convert import convert_family
    from flamingo.training.data import build_sources
    from flamingo.training.finetune import load_finetune_config

    _, reference, _ = family
    directory, model = served
    converted = convert_family(directory, tmp_path / "ours")
    path = vqa_finetune_config(tmp_path, converted)
    source = build_sources(load_finetune_config(path).train_config(converted), model)["vqav2"]
    processor = chat_processor()
    samples, texts, images = [], [], []
    for record in source.samples[:2]:
        samples.append(source.build(record, np.random.default_rng(0)))
        texts.append(f"<|image|>{source.task.query_text(record)} {source.task.demo_answer(record)}<|eot_id|>")
        images.append(read_media(record, False, source.sampling))
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    batch = collate(samples, source.pad_token_id)
    assert torch.equal(batch.input_ids, inputs["input_ids"]) and torch.equal(batch.attention_mask,
                                                                             inputs["attention_mask"])
    assert torch.equal(batch.pixel_values, inputs["pixel_values"])
    assert torch.equal(batch.vision_inputs["aspect_ratio_ids"], inputs["aspect_ratio_ids"])
    assert torch.equal(batch.vision_inputs["aspect_ratio_mask"], inputs["aspect_ratio_mask"])
    assert inputs["input_ids"][0, :2].tolist() == [VOCAB, 1]  # <|image|> then BOS
    answer = model.tokenizer(f" {source.task.demo_answer(source.samples[0])}", add_special_tokens=False)["input_ids"]
    assert samples[0].labels[samples[0].labels != -100].tolist() == answer + [model.eoc_token_id]
    with torch.no_grad():
        ours = model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                     num_media=batch.num_media, labels=batch.labels, vision_inputs=batch.vision_inputs).loss
        theirs = reference(**inputs, labels=batch.labels).loss
    assert abs(float(ours) - float(theirs)) <= TOLERANCE


def test_mllama_image_text_pairs_are_its_processors_inputs(family, served, tmp_path):
    """A kind: pairs dataset (image files with captions) for a Llama 3.2 Vision model: each pair is
    what MllamaProcessor builds for `<|image|>caption<|eot_id|>` and the image (tiles, BOS after the
    image), the loss on the caption and <|eot_id|>; its batch loss equals the reference's."""
    import yaml

    from flamingo.model.families.convert import convert_family
    from flamingo.training.config import TrainConfig
    from flamingo.training.data import build_sources

    _, reference, _ = family
    directory, model = served
    converted = convert_family(directory, tmp_path / "ours")
    captions = ["t5 t6 t7", "t8 <|image|> t9 <|eot_id|>"]  # media and special tokens in raw text are dropped
    for i, caption in enumerate(captions):
        (tmp_path / "pairs").mkdir(exist_ok=True)
        PICTURES[i].save(tmp_path / "pairs" / f"{i}.png")
        (tmp_path / "pairs" / f"{i}.txt").write_text(caption)
    config = TrainConfig.from_dict({
        "model": yaml.safe_load((converted / "config.yaml").read_text()), "init_from": str(converted),
        "datasets": [{"name": "pairs", "kind": "pairs", "path": str(tmp_path / "pairs"), "batch_size": 2,
                      "p_space": 0.0, "augment": False, "shuffle": False, "filter_images": False}]})
    batch = next(iter(build_sources(config, model)["pairs"]))
    inputs = chat_processor()(text=["<|image|>t5 t6 t7<|eot_id|>", "<|image|>t8  t9 <|eot_id|>"],
                              images=[[decoded(PICTURES[0])], [decoded(PICTURES[1])]], padding=True,
                              return_tensors="pt")
    assert torch.equal(batch.input_ids, inputs["input_ids"]) and torch.equal(batch.pixel_values,
                                                                             inputs["pixel_values"])
    assert all(torch.equal(batch.vision_inputs[k], inputs[k]) for k in ("aspect_ratio_ids", "aspect_ratio_mask"))
    assert batch.labels[0][batch.labels[0] != -100].tolist() == [5, 6, 7, model.eoc_token_id]
    with torch.no_grad():
        ours = model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                     num_media=batch.num_media, labels=batch.labels, vision_inputs=batch.vision_inputs).loss
        theirs = reference(**inputs, labels=batch.labels).loss
    assert abs(float(ours) - float(theirs)) <= TOLERANCE


def test_flamingo_finetune_of_a_converted_mllama_trains_its_cross_attention_and_what_unfreeze_names(served,
                                                                                                   tmp_path):
    """flamingo finetune from a converted tiny Llama 3.2 Vision, LM block 0 unfrozen: the final model
    loads (its frozen backbones linked from the base's) and generates; the cross-attention layers,
    the projector and block 0 changed, every other tensor is bit-identical to the base's; its
    WiSE-FT model at 0.5 loads too and holds the halfway point of every tensor."""
    from flamingo.cli import main
    from flamingo.model.families.convert import convert_family

    directory, _ = served
    converted = convert_family(directory, tmp_path / "ours")
    path = vqa_finetune_config(tmp_path, converted, unfreeze={"vision": False, "lm_blocks": [0]}, wise_alpha=[0.5])
    assert main(["finetune", str(path)]) in (0, None)
    final = tmp_path / "run" / "final"
    base, tuned = load_model(converted), load_model(final)
    mixed = load_model(tmp_path / "run" / "wise-ft-0.5").state_dict()
    assert tuned.family == mllama.FAMILY and tuned.config.unfreeze.lm_blocks == [0]
    before, after = base.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    bridge = {name for name, param in base.named_parameters() if param.requires_grad}
    block0 = {name for name in before if name.startswith("lm.model.layers.0.")}
    assert block0 and changed <= bridge | block0 and block0 <= changed
    assert {name for name in bridge if ".cross_attn." in name} <= changed
    for name in before:  # WiSE-FT: the halfway point of every tensor
        assert torch.allclose(mixed[name], (before[name] + after[name]) / 2, atol=1e-6), name
    text, pictures = ENGINE_REQUESTS[4]
    assert isinstance(engine_reference(tuned, text, pictures, max_new_tokens=4), str)


def test_a_lora_finetune_of_a_converted_mllama_loads_with_its_adapters_merged(served, tmp_path):
    """LoRA adapters on the frozen Llama's q_proj / v_proj train beside the bridge; the final model
    loads (family/ linked, adapters folded in): only those projections and the bridge differ from the base."""
    from flamingo.cli import main
    from flamingo.model.families.convert import convert_family

    directory, _ = served
    converted = convert_family(directory, tmp_path / "ours")
    path = vqa_finetune_config(tmp_path, converted, lora={"rank": 4, "targets": ["q_proj", "v_proj"]})
    assert main(["finetune", str(path)]) in (0, None)
    base, tuned = load_model(converted), load_model(tmp_path / "run" / "final")
    before, after = base.state_dict(), tuned.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    bridge = {name for name, param in base.named_parameters() if param.requires_grad}
    adapted = changed - bridge
    assert adapted and all(name.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")) for name in adapted)


def test_flamingo_finetune_of_an_unconverted_mllama_checkpoint_or_with_an_image_size_is_refused(served, tmp_path):
    """The base must be the converted directory (a transformers checkpoint is named, with the command that
    converts it), and its images are sized by its own processor (image_size is refused)."""
    import yaml
    from bad_input import run_cli

    from flamingo.model.families.convert import convert_family

    directory, _ = served
    path = vqa_finetune_config(tmp_path, directory)
    run_cli(["finetune", str(path)], watch=[directory],
            expect=["Llama 3.2 Vision (MllamaForConditionalGeneration) checkpoint", "flamingo convert"])
    converted = convert_family(directory, tmp_path / "ours")
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "base": str(converted), "image_size": 56}))
    run_cli(["finetune", str(path)], watch=[converted], expect=["image_size", "its own image processor"])
    assert not (tmp_path / "run").exists()
