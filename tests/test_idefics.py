"""IDEFICS (`IdeficsForVisionText2Text`) as configuration of our model, proven against transformers'
own classes on tiny random models built here (offline, fp32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessorPil,
    IdeficsProcessor,
    PreTrainedTokenizerFast,
)

from flamingo import load_model
from flamingo.errors import UserError
from flamingo.model.families import idefics
from flamingo.model.weights import CheckpointError

VOCAB = 120  # the LLaMA's vocab_size; <fake_token_around_image>, <image>, <end_of_utterance> are the extra rows
FAKE, IMAGE, END_OF_UTTERANCE = VOCAB, VOCAB + 1, VOCAB + 2
TOLERANCE = 1e-5


def tiny_tokenizer(instruct: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer "<unk> <s> </s> t3 ... t119" plus IDEFICS-instruct's three added tokens
    (instruct=False: the base models' two, without <end_of_utterance>)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<unk>")
    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"][:3 if instruct else 2]
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    assert tokenizer.convert_tokens_to_ids(added) == [FAKE, IMAGE, END_OF_UTTERANCE][:len(added)]
    return tokenizer


VARIANTS = {  # idefics-9b/-80b's layout (float gates, resampler, q/k norms) and the others the config allows
    "resampler, float gates, qk norms": dict(alpha_type="float", use_resampler=True, qk_layer_norms=True,
                                             qk_layer_norms_perceiver=True),
    "CLIP tokens, vector gates": dict(alpha_type="vector", use_resampler=False, qk_layer_norms=False,
                                      qk_layer_norms_perceiver=False),
}


def tiny_idefics_config(alpha_type: str, use_resampler: bool, qk_layer_norms: bool,
                        qk_layer_norms_perceiver: bool) -> IdeficsConfig:
    return IdeficsConfig(
        vocab_size=VOCAB, additional_vocab_size=3, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=qk_layer_norms, use_resampler=use_resampler,
        alpha_type=alpha_type, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        vision_config=dict(embed_dim=16, image_size=28, patch_size=14, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32),
        perceiver_config=dict(use_resampler=use_resampler, resampler_n_latents=4, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=8,
                              qk_layer_norms_perceiver=qk_layer_norms_perceiver))


def tiny_processor() -> IdeficsProcessor:
    return IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=28), tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module", params=list(VARIANTS))
def family(request):
    torch.manual_seed(0)
    reference = IdeficsForVisionText2Text(tiny_idefics_config(**VARIANTS[request.param])).eval()
    with torch.no_grad():  # the gates start at 0 (no image would matter) and the norms at 1: move them
        for name, param in reference.named_parameters():
            if "alpha" in name:
                param.copy_(0.8 + 0.1 * torch.randn_like(param))
            elif "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model = idefics.build_model(reference.config, tiny_tokenizer())
    idefics.load_state_dict(model, reference.state_dict())
    return tiny_processor(), reference, model.eval()


def image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def run_ours(model, inputs) -> torch.Tensor:
    return idefics.forward(model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           **idefics._media(model, inputs)).logits


PROMPTS = {
    "no image": [["t5 t6 t7 t8"]],
    "one image": [[image(1, 40, 30), "t5 t6 t7"]],
    "three images, text first, two consecutive, an end of sequence": [
        ["t9", image(2, 30, 30), "t5", image(3, 20, 70), image(4, 90, 25), "t7 </s> t8 t9"]],
    "a batch with 2, 0 and 1 images": [[image(7, 30, 60), "t5", image(8, 60, 30), "t6 t7"], ["t8 t9 t10"],
                                       ["t11", image(9, 28, 28), "t12"]],
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_idefics_logits_equal_the_reference(family, name):
    processor, reference, model = family
    inputs = processor(text=PROMPTS[name], return_tensors="pt")
    with torch.no_grad():
        theirs = reference(**inputs).logits
        ours = run_ours(model, inputs)
    real = inputs["attention_mask"].bool()
    assert ours.shape == theirs.shape  # the extra rows are predicted too (decoupled lm_head)
    assert float((ours - theirs).abs()[real].max()) <= TOLERANCE
    if name != "no image":  # the images matter: without them the logits differ
        blind = dict(inputs, image_attention_mask=torch.zeros_like(inputs["image_attention_mask"]))
        with torch.no_grad():
            assert float((reference(**blind).logits - theirs).abs()[real].max()) > 1e-2


def test_tokens_after_an_end_of_sequence_see_no_image_until_the_next(family):
    processor, _, model = family
    ids = processor(text=[["t3", image(1, 30, 30), "t4 </s> t5", image(2, 30, 30), "t6 </s>"]],
                    return_tensors="pt")["input_ids"]
    assert processor.tokenizer.convert_ids_to_tokens(ids[0]) == [
        "<s>", "t3", "<fake_token_around_image>", "<image>", "<fake_token_around_image>", "t4", "</s>", "t5",
        "<fake_token_around_image>", "<image>", "<fake_token_around_image>", "t6", "</s>"]
    two = torch.zeros(1, 2, 1, model.perceiver.dim)  # visual tokens of two images
    assert model.media_context(ids, two).token_media[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 2, 2, 2, 2]
    # continued after a call that ended with </s>: no image until the next one
    first = model.media_context(ids[:, :7], two, num_media=torch.tensor([2]), media_offset=torch.tensor([0]))
    seen = model.media_after(ids[:, :7], first)
    assert seen.tolist() == [0]
    assert model.media_context(ids[:, 7:], two, media_offset=torch.tensor([1]), media_seen=seen
                               ).token_media[0].tolist() == [0, 0, 2, 2, 2, 2]


GENERATION_PROMPTS = [["t5 t6 t7"], [image(10, 60, 30), "t5 t6"],
                      ["t9", image(11, 28, 28), "t5", image(12, 30, 90), image(13, 50, 50), "t6"]]


@pytest.mark.parametrize("index", range(len(GENERATION_PROMPTS)))
def test_idefics_cached_decoding_equals_the_uncached_forward(family, index):
    processor, _, model = family
    inputs = processor(text=[GENERATION_PROMPTS[index]], return_tensors="pt")
    ids, media = inputs["input_ids"], idefics._media(model, inputs)
    new, cached = idefics.greedy_generate(model, ids, max_new_tokens=6, **media)
    with torch.no_grad():
        full = idefics.forward(model, torch.cat([ids, new], 1), **media).logits
    assert float((cached - full[:, ids.shape[1] - 1:-1]).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("index", range(len(GENERATION_PROMPTS)))
def test_idefics_greedy_generation_equals_the_reference_generate(family, index):
    processor, reference, model = family
    inputs = processor(text=[GENERATION_PROMPTS[index]], return_tensors="pt")
    ids = inputs["input_ids"]
    with torch.no_grad():  # no stop token: all 20 tokens compared
        theirs = reference.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=None)[:, ids.shape[1]:]
    ours, _ = idefics.greedy_generate(model, ids, max_new_tokens=20, **idefics._media(model, inputs))
    assert theirs.shape == (1, 20)
    assert ours.tolist() == theirs.tolist()


def test_idefics_checkpoint_with_a_missing_an_extra_or_a_mis_shaped_tensor_is_refused(family):
    _, reference, model = family
    state = dict(reference.state_dict())
    gone = {k: v for k, v in state.items() if k != "model.gated_cross_attn_layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors: lm\.model\.layers\.2\.cross_attn\.ffw\.fc_up"):
        idefics.load_state_dict(model, gone)
    lone_key = {k: v for k, v in state.items() if k != "model.gated_cross_attn_layers.0.cross_attn.v_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors: lm\.model\.layers\.0\.cross_attn\.attn\.to_kv"):
        idefics.load_state_dict(model, lone_key)
    extra = dict(state, **{"model.gated_cross_attn_layers.1.extra.weight": torch.zeros(2),
                           "model.gated_cross_attn_layers.2.mlp.up_proj.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"no place in the model: model\.gated_cross_attn_layers\.1\.extra\."
                                              r"weight, model\.gated_cross_attn_layers\.2\.mlp"):
        idefics.load_state_dict(model, extra)
    wrong = dict(state, **{"model.norm.weight": torch.ones(31)})
    with pytest.raises(CheckpointError,
                       match=r"mis-shaped tensors: lm\.model\.norm\.weight: expected \(32,\), got \(31,\)"):
        idefics.load_state_dict(model, wrong)


def test_idefics_layouts_it_does_not_express_are_refused():
    base = tiny_idefics_config(**VARIANTS["resampler, float gates, qk norms"])
    for change, named in ((dict(cross_layer_interval=3), "cross_layer_interval 3"),
                          (dict(additional_vocab_size=0), "additional_vocab_size 0"),
                          (dict(hidden_act="gelu"), "hidden_act 'gelu'")):
        config = IdeficsConfig(**dict(base.to_dict(), **change))
        with pytest.raises(CheckpointError, match=named):
            idefics.build_model(config, tiny_tokenizer())


def save_checkpoint(reference, processor, directory) -> None:
    """A transformers checkpoint directory as `save_pretrained` writes it, in several shards."""
    reference.save_pretrained(directory, max_shard_size="40KB")
    processor.save_pretrained(directory)


def rewrite_shards(directory, change) -> None:
    """Apply `change` to the {name: tensor} dict of every shard and keep the index in step."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = change(shard, load_file(str(directory / shard)))
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
        index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def saved(family, tmp_path_factory):
    """The reference saved by transformers (sharded safetensors, tokenizer and processor files)."""
    processor, reference, _ = family
    directory = tmp_path_factory.mktemp("idefics")
    save_checkpoint(reference, processor, directory)
    assert len(list(directory.glob("*.safetensors"))) > 2  # sharded
    return directory


def test_a_saved_idefics_checkpoint_loads_strictly_and_computes_the_same(family, saved):
    processor, reference, _ = family
    model = load_model(saved)
    assert model.family == idefics.FAMILY and model.config.end_of_chunk_token == "<end_of_utterance>"
    inputs = processor(text=[[image(20, 60, 30), "t5 t6"]], return_tensors="pt")
    with torch.no_grad():
        assert float((run_ours(model, inputs) - reference(**inputs).logits).abs().max()) <= TOLERANCE


def test_a_saved_idefics_checkpoint_with_a_missing_or_an_extra_tensor_is_refused(family, tmp_path):
    processor, reference, _ = family
    gone = "model.gated_cross_attn_layers.1.post_attention_layernorm.weight"
    save_checkpoint(reference, processor, tmp_path / "missing")
    rewrite_shards(tmp_path / "missing", lambda shard, tensors: {k: v for k, v in tensors.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"missing tensors: lm\.model\.layers\.2\.cross_attn\.ffw\.norm\.weight"):
        load_model(tmp_path / "missing")
    save_checkpoint(reference, processor, tmp_path / "extra")
    rewrite_shards(tmp_path / "extra", lambda shard, tensors: dict(tensors, **{f"model.extra_{shard}": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"no place in the model: model\.extra_model-00001"):
        load_model(tmp_path / "extra")


def test_a_plain_prompt_becomes_the_processors_inputs_and_generates_as_the_reference(family, saved):
    processor, reference, _ = family
    model = load_model(saved)
    pictures = [image(30, 70, 40), image(31, 20, 50)]
    items = [pictures[0], "t5 t6", pictures[1], "t7"]
    ours = idefics.prompt_inputs(model, items)
    theirs = processor(text=[items], return_tensors="pt")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert processor.tokenizer.convert_ids_to_tokens(ours["input_ids"][0]) == [
        "<s>", "<fake_token_around_image>", "<image>", "<fake_token_around_image>", "t5", "t6",
        "<fake_token_around_image>", "<image>", "<fake_token_around_image>", "t7"]
    with torch.no_grad():
        expected = reference.generate(**theirs, max_new_tokens=12, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    stops = (2, END_OF_UTTERANCE)
    cut = [i for i, t in enumerate(expected.tolist()) if t in stops]
    ids, finish = idefics.generate_ids(model, items, max_new_tokens=12)
    assert ids == expected.tolist()[:cut[0] if cut else 12]
    assert finish == ("stop_token" if cut else "length")
    with pytest.raises(UserError, match="give the image itself"):
        idefics.prompt_inputs(model, ["t5 <image> t6"])


def test_an_idefics_instruct_chat_is_the_model_cards_format(family, saved):
    processor, reference, _ = family
    model = load_model(saved)
    pictures = [image(40, 50, 50), image(41, 30, 60)]
    messages = [{"role": "user", "content": ["t5 t6", pictures[0]]},
                {"role": "assistant", "content": "t7 t8"},
                {"role": "user", "content": [pictures[1], "t9"]}]
    ours = idefics.chat_inputs(model, messages)
    # IDEFICS-instruct's model card builds its prompts so, with add_end_of_utterance_token=False
    theirs = processor(text=[["User: t5 t6", pictures[0], "<end_of_utterance>\nAssistant: t7 t8<end_of_utterance>"
                              "\nUser:", pictures[1], "t9<end_of_utterance>\nAssistant:"]],
                       add_end_of_utterance_token=False, return_tensors="pt")
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert processor.tokenizer.convert_ids_to_tokens(ours["input_ids"][0])[-3:] == [
        "<end_of_utterance>", "<unk>", "<unk>"]  # "\nAssistant:": words this tiny vocabulary lacks
    with torch.no_grad():
        expected = reference.generate(**theirs, max_new_tokens=10, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    ids, finish = idefics.generate_ids(model, ours, max_new_tokens=10)
    assert ids == expected.tolist()[:len(ids)]
    assert finish == "stop_token" or len(ids) == 10
    with pytest.raises(UserError, match="role 'tool'"):
        idefics.chat_inputs(model, [{"role": "tool", "content": "t5"}])


# The published config.json of HuggingFaceM4/idefics-9b and idefics-80b (their -instruct variants share the
# architecture), the fields that size the model.
_VISION = dict(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14, num_attention_heads=16,
               num_hidden_layers=32)
_PERCEIVER = dict(qk_layer_norms_perceiver=True, resampler_depth=6, resampler_head_dim=96, resampler_n_heads=16,
                  resampler_n_latents=64)
_COMMON = dict(architectures=["IdeficsForVisionText2Text"], model_type="idefics", additional_vocab_size=2,
               alpha_initializer="zeros", alpha_type="float", bos_token_id=1, eos_token_id=2, pad_token_id=0,
               cross_layer_interval=4, hidden_act="silu", qk_layer_norms=True, tie_word_embeddings=False,
               use_resampler=True, vocab_size=32000, vision_config=_VISION, perceiver_config=_PERCEIVER)
PUBLISHED = {
    "idefics-9b": dict(_COMMON, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
                       rms_norm_eps=1e-06, max_position_embeddings=2048),
    "idefics-80b": dict(_COMMON, hidden_size=8192, intermediate_size=22016, num_attention_heads=64,
                        num_hidden_layers=80, rms_norm_eps=1e-05),
}
# transformers' IdeficsForVisionText2Text on these configs: 8.93B and 79.97B, the "9B" and "80B" of the names
PUBLISHED_TOTALS = {"idefics-9b": 8_929_679_632, "idefics-80b": 79_967_843_624}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_flamingo_params_on_the_published_idefics_configs(name, tmp_path, capsys):
    from flamingo.cli import main

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    main(["params", str(tmp_path)])
    report = capsys.readouterr().out
    total = int(report.splitlines()[-1].split()[1].replace(",", ""))
    with torch.device("meta"):  # transformers' own class from the same file counts the same
        reference = IdeficsForVisionText2Text(IdeficsConfig.from_pretrained(str(tmp_path)))
    assert total == sum(p.numel() for p in reference.parameters()) == PUBLISHED_TOTALS[name]
    assert "gated xattn-dense layers" in report and "perceiver resampler" in report


# ------------------------------------------------------------ the generic inference and serving code
def reference_answer(processor, reference, items, max_new_tokens: int, **processor_kwargs) -> str:
    """transformers' greedy generate on the processor's inputs, cut at </s> or <end_of_utterance>, decoded."""
    inputs = processor(text=[items], return_tensors="pt", **processor_kwargs)
    with torch.no_grad():
        new = reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = new[0, inputs["input_ids"].shape[1]:]
    ids = new.tolist()
    cut = [i for i, t in enumerate(ids) if t in (2, END_OF_UTTERANCE)]
    return processor.tokenizer.decode(ids[:cut[0]] if cut else ids, skip_special_tokens=True)


def test_the_family_interface_tokenizes_and_preprocesses_as_the_processor(family, saved):
    from flamingo.inference.prompt import interleaved_prompt
    from flamingo.model.families import media_family

    processor, _, _ = family
    model = load_model(saved)
    family_io = media_family(model)
    assert family_io is idefics.MEDIA_FAMILY
    pictures = [image(50, 70, 40), image(51, 20, 50), image(52, 30, 30)]
    items = ["t9", pictures[0], "t5 t6", pictures[1], pictures[2], "t7"]
    prompt = interleaved_prompt(items, model.config.media_token)
    theirs = processor(text=[items], return_tensors="pt")
    assert family_io.tokenize(model, prompt.text, True) == theirs["input_ids"][0].tolist()
    pixels = torch.stack([family_io.preprocess(model, frames)[0] for frames in prompt.media])
    assert torch.equal(pixels, theirs["pixel_values"][0])


def test_generate_text_and_a_few_shot_context_on_a_loaded_idefics_equal_the_reference(family, saved):
    from flamingo.inference import FewShotContext, generate_text

    processor, reference, _ = family
    model = load_model(saved)
    query = [image(42, 30, 30), "t9"]
    assert generate_text(model, query, max_new_tokens=10) == reference_answer(processor, reference, query, 10)
    support = [image(40, 50, 50), "t5 t6<end_of_utterance>", image(41, 80, 30), "t7 t8<end_of_utterance>"]
    expected = reference_answer(processor, reference, support + query, 8)
    assert generate_text(model, support + query, max_new_tokens=8) == expected
    context = FewShotContext(model, support)
    assert context.generate([query], max_new_tokens=8)[0].text == expected
    classes = ["t10", "t11 t12", "t13"]
    order, scores = context.rank([query], classes)
    logprobs = reference_logprobs(processor, reference, support + query, classes)
    assert torch.allclose(scores[0], torch.tensor(logprobs), atol=1e-4)
    assert order[0].tolist() == sorted(range(3), key=lambda c: -logprobs[c])


def test_an_idefics_chat_through_the_generic_code_is_the_instruct_format(family, saved):
    from flamingo.inference import generate_text
    from flamingo.inference.prompt import Prompt
    from flamingo.model.families import MEDIA, ChatMessage

    processor, reference, _ = family
    model = load_model(saved)
    pictures = [image(43, 40, 40), image(44, 60, 30)]
    messages = [ChatMessage("system", ["t20 t21"]), ChatMessage("user", ["t5 t6", MEDIA]),
                ChatMessage("assistant", ["t7 t8"]), ChatMessage("user", [MEDIA, "t9"])]
    text = idefics.MEDIA_FAMILY.chat_text(model, messages)
    assert text == ("t20 t21\nUser: t5 t6<image><end_of_utterance>\nAssistant: t7 t8<end_of_utterance>"
                    "\nUser:<image>t9<end_of_utterance>\nAssistant:")  # the model card's spacing
    items = idefics.chat_items([{"role": m.role, "content": [pictures[0] if p is MEDIA and i < 2 else
                                                             pictures[1] if p is MEDIA else p for p in m.content]}
                                for i, m in enumerate(messages)])
    theirs = processor(text=[items], add_end_of_utterance_token=False, return_tensors="pt")
    assert idefics.MEDIA_FAMILY.tokenize(model, text, True) == theirs["input_ids"][0].tolist()
    answer = generate_text(model, Prompt(text, [[p] for p in pictures]), max_new_tokens=8)
    assert answer == reference_answer(processor, reference, items, 8, add_end_of_utterance_token=False)


ENGINE_SUPPORT = "<image>t5 t6<end_of_utterance><image>t7 t8<end_of_utterance>"
ENGINE_PICTURES = [image(60 + i, *size) for i, size in enumerate([(40, 30), (28, 28), (90, 25), (30, 70)])]
ENGINE_REQUESTS = [  # few-shot prompts over one support set, consecutive images, text only: 0 to 4 images
    (ENGINE_SUPPORT + "<image>t9", [0, 1, 2]),
    ("t9 t47<image> t5 t6<image><image> t7", [3, 2, 0]),
    (ENGINE_SUPPORT + "<image><image>t46", [0, 1, 2, 3]),
    ("t5 t6 t7", []),
    (ENGINE_SUPPORT + "<image>t44 t45", [0, 1, 3]),
]


def png(picture: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def engine_reference(model, text: str, pictures: list[int], max_new_tokens: int) -> str:
    from flamingo.inference import generate_text, text_prompt

    return generate_text(model, text_prompt(text, [ENGINE_PICTURES[i] for i in pictures]),
                         max_new_tokens=max_new_tokens)


def run_engine_one_by_one(model, requests, config, max_tokens: int):
    import asyncio

    from flamingo.serving.engine import Engine, EngineRequest, SamplingParams

    async def main():
        engine = Engine(model, config)
        await engine.start()
        try:
            answers = []
            for text, pictures in requests:
                answer = ""
                async for delta in engine.generate(EngineRequest(text, [png(ENGINE_PICTURES[i]) for i in pictures],
                                                                 SamplingParams(max_tokens=max_tokens))):
                    answer += delta.text
                answers.append(answer)
            return answers, engine.metrics
        finally:
            await engine.stop()
    return asyncio.run(main())


def run_engine_together(model, requests, config, max_tokens: int):
    import asyncio

    from flamingo.serving.engine import Engine, EngineRequest, SamplingParams

    async def collect(stream):
        return "".join([delta.text async for delta in stream])

    async def main():
        engine = Engine(model, config)
        streams = [engine.generate(EngineRequest(text, [png(ENGINE_PICTURES[i]) for i in pictures],
                                                 SamplingParams(max_tokens=max_tokens)))
                   for text, pictures in requests]
        await engine.start()
        try:
            return await asyncio.gather(*(collect(s) for s in streams))
        finally:
            await engine.stop()
    return asyncio.run(main())


def test_the_engine_on_a_loaded_idefics_batched_and_with_its_prefix_cache_equals_generate_text(family, saved):
    from flamingo.serving.engine import EngineConfig

    model = load_model(saved)
    expected = [engine_reference(model, text, pictures, 6) for text, pictures in ENGINE_REQUESTS]
    together = run_engine_together(model, ENGINE_REQUESTS, EngineConfig(max_running=3, prefix_cache_bytes=0), 6)
    assert together == expected
    requests = [ENGINE_REQUESTS[i] for i in (0, 2, 4, 0)]
    answers, metrics = run_engine_one_by_one(model, requests, None, 6)
    assert answers == [expected[i] for i in (0, 2, 4, 0)]
    assert metrics.prefix_cache_hits._value.get() >= 2  # the support set's prefix served from the cache


def test_flamingo_convert_of_an_idefics_checkpoint_computes_the_same(family, saved, tmp_path, capsys):
    from flamingo.cli import main

    processor, _, _ = family
    model = load_model(saved)
    assert main(["convert", str(saved), str(tmp_path / "ours")]) in (0, None)
    assert "converted" in capsys.readouterr().out
    converted = load_model(tmp_path / "ours")
    inputs = processor(text=[["t9", image(70, 40, 40), "t5 t6", image(71, 30, 50), image(72, 60, 20), "t7"]],
                       return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(run_ours(converted, inputs), run_ours(model, inputs))  # bit for bit
    text, pictures = ENGINE_REQUESTS[2]
    assert engine_reference(converted, text, pictures, 8) == engine_reference(model, text, pictures, 8)


def test_a_training_step_on_a_converted_idefics_changes_only_its_trainable_parts(saved, tmp_path):
    """One optimizer step on the next-token loss of an interleaved batch: the cross-attention layers,
    the resampler (where there is one) and the extra vocabulary rows change; the frozen LLaMA and
    CLIP tower stay bit-identical."""
    from flamingo.model.families.convert import convert_family

    model = load_model(convert_family(saved, tmp_path / "ours"))
    family_io = idefics.MEDIA_FAMILY
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert len(trainable) == len(model.trainable_state_dict())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    texts = [ENGINE_SUPPORT + "<image>t9 t44", "t5<image>t6 t7 t8"]
    ids = [family_io.tokenize(model, text, True) for text in texts]
    counts = torch.tensor([3, 1])
    pixels = torch.zeros(2, 3, 1, 3, 28, 28)  # [B, N, T, 3, H, W]
    for b, pictures in enumerate(([0, 1, 2], [3])):
        for j, i in enumerate(pictures):
            pixels[b, j] = family_io.preprocess(model, [ENGINE_PICTURES[i]])
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    labels = input_ids.masked_fill(mask == 0, -100)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    context = model.media_context(input_ids, model.encode_media(pixels, num_media=counts), num_media=counts)
    nll = model.training_nll(input_ids, context, labels, attention_mask=mask)
    nll.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= trainable
    crosses = {name for name in trainable if ".cross_attn." in name}
    assert {name for name in changed if ".cross_attn." in name} == crosses
    assert {"lm.model.embed_tokens.new_rows", "lm.lm_head.new_rows"} <= changed
    if model.config.perceiver.kind == "resampler":
        assert any(name.startswith("perceiver.") for name in changed)


def data_url(picture: Image.Image) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png(picture)).decode()


def test_the_openai_client_talks_to_a_served_idefics(family, saved):
    """A chat (IDEFICS-instruct's format) and completions, streamed or not, equal generate_text."""
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from flamingo.inference import generate_text, text_prompt
    from flamingo.model.families import MEDIA, ChatMessage
    from flamingo.serving.app import create_app
    from flamingo.serving.engine import Engine
    from flamingo.serving.limits import ServerSettings

    model = load_model(saved)
    with TestClient(create_app(Engine(model), ServerSettings(model_name="idefics"))) as client:
        api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", http_client=client)
        messages = [{"role": "user", "content": [{"type": "text", "text": "t5 t6"},
                                                 {"type": "image_url",
                                                  "image_url": {"url": data_url(ENGINE_PICTURES[0])}}]}]
        answer = api.chat.completions.create(model="idefics", messages=messages, max_tokens=6)
        chat_text = idefics.MEDIA_FAMILY.chat_text(model, [ChatMessage("user", ["t5 t6", MEDIA])])
        assert chat_text == "User: t5 t6<image><end_of_utterance>\nAssistant:"
        expected = generate_text(model, text_prompt(chat_text, [ENGINE_PICTURES[0]]), max_new_tokens=6)
        assert answer.choices[0].message.content == expected and answer.usage.prompt_tokens > 0
        stream = api.chat.completions.create(model="idefics", messages=messages, max_tokens=6, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        text, pictures = ENGINE_REQUESTS[0]
        images = {"images": [data_url(ENGINE_PICTURES[i]) for i in pictures]}
        completion = api.completions.create(model="idefics", prompt=text, max_tokens=5, extra_body=images)
        assert completion.choices[0].text == engine_reference(model, text, pictures, 5)
        streamed = api.completions.create(model="idefics", prompt=text, max_tokens=5, stream=True, extra_body=images)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text


def test_flamingo_chat_on_an_idefics_uses_the_instruct_format(saved, tmp_path):
    from flamingo.inference.chat import run_chat
    from flamingo.inference.generation import GenerationConfig

    model = load_model(saved)
    ENGINE_PICTURES[1].save(tmp_path / "picture.png")
    script = iter([f"/image {tmp_path / 'picture.png'}", "t5 t6", "t7", "/quit"])
    shown = []
    history = run_chat(model, GenerationConfig(max_new_tokens=5), lambda prompt: next(script), shown.append)
    first = idefics.chat_inputs(model, [{"role": "user", "content": [ENGINE_PICTURES[1], "t5 t6"]}])
    ids, _ = idefics.generate_ids(model, first, max_new_tokens=5)
    reply = model.tokenizer.decode(ids, skip_special_tokens=True)
    assert history[1].message.content == [reply.strip()] and reply in "".join(shown)
    assert [turn.message.role for turn in history] == ["user", "assistant", "user", "assistant"]


def test_flamingo_eval_offline_runs_on_an_idefics_checkpoint(saved, tmp_path):
    from flamingo.cli import main

    assert main(["eval-offline", "--model", str(saved), "--task", "induction", "--shots", "0,2", "--seeds", "1",
                 "--episodes", "3", "--json", str(tmp_path / "out.json")]) in (0, None)
    assert json.loads((tmp_path / "out.json").read_text())


# ------------------------------------------------- a base model: </s> ends each example (no <end_of_utterance>)
BASE_SUPPORT = [image(80, 50, 40), "t5 t6</s>", image(81, 30, 60), "t7 t8</s>"]
BASE_QUERIES = [[image(82, 40, 40), "t9"], ["t10 t11", image(83, 60, 30), "t12"], ["t13 t14"]]
BASE_CLASSES = ["t20", "t21 t22", "t23"]


@pytest.fixture(scope="module")
def base_idefics(tmp_path_factory):
    """idefics-9b's layout with a base tokenizer, saved by transformers and loaded: the processor,
    the reference and our model."""
    torch.manual_seed(1)
    config = tiny_idefics_config(**VARIANTS["resampler, float gates, qk norms"])
    config.additional_vocab_size = 2
    reference = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():  # as the `family` fixture: gates and norms away from their initial values
        for name, param in reference.named_parameters():
            if "alpha" in name:
                param.copy_(0.8 + 0.1 * torch.randn_like(param))
            elif "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=28),
                                 tokenizer=tiny_tokenizer(instruct=False))
    directory = tmp_path_factory.mktemp("idefics-base")
    save_checkpoint(reference, processor, directory)
    model = load_model(directory)
    assert model.config.end_of_chunk_token == "</s>" and model.config.cross_attention.no_media_after_eos
    return processor, reference, model


def reference_logprobs(processor, reference, items, candidates) -> list[float]:
    """transformers' summed log-probability of each candidate continuing the interleaved items."""
    inputs = processor(text=[items], return_tensors="pt")
    logprobs = []
    with torch.no_grad():
        for name in candidates:
            ids = processor.tokenizer(name, add_special_tokens=False)["input_ids"]
            mask = inputs["image_attention_mask"]
            mask = torch.cat([mask, mask[:, -1:].expand(-1, len(ids), -1)], 1)  # as generate extends it
            logits = reference(input_ids=torch.cat([inputs["input_ids"], torch.tensor([ids])], 1),
                               pixel_values=inputs["pixel_values"], image_attention_mask=mask).logits
            logits = logits[0, inputs["input_ids"].shape[1] - 1:-1]
            logprobs.append(float(logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum()))
    return logprobs


def test_a_few_shot_context_on_a_base_idefics_sees_no_image_after_its_end_of_sequence(base_idefics):
    """The support examples end with </s>: the text of a query before its own image (its first
    <fake_token_around_image>, or all of a text-only query) sees no support image, as in the
    reference, though the query continues the cached context."""
    from flamingo.inference import FewShotContext

    processor, reference, model = base_idefics
    expected = torch.tensor([reference_logprobs(processor, reference, BASE_SUPPORT + query, BASE_CLASSES)
                             for query in BASE_QUERIES])
    context = FewShotContext(model, BASE_SUPPORT)
    order, scores = context.rank(BASE_QUERIES, BASE_CLASSES)
    assert float((scores - expected).abs().max()) <= TOLERANCE
    assert order.tolist() == expected.argsort(1, descending=True).tolist()
    scored = context.score(BASE_QUERIES, BASE_CLASSES)
    assert float((scored.sum_logprob - expected).abs().max()) <= TOLERANCE


def test_the_engine_over_a_base_idefics_continues_a_prefix_after_its_end_of_sequence(base_idefics):
    """Rankings whose cached prefix ends with </s> (a miss, then hits), and without the prefix
    cache, all equal the reference's log-probabilities."""
    import asyncio

    from flamingo.serving.engine import Engine, EngineConfig

    processor, reference, model = base_idefics
    support_text = "<image>t5 t6</s><image>t7 t8</s>"
    pictures = [png(BASE_SUPPORT[0]), png(BASE_SUPPORT[2])]
    # a miss (the support set cached), a hit, and a miss whose own prefix (cut before its image)
    # continues the cached support set with "t10 t11<fake_token_around_image>"
    queries = [("t13 t14", []), ("t15 t16", []), ("t10 t11<image>t12", [BASE_QUERIES[1][1]])]

    async def rank_all(config):
        engine = Engine(model, config)
        await engine.start()
        try:
            return [await engine.rank(support_text + text, pictures + [png(p) for p in own], BASE_CLASSES)
                    for text, own in queries], engine.metrics
        finally:
            await engine.stop()

    cached, metrics = asyncio.run(rank_all(None))
    assert metrics.prefix_cache_misses._value.get() == 2 and metrics.prefix_cache_hits._value.get() == 1
    uncached, _ = asyncio.run(rank_all(EngineConfig(prefix_cache_bytes=0)))
    for (text, own), hit, plain in zip(queries, cached, uncached):
        items = BASE_SUPPORT + ([text] if not own else ["t10 t11", own[0], "t12"])
        expected = torch.tensor(reference_logprobs(processor, reference, items, BASE_CLASSES))
        assert float((torch.tensor(hit) - expected).abs().max()) <= TOLERANCE
        assert float((torch.tensor(plain) - expected).abs().max()) <= TOLERANCE


def vqa_train_config(tmp_path, converted, **model_fields):
    """A training config (`flamingo train`) from the converted model (its config.yaml as the model section,
    with `model_fields`) on 4 tiny VQA records (words the tiny tokenizer knows): 3 steps of 2."""
    import eval_fixtures
    import yaml

    eval_fixtures.write_data_config(tmp_path / "data.yaml", {
        "vqav2": (tmp_path / "vqa", eval_fixtures.write_vqa_in_words(tmp_path / "vqa", train=4, test=2))})
    model = {**yaml.safe_load((converted / "config.yaml").read_text()), **model_fields}
    config = {"model": model, "init_from": str(converted), "steps": 3, "device": "cpu", "optim": {"lr": 1e-2},
              "run_dir": str(tmp_path / "run"), "logging": {"every": 1},
              "datasets": [{"name": "vqa", "kind": "task", "task": "vqav2", "data": str(tmp_path / "data.yaml"),
                            "batch_size": 2}]}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "train.yaml"


def test_idefics_training_samples_are_its_processors_inputs_and_the_loss_is_the_references(family, saved,
                                                                                            tmp_path):
    """A VQA record becomes exactly what IdeficsProcessor builds for its demo text and image (BOS, the
    fake tokens around <image>, its pixels), the loss on the answer and <end_of_utterance> only; a
    batch's training loss equals the NLL of IdeficsForVisionText2Text's logits under the same labels
    (its own `labels=` loss fails: it views the [V + 3]-wide logits as V wide, a RuntimeError in
    transformers 5.24; so the NLL is computed here from its logits)."""
    from flamingo.data.batch import collate
    from flamingo.data.benchmarks.media import read_media
    from flamingo.model.families.convert import convert_family
    from flamingo.training.config import load_train_config
    from flamingo.training.data import build_sources

    processor, reference, _ = family
    model = load_model(saved)
    path = vqa_train_config(tmp_path, convert_family(saved, tmp_path / "ours"))
    source = build_sources(load_train_config(path), model)["vqa"]
    samples, items = [], []
    for record in source.samples[:2]:
        samples.append(source.build(record, np.random.default_rng(0)))
        answer = f"{source.task.query_text(record)} {source.task.demo_answer(record)}<end_of_utterance>"
        items.append([*read_media(record, False, source.sampling), answer])
    inputs = processor(text=items, return_tensors="pt")
    batch = collate(samples, source.pad_token_id)
    assert inputs["input_ids"][0, :4].tolist() == [1, FAKE, IMAGE, FAKE]
    assert torch.equal(batch.input_ids, inputs["input_ids"]) and torch.equal(batch.attention_mask,
                                                                             inputs["attention_mask"])
    assert torch.equal(batch.pixel_values[:, :, 0], inputs["pixel_values"]) and not batch.vision_inputs
    answer = model.tokenizer(f" {source.task.demo_answer(source.samples[0])}", add_special_tokens=False)["input_ids"]
    assert samples[0].labels[samples[0].labels != -100].tolist() == answer + [END_OF_UTTERANCE]
    with torch.no_grad():
        ours = model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                     num_media=batch.num_media, labels=batch.labels).loss
        logits = reference(**inputs).logits
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
    assert abs(float(ours) - float(theirs)) <= TOLERANCE


def test_idefics_training_loss_on_a_padded_multi_image_batch_equals_the_references(family):
    """Flamingo.forward(labels): 2, 0 and 1 images per sample, text before the first image, an end of
    sequence between documents, loss on text only: the NLL of the reference's logits within 1e-5."""
    processor, reference, model = family
    inputs = processor(text=[["t9", image(40, 30, 60), "t5 t6", image(41, 60, 30), "t7 </s> t8 t9"], ["t8 t9 t10"],
                             ["t11", image(42, 28, 28), "t12 t13"]], return_tensors="pt")
    ids = inputs["input_ids"]
    labels = ids.masked_fill((inputs["attention_mask"] == 0) | (ids == IMAGE) | (ids == FAKE), -100)
    counts = (ids == IMAGE).sum(1)
    with torch.no_grad():
        ours = model(ids, inputs["pixel_values"][:, :, None], attention_mask=inputs["attention_mask"], labels=labels,
                     num_media=counts).loss
        logits = reference(**inputs).logits
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert abs(float(ours) - float(theirs)) <= TOLERANCE


def test_flamingo_train_from_a_converted_idefics_trains_its_cross_attention_and_what_unfreeze_names(saved,
                                                                                                   tmp_path):
    """flamingo train with the converted model's config.yaml as its model section (the vision tower
    unfrozen) and the converted directory as init_from, on VQA records and image-text pairs: the
    final model loads and generates; the bridge and the CLIP tower changed, the LLaMA is
    bit-identical to the base's."""
    from flamingo.cli import main
    from flamingo.model.families.convert import convert_family

    import yaml

    converted = convert_family(saved, tmp_path / "ours")
    path = vqa_train_config(tmp_path, converted, unfreeze={"vision": True, "lm_blocks": []})
    (tmp_path / "pairs").mkdir()
    for i, picture in enumerate(ENGINE_PICTURES):  # and image-text pairs, in IDEFICS's format too
        picture.save(tmp_path / "pairs" / f"{i}.png")
        (tmp_path / "pairs" / f"{i}.txt").write_text(f"t{20 + i} t{30 + i}")
    config = yaml.safe_load(path.read_text())
    config["datasets"].append({"name": "pairs", "kind": "pairs", "path": str(tmp_path / "pairs"), "batch_size": 2,
                               "filter_images": False})
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) in (0, None)
    base, tuned = load_model(converted), load_model(tmp_path / "run" / "final")
    assert tuned.family == idefics.FAMILY and tuned.config.unfreeze.vision
    before, after = base.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    bridge = {name for name, param in base.named_parameters() if param.requires_grad}
    tower = {name for name in before if name.startswith("vision_encoder.")}
    assert changed <= bridge | tower and changed & tower
    assert {name for name in bridge if ".cross_attn." in name} <= changed
    text, pictures = ENGINE_REQUESTS[2]
    assert isinstance(engine_reference(tuned, text, pictures, 4), str)


def test_training_a_converted_idefics_resumes_exactly_from_a_mid_run_checkpoint(saved, tmp_path):
    """4 steps in one go, and 2 then 2 more resumed from the step-2 checkpoint (the model rebuilt from
    the converted base, its trained tensors from the checkpoint): the same final tensors, bit for bit."""
    import yaml
    from safetensors.torch import load_file

    from flamingo.model.families.convert import convert_family
    from flamingo.training.config import load_train_config
    from flamingo.training.trainer import train

    path = vqa_train_config(tmp_path, convert_family(saved, tmp_path / "ours"))
    config = yaml.safe_load(path.read_text())
    runs = []
    for name in ("full", "resumed"):
        path.write_text(yaml.safe_dump({**config, "steps": 4, "run_dir": str(tmp_path / name),
                                        "checkpoint": {"every": 2, "keep": 5}}))
        resume = tmp_path / "full" / "checkpoints" / "step-00000002" if name == "resumed" else None
        runs.append(train(load_train_config(path), resume=resume))
    assert runs[1].step == 4 and len(runs[1].history) == 2
    a, b = (load_file(str(run.final_dir / "bridge.safetensors")) for run in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_a_converted_idefics_on_data_in_our_prompt_format_is_refused(saved, tmp_path):
    """Only kind: task datasets write IDEFICS's inputs: flamingo train with a synthetic dataset is
    refused before any step, naming the dataset and the format the model needs; so is building that
    dataset for an IDEFICS model, and a model section that is not the converted model's."""
    import yaml
    from bad_input import run_cli

    from flamingo.model.families.convert import convert_family
    from flamingo.training.config import load_train_config
    from flamingo.training.data import build_sources

    converted = convert_family(saved, tmp_path / "ours")
    path = vqa_train_config(tmp_path, converted)
    config = yaml.safe_load(path.read_text())
    config["datasets"].append({"name": "shapes", "kind": "synthetic_shapes", "batch_size": 2})
    path.write_text(yaml.safe_dump(config))
    expect = ["training a IDEFICS", "'shapes' (kind synthetic_shapes)", "<fake_token_around_image><image>"]
    run_cli(["train", str(path)], watch=[converted], expect=expect)
    assert not (tmp_path / "run" / "final").exists()
    with pytest.raises(UserError, match="<fake_token_around_image><image><fake_token_around_image>"):
        build_sources(load_train_config(path), load_model(saved))
    config["datasets"].pop()
    config["model"]["cross_attention"]["every"] = 1
    path.write_text(yaml.safe_dump(config))
    run_cli(["train", str(path)], watch=[converted], expect=["cross_attention differ", "only unfreeze may change"])
