"""Inference is exact: cached = uncached, beam-1 = greedy, few-shot context reuse = full prompt,
batched = unbatched, scores = manual log-prob sums; stops and streaming behave."""

from __future__ import annotations

import pytest
import torch
from conftest import build_with_vision, randomize_gates, solid_image

from flamingo.inference.generation import GenerationConfig, GenerationConfigError, generate
from flamingo.inference.prompt import Prompt, PromptError, encode_prompt_media, interleaved_prompt, text_prompt
from flamingo.inference.scoring import rank_classes, score_candidates
from flamingo.inference.state import FlamingoState, encode_prompts, extend, extend_contexts

RED, BLUE, GREEN, GREY = (solid_image(c) for c in ("red", "blue", "green", "grey"))
NO_STOP = dict(stop_at_end_of_chunk=False)


def full_logits(model, prompt: Prompt, extra_ids=()):
    """Uncached reference: the whole prompt (plus extra ids) in one forward pass."""
    state_free_ids = model.tokenizer(prompt.text)["input_ids"] + list(extra_ids)
    processor = model.vision_encoder.image_processor()
    pixels = (torch.stack([processor.preprocess_video(m) for m in prompt.media])[None]
              if prompt.media else None)
    with torch.no_grad():
        return model(torch.tensor([state_free_ids]), pixels).logits[0]


def test_cached_decoding_equals_uncached_logits(model):
    prompt = text_prompt("<image>An image of a red square.<|endofchunk|><image>An image of", [RED, BLUE])
    result = generate(model, encode_prompts(model, [prompt]), GenerationConfig(max_new_tokens=6, **NO_STOP))[0]
    assert len(result.token_ids) == 6
    state = encode_prompts(model, [prompt])
    for i, token in enumerate(result.token_ids):
        reference = full_logits(model, prompt, result.token_ids[:i])[-1]
        assert torch.allclose(state.next_token_logits[0], reference, atol=1e-4, rtol=1e-4), i
        assert int(reference.argmax()) == token
        state.step(model, torch.tensor([[token]]))


def test_beam_width_one_equals_greedy_and_beams_rank_by_score(model):
    prompts = [text_prompt("<image>An image of", [RED]), text_prompt("Output:<image> two", [GREEN])]
    state = encode_prompts(model, prompts)
    greedy = generate(model, state, GenerationConfig(max_new_tokens=5, **NO_STOP))
    beam1 = generate(model, state, GenerationConfig(max_new_tokens=5, num_beams=1, **NO_STOP))
    assert [g.token_ids for g in greedy] == [b.token_ids for b in beam1]
    beam3 = generate(model, state, GenerationConfig(max_new_tokens=5, num_beams=3, length_penalty=0.0, **NO_STOP))
    for b, result in enumerate(beam3):
        # the beam's score is its true log-probability, and at least as good as greedy's
        full = full_logits(model, prompts[b], result.token_ids[:-1])
        n = len(result.token_ids)
        logp = full[-n:].log_softmax(-1).gather(-1, torch.tensor(result.token_ids)[:, None]).sum()
        assert result.score == pytest.approx(float(logp), abs=1e-3)
        greedy_full = full_logits(model, prompts[b], greedy[b].token_ids[:-1])
        greedy_logp = greedy_full[-n:].log_softmax(-1).gather(-1, torch.tensor(greedy[b].token_ids)[:, None]).sum()
        assert result.score >= float(greedy_logp) - 1e-4


def test_state_is_not_consumed_by_generation(model):
    state = encode_prompts(model, [text_prompt("<image>An image of", [RED])])
    before = state.next_token_logits.clone(), state.length
    first = generate(model, state, GenerationConfig(max_new_tokens=4, **NO_STOP))
    second = generate(model, state, GenerationConfig(max_new_tokens=4, num_beams=2, **NO_STOP))
    assert torch.equal(state.next_token_logits, before[0]) and state.length == before[1]
    assert first == generate(model, state, GenerationConfig(max_new_tokens=4, **NO_STOP))
    assert second


@pytest.mark.parametrize("mode", ["previous", "all_previous"])
def test_few_shot_context_reuse_equals_full_prompts(lm_dir, clip_dir, mode):
    m = build_with_vision(lm_dir("llama"), clip_dir, **{"cross_attention.media_attention": mode})
    randomize_gates(m)
    support = text_prompt("<image>Output: a red square.<|endofchunk|><image>Output: a blue square.<|endofchunk|>",
                          [RED, BLUE])
    queries = [text_prompt("<image>Output:", [GREEN]),
               text_prompt("Look:<image> and<image> Output: two", [GREY, RED]),
               text_prompt(" no image here, Output:", [])]
    context = encode_prompts(m, [support])
    state = extend(m, context, queries)
    config = GenerationConfig(max_new_tokens=4, **NO_STOP)
    reused = generate(m, state, config)
    beams = generate(m, state, GenerationConfig(max_new_tokens=4, num_beams=2, **NO_STOP))
    scores = score_candidates(m, state, ["a green square", "red"])
    for i, query in enumerate(queries):
        full = Prompt(support.text + query.text, support.media + query.media)
        alone = encode_prompts(m, [full])
        assert torch.allclose(state.next_token_logits[i], alone.next_token_logits[0], atol=1e-4, rtol=1e-4)
        assert generate(m, alone, config)[0].token_ids == reused[i].token_ids
        assert generate(m, alone, GenerationConfig(max_new_tokens=4, num_beams=2, **NO_STOP))[0].token_ids == \
            beams[i].token_ids
        alone_scores = score_candidates(m, alone, ["a green square", "red"])
        assert torch.allclose(scores.sum_logprob[i], alone_scores.sum_logprob[0], atol=1e-3)


@pytest.mark.parametrize("mode", ["previous", "all_previous"])
def test_several_contexts_extended_in_one_pass_equal_full_prompts(lm_dir, clip_dir, mode):
    """Contexts of different lengths and image counts (2 images, none, 1), each with its own
    queries, continued in one forward pass: every row equals its whole prompt encoded alone."""
    m = build_with_vision(lm_dir("llama"), clip_dir, **{"cross_attention.media_attention": mode})
    randomize_gates(m)
    contexts = [text_prompt("<image>Output: a red square.<|endofchunk|><image>Output: a blue square.<|endofchunk|>",
                            [RED, BLUE]),
                text_prompt("A conversation between a user and an assistant who describes images.\nUser: ", []),
                text_prompt("<image>This is a dax.<|endofchunk|>", [GREEN])]
    queries = [[text_prompt("<image>Output:", [GREEN]), text_prompt(" no image here, Output:", [])],
               [text_prompt("<image>What is this?\nAssistant:", [GREY])],
               [text_prompt("Look:<image> and<image> This is a", [GREY, RED]), text_prompt("<image>This is a", [BLUE])]]
    state = extend_contexts(m, [encode_prompts(m, [c]) for c in contexts], queries)
    config = GenerationConfig(max_new_tokens=4, **NO_STOP)
    together = generate(m, state, config)
    rows = [(context, query) for context, group in zip(contexts, queries) for query in group]
    assert state.batch_size == len(rows) == 5
    for i, (context, query) in enumerate(rows):
        alone = encode_prompts(m, [Prompt(context.text + query.text, context.media + query.media)])
        assert torch.allclose(state.next_token_logits[i], alone.next_token_logits[0], atol=1e-4, rtol=1e-4), i
        assert generate(m, alone, config)[0].token_ids == together[i].token_ids, i
    with pytest.raises(PromptError, match="one non-empty list of queries per context"):
        extend_contexts(m, [encode_prompts(m, [contexts[0]])], [[]])


def test_extending_contexts_projects_only_the_queries_own_images(lm_dir, clip_dir, monkeypatch):
    """The cross-attention keys/values of a context's images are computed once, when it is
    encoded: extending it (one few-shot support set, many queries) projects only the queries'
    own images, and the keys/values it lays out equal projecting each row's images whole."""
    m = build_with_vision(lm_dir("llama"), clip_dir, **{"cross_attention.media_attention": "all_previous"})
    randomize_gates(m)
    contexts = [encode_prompts(m, [text_prompt("<image>Output: red.<|endofchunk|><image>Output: blue.<|endofchunk|>",
                                               [RED, BLUE])]),
                encode_prompts(m, [text_prompt("User: ", [])])]
    queries = [[text_prompt("<image>Output:", [GREEN]), text_prompt(" no image, Output:", [])],
               [text_prompt("<image>What is this?", [GREY])]]
    projected, originals = [], {}
    for layer, block in m.cross_attn_layers.items():
        originals[layer] = block.attn.key_values
        monkeypatch.setattr(block.attn, "key_values",
                            lambda tokens, f=originals[layer]: (projected.append(tokens.shape[:2]), f(tokens))[1])
    state = extend_contexts(m, contexts, queries)
    per_media = state.visual_tokens.shape[2]
    assert projected == [(3, per_media)] * len(m.cross_attn_layers)  # 3 queries, one image slot each
    for layer, (keys, values) in state.kv_cache.items():
        whole_keys, whole_values = originals[layer](state.visual_tokens.flatten(1, 2))
        for row, images in enumerate(state.num_media.tolist()):
            real = slice(0, images * per_media)
            assert torch.allclose(keys[row, :, real], whole_keys[row, :, real], atol=1e-6), (layer, row)
            assert torch.allclose(values[row, :, real], whole_values[row, :, real], atol=1e-6), (layer, row)
    assert state.num_media.tolist() == [3, 2, 1]


def test_batched_prompts_equal_each_alone(model):
    prompts = [text_prompt("<image>An image of a red<|endofchunk|><image>An image of", [RED, BLUE]),
               text_prompt("Question: what is it? Answer:", []),
               interleaved_prompt(["Look at this", [GREEN, GREY], " video. It shows"])]  # a 2-frame video
    state = encode_prompts(model, prompts)
    config = GenerationConfig(max_new_tokens=5, **NO_STOP)
    batched = generate(model, state, config)
    batched_beam = generate(model, state, GenerationConfig(max_new_tokens=5, num_beams=3, **NO_STOP))
    for i, prompt in enumerate(prompts):
        alone = encode_prompts(model, [prompt])
        assert torch.allclose(state.next_token_logits[i], alone.next_token_logits[0], atol=1e-4, rtol=1e-4)
        assert generate(model, alone, config)[0].token_ids == batched[i].token_ids
        assert generate(model, alone, GenerationConfig(max_new_tokens=5, num_beams=3, **NO_STOP))[0].token_ids == \
            batched_beam[i].token_ids


def test_media_encoded_a_few_at_a_time_land_in_their_slots(model):
    """encode_prompt_media's chunks (a few images per vision call on a CPU) put every image's tokens
    in its own prompt and slot, with zeros in padding slots, whatever the chunk size."""
    prompts = [text_prompt("<image><image><image>", [RED, BLUE, GREEN]), text_prompt("none", []),
               text_prompt("<image>", [GREY]), interleaved_prompt([[GREEN, GREY], "a video", RED])]
    whole, counts = encode_prompt_media(model, prompts, chunk=32)
    assert counts.tolist() == [3, 0, 1, 2] and whole.shape[1] == 3
    for chunk in (1, 2, None):
        tokens, _ = encode_prompt_media(model, prompts, chunk=chunk)
        assert torch.allclose(tokens, whole, atol=1e-5)
    alone, _ = encode_prompt_media(model, [text_prompt("<image>", [BLUE])])
    assert torch.allclose(whole[0, 1], alone[0, 0], atol=1e-5)
    assert not whole[1].any() and not whole[2, 1:].any()


def test_scores_equal_a_manual_sum_of_log_probs(model):
    prompts = [text_prompt("<image>Output:", [RED]), text_prompt("<image>Output: a", [BLUE])]
    candidates = [[" red circle", " blue", " a green square"], [" square"]]
    scores = score_candidates(model, encode_prompts(model, prompts), candidates)
    for b, options in enumerate(candidates):
        for c, text in enumerate(options):
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            logits = full_logits(model, prompts[b], ids)
            logp = logits[-len(ids) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum()
            assert float(scores.sum_logprob[b, c]) == pytest.approx(float(logp), abs=1e-4)
            assert int(scores.num_tokens[b, c]) == len(ids)
    assert scores.sum_logprob[1, 1] == float("-inf")  # ragged lists are padded
    order, values = rank_classes(model, encode_prompts(model, prompts), [" red", " blue", " green"], max_rows=2)
    assert torch.equal(order, values.argsort(-1, descending=True))
    assert torch.allclose(values, score_candidates(model, encode_prompts(model, prompts),
                                                   [" red", " blue", " green"]).sum_logprob)


def test_scoring_chunks_by_length_and_prompt_equal_manual_sums(model):
    """Candidates of 1-3+ tokens, ragged and shared lists, chunks smaller than a prompt's rows
    and chunks spanning prompts with different image counts: every score is the manual sum."""
    prompts = [text_prompt("<image>Output:", [RED]), text_prompt("Look:<image> and<image> Output:", [BLUE, GREEN]),
               text_prompt(" no image, Output:", [])]
    state = encode_prompts(model, prompts)
    shared = [" red", " a blue square", " green circle", " grey", " a red circle here", " blue"]
    ragged = [shared, [" square", " a green"], shared[::-1]]
    manual = {}
    for b, options in enumerate(ragged):
        for text in set(options) | set(shared):
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            logits = full_logits(model, prompts[b], ids)
            logp = logits[-len(ids) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum()
            manual[b, text] = (float(logp), len(ids))
    for candidates in (shared, ragged):
        lists = candidates if isinstance(candidates[0], list) else [candidates] * len(prompts)
        for max_rows in (1, 2, 5, 128):
            scores = score_candidates(model, state, candidates, max_rows=max_rows)
            for b, options in enumerate(lists):
                for c, text in enumerate(options):
                    logp, length = manual[b, text]
                    assert float(scores.sum_logprob[b, c]) == pytest.approx(logp, abs=1e-4), (b, c, max_rows)
                    assert int(scores.num_tokens[b, c]) == length
    assert len({len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in shared}) >= 3


def test_few_row_output_head_equals_the_linear_layer():
    from flamingo.model.language_model import _few_rows_linear

    torch.manual_seed(0)
    for bias in (False, True):
        linear = torch.nn.Linear(24, 300, bias=bias)
        for shape in ((1, 24), (2, 1, 24), (3, 1, 24), (1, 5, 24), (16, 24), (4, 9, 24)):
            hidden = torch.randn(shape)
            with torch.no_grad():
                out = _few_rows_linear(linear, hidden)
            assert out.shape == (*shape[:-1], 300)
            assert torch.allclose(out, linear(hidden), atol=1e-5, rtol=1e-5)
        hidden = torch.randn(2, 24, requires_grad=True)
        assert _few_rows_linear(linear, hidden).requires_grad  # with grad: the module itself


def test_stops_at_end_of_chunk_and_stop_strings_and_streams(model):
    prompt = text_prompt("<image>An image of", [RED])
    state = encode_prompts(model, [prompt])
    free = generate(model, state, GenerationConfig(max_new_tokens=8, **NO_STOP))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 2]
    assert stop.strip(), free.text
    pieces = []
    stopped = generate(model, state, GenerationConfig(max_new_tokens=8, stop_strings=(stop,), **NO_STOP),
                       on_text=lambda row, text: pieces.append(text))[0]
    assert stopped.finish_reason == "stop_string"
    assert stopped.text == free.text[:free.text.find(stop)]
    assert "".join(pieces) == stopped.text  # the stop string itself is never streamed

    # Make <|endofchunk|> the model's favourite token: generation stops at once, without it.
    with torch.no_grad():
        model.output_head.new_rows[model.eoc_token_id - model.output_head.first_new_id] *= 0
        bias = model.output_head.new_rows
        saved = bias.clone()
        hidden_direction = model.lm.get_output_embeddings().base.weight.mean(0)
        bias[model.eoc_token_id - model.output_head.first_new_id] = 1e4 * hidden_direction.sign()
    try:
        ended = generate(model, encode_prompts(model, [prompt]), GenerationConfig(max_new_tokens=8))[0]
        assert ended.finish_reason == "stop_token" and ended.token_ids == [] and ended.text == ""
        beam = generate(model, encode_prompts(model, [prompt]), GenerationConfig(max_new_tokens=8, num_beams=3))[0]
        assert beam.finish_reason == "stop_token"
    finally:
        with torch.no_grad():
            model.output_head.new_rows.copy_(saved)


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    state = encode_prompts(model, [text_prompt("<image>An image of", [RED])])
    sample = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, **NO_STOP)
    assert generate(model, state, sample)[0].token_ids == generate(model, state, sample)[0].token_ids
    top1 = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=1, seed=4, **NO_STOP)
    greedy = GenerationConfig(max_new_tokens=6, **NO_STOP)
    assert generate(model, state, top1)[0].token_ids == generate(model, state, greedy)[0].token_ids
    nucleus = GenerationConfig(max_new_tokens=6, do_sample=True, top_p=1e-6, seed=5, **NO_STOP)
    assert generate(model, state, nucleus)[0].token_ids == generate(model, state, greedy)[0].token_ids


def test_bad_requests_give_specific_errors(model, tmp_path):
    with pytest.raises(PromptError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        text_prompt("<image> hi", [RED, BLUE])
    with pytest.raises(PromptError, match="contains '<image>'"):
        interleaved_prompt(["a <image> b", RED])
    with pytest.raises(PromptError, match="expected text, a PIL image"):
        interleaved_prompt([3])
    long_text = "the quick brown fox " * 200
    with pytest.raises(PromptError, match=r"tokens and 10 new tokens are asked for, \d+ in all, but the language "
                                          r"model's context is 256 tokens"):
        encode_prompts(model, [Prompt(long_text)], max_new_tokens=10)
    for options, field in [(dict(temperature=0), "temperature"), (dict(top_p=1.5), "top_p"),
                           (dict(num_beams=0), "num_beams"), (dict(max_new_tokens=0), "max_new_tokens"),
                           (dict(do_sample=True, num_beams=2), "do_sample")]:
        with pytest.raises(GenerationConfigError, match=field):
            GenerationConfig(**options)
    with pytest.raises(TypeError):
        GenerationConfig(beams=3)  # unknown option names are refused by the dataclass


def test_concatenated_states_continue_as_each_alone(model):
    """Sequences of different lengths and image counts in one batch (as the serving engine
    joins requests to its running batch): each continues exactly as it would alone, also after
    the longest ones leave and the all-padding columns are dropped."""
    prompts = [text_prompt("<image>An image of a red<|endofchunk|><image>An image of", [RED, BLUE]),
               text_prompt("Question: what is it? Answer:", []),
               text_prompt("<image>Output:", [GREEN])]
    alone = [encode_prompts(model, [p]) for p in prompts]
    shared = encode_prompts(model, [prompts[2]]).repeat_rows(2)  # two rows sharing one media row
    state = FlamingoState.concat([alone[0], alone[1], shared])
    assert state.batch_size == 4 and state.visual_tokens.shape[:2] == (4, 2)
    tokens = torch.tensor([[5], [7], [9], [11]])
    state.step(model, tokens)
    for row, (single, token) in enumerate(zip([alone[0], alone[1], alone[2], alone[2].repeat_rows(1)], tokens)):
        single.step(model, token[None])
        assert torch.allclose(state.next_token_logits[row], single.next_token_logits[0], atol=1e-4, rtol=1e-4), row
    short = state.select_rows(torch.tensor([2, 3])).without_leading_padding()
    assert short.length == alone[2].length
    short.step(model, torch.tensor([[3], [3]]))
    alone[2].step(model, torch.tensor([[3]]))
    assert torch.allclose(short.next_token_logits[0], alone[2].next_token_logits[0], atol=1e-4, rtol=1e-4)
