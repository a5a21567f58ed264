"""The serving engine gives the same answers as the inference API, whatever runs beside a request;
its queue is bounded, cancelled requests free their slots, seeded sampling is reproducible."""

from __future__ import annotations

import asyncio
import io
import re
import threading

import pytest
import torch
from conftest import solid_image

from flamingo.errors import UserError
from flamingo.inference import generate_text, score_candidates, text_prompt
from flamingo.inference.generation import GenerationConfig, beam_search
from flamingo.inference.state import encode_prompts
from flamingo.serving.engine import (
    Delta,
    Engine,
    EngineConfig,
    EngineOverloaded,
    EngineRequest,
    EngineStopped,
    SamplingParams,
)
from flamingo.serving.model_runner import ModelRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COLOURS = ("red", "blue", "green", "grey", "yellow", "purple")


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    solid_image(colour).save(buffer, format="PNG")
    return buffer.getvalue()


def run(coroutine_function, model, config: EngineConfig | None = None):
    """Run `coroutine_function(engine)` against a started engine; stop it afterwards."""
    async def main():
        engine = Engine(model, config)
        await engine.start()
        try:
            return await coroutine_function(engine)
        finally:
            await engine.stop()
    return asyncio.run(main())


def run_queued(model, config: EngineConfig, requests, params) -> list:
    """Queue every request (text, colours) before the engine starts, then collect all answers."""
    async def main():
        engine = Engine(model, config)
        streams = [engine.generate(EngineRequest(text, [png(c) for c in colours], p))
                   for (text, colours), p in zip(requests, params)]
        await engine.start()
        try:
            return await asyncio.gather(*(collect(stream) for stream in streams))
        finally:
            await engine.stop()
    return asyncio.run(main())


async def collect(stream) -> tuple[dict[int, str], dict[int, Delta]]:
    texts: dict[int, str] = {}
    final: dict[int, Delta] = {}
    async for delta in stream:
        assert delta.index not in final, "a delta after the choice finished"
        texts[delta.index] = texts.get(delta.index, "") + delta.text
        if delta.finish_reason is not None:
            final[delta.index] = delta
    return texts, final


def reference(model, text: str, colours, **options) -> str:
    prompt = text_prompt(text, [solid_image(c) for c in colours])
    return generate_text(model, prompt, **options)


# Prompts of different lengths and image counts (0 to 3); some share a few-shot prefix.
SUPPORT = "<image>Output: a red square.<|endofchunk|><image>Output: a blue circle.<|endofchunk|>"
REQUESTS = [
    (SUPPORT + "<image>Output:", ("red", "blue", "green")),
    ("<image>An image of", ("grey",)),
    ("Question: what colour is the ball? Answer:", ()),
    (SUPPORT + "<image>Output: a", ("red", "blue", "yellow")),
    ("<image>Look at<image> these two. They are", ("purple", "red")),
    ("the quick brown fox", ()),
    (SUPPORT + "<image>Output:", ("red", "blue", "purple")),
    ("<image>This is a dax.<|endofchunk|><image>This is a", ("green", "blue")),
]


def test_engine_greedy_equals_generate_text_and_reports_usage(model):
    text, colours = REQUESTS[0]

    async def go(engine):
        return await collect(engine.generate(EngineRequest(text, [png(c) for c in colours],
                                                           SamplingParams(max_tokens=8))))

    texts, final = run(go, model)
    expected = reference(model, text, colours, max_new_tokens=8)
    assert texts == {0: expected}
    prompt_tokens = len(model.tokenizer(text)["input_ids"])
    assert final[0].prompt_tokens == prompt_tokens and 1 <= final[0].completion_tokens <= 8
    assert final[0].finish_reason in ("stop", "length")


def test_concurrent_requests_equal_each_alone(model):
    """8 requests of different lengths and image counts (0 to 3), 4 decode slots: the first four
    are prefilled together, the others join the running batch as slots free up (at different
    steps), and every answer equals the request's answer alone."""
    params = [SamplingParams(max_tokens=3 + i % 4 * 2, stop=("e",) if i == 5 else ()) for i in range(len(REQUESTS))]
    results = run_queued(model, EngineConfig(max_running=4, prefix_cache_bytes=0), REQUESTS, params)
    for i, ((text, colours), (texts, final)) in enumerate(zip(REQUESTS, results)):
        expected = reference(model, text, colours, max_new_tokens=params[i].max_tokens, stop_strings=params[i].stop)
        assert texts[0] == expected, i


def test_waiting_prompts_are_prefilled_in_chunks_before_the_next_decode_step(model, monkeypatch):
    """Prefill priority: 5 queued requests that all fit are admitted `prefill_chunk` (2) at a time,
    each chunk's first tokens sent at once, and only then does the decode batch step, with all 5.
    Before, a decode step ran after every admission, delaying the later requests' first tokens."""
    events = []
    admit, decode = ModelRunner.admit, ModelRunner.decode
    monkeypatch.setattr(ModelRunner, "admit", lambda self, jobs: events.append(("admit", len(jobs))) or admit(
        self, jobs))
    monkeypatch.setattr(ModelRunner, "decode", lambda self: events.append(("step", len(self.running))) or decode(self))
    requests = REQUESTS[:5]  # two share a few-shot prefix
    params = [SamplingParams(max_tokens=4)] * len(requests)
    results = run_queued(model, EngineConfig(max_running=8, prefill_chunk=2), requests, params)
    assert events[:4] == [("admit", 2), ("admit", 2), ("admit", 1), ("step", 5)]
    for (text, colours), (texts, _) in zip(requests, results):
        assert texts[0] == reference(model, text, colours, max_new_tokens=4)


def test_requests_joining_at_random_times_equal_each_alone(model):
    async def go(engine):
        async def one(i):
            await asyncio.sleep(0.02 * i)
            text, colours = REQUESTS[i]
            return await collect(engine.generate(EngineRequest(text, [png(c) for c in colours],
                                                               SamplingParams(max_tokens=6, n=1 + i % 2))))
        return await asyncio.gather(*(one(i) for i in range(len(REQUESTS))))

    results = run(go, model, EngineConfig(max_running=5))
    for i, ((text, colours), (texts, _)) in enumerate(zip(REQUESTS, results)):
        expected = reference(model, text, colours, max_new_tokens=6)
        assert texts == {c: expected for c in range(1 + i % 2)}, i


def test_prefix_cache_hit_equals_miss_and_the_full_prompt(model):
    """The support set is encoded once (a miss), then reused (hits); the answers equal those of
    the whole prompt encoded from scratch; the prompt is cut in token space (prefix + suffix ids
    are the prompt's ids); the images of a cached prefix are not decoded at submission, only if
    it must be encoded again."""
    queries = [REQUESTS[0], REQUESTS[3], REQUESTS[6], REQUESTS[0]]

    async def go(engine):
        answers = []
        for text, colours in queries:  # one at a time: the first misses, the others hit
            texts, _ = await collect(engine.generate(EngineRequest(text, [png(c) for c in colours],
                                                                   SamplingParams(max_tokens=6))))
            answers.append(texts[0])
        prompt = engine.processor.prompt(text, [png(c) for c in colours], 6)
        assert prompt.decoded[:2] == [None, None]  # cached: its images were not decoded
        return answers, prompt, engine.metrics

    answers, prompt, metrics = run(go, model)
    for (text, colours), answer in zip(queries, answers):
        assert answer == reference(model, text, colours, max_new_tokens=6)
    assert answers[0] == answers[3]
    assert metrics.prefix_cache_misses._value.get() == 1 and metrics.prefix_cache_hits._value.get() == 3
    assert prompt.ids == model.tokenizer(REQUESTS[0][0])["input_ids"]
    assert model.tokenizer.decode(prompt.ids[:prompt.split], skip_special_tokens=False).endswith(SUPPORT)
    pixels = prompt.pixels(0, prompt.split)  # decoded now, as for a prefix evicted before its request was encoded
    processor = model.vision_encoder.image_processor()
    assert len(pixels) == 2 and all(torch.equal(p, processor.preprocess_video([solid_image(c)]))
                                    for p, c in zip(pixels, colours[:2]))


def test_a_chat_turn_continues_the_previous_turns_cached_state(model, monkeypatch):
    """A chat is resent whole with each turn. It is cut at its last chunk boundary (before its last
    image, or after its last reply), and that prefix (a miss) continues the previous turn's cached
    prefix instead of encoding the conversation again: only turn 1 encodes anything from scratch
    (the whole turn in one pass, its prefix's state taken from that pass). Every answer equals
    generate_text's."""
    import flamingo.serving.model_runner as runner_module

    from_scratch = []
    encode_ids, encode_ids_and_prefix = runner_module.encode_ids, runner_module.encode_ids_and_prefix
    monkeypatch.setattr(runner_module, "encode_ids", lambda model, rows, *media: from_scratch.append(
        [model.tokenizer.decode(row) for row in rows]) or encode_ids(model, rows, *media))
    monkeypatch.setattr(runner_module, "encode_ids_and_prefix", lambda model, ids, *media: from_scratch.append(
        [model.tokenizer.decode(ids)]) or encode_ids_and_prefix(model, ids, *media))
    preamble = "A chat between User and Flamingo about the pictures User sends.\n"  # >= 32 tokens here
    turn1 = preamble + "User: <image>What is this?\nFlamingo:"
    turn2 = turn1 + " A red square.<|endofchunk|>\nUser: <image>And this?\nFlamingo:"
    turn3 = turn2 + " A blue one.<|endofchunk|>\nUser: Which is brighter?\nFlamingo:"
    turns = [(turn1, ("red",)), (turn2, ("red", "blue")), (turn3, ("red", "blue"))]

    async def go(engine):
        answers = []
        for text, colours in turns:
            texts, _ = await collect(engine.generate(EngineRequest(text, [png(c) for c in colours],
                                                                   SamplingParams(max_tokens=5))))
            answers.append(texts[0])
        return answers, engine.metrics

    answers, metrics = run(go, model)
    for (text, colours), answer in zip(turns, answers):
        assert answer == reference(model, text, colours, max_new_tokens=5)
    assert [[text.removeprefix(model.tokenizer.bos_token or "") for text in rows] for rows in from_scratch] == [
        [turn1]]  # turn 1 (its preamble cached from the same pass); turns 2 and 3 continue
    assert metrics.prefix_cache_misses._value.get() == 3


def test_prefix_cache_is_bounded_by_bytes_and_evicts_the_least_recently_used(model):
    other_support = "<image>Output: a green star.<|endofchunk|>"

    async def go(engine):
        for text, colours in [(SUPPORT + "<image>Output:", ("red", "blue", "green")),
                              (other_support + "<image>Output:", ("green", "red"))]:
            await collect(engine.generate(EngineRequest(text, [png(c) for c in colours], SamplingParams(max_tokens=2))))
        return engine.prefix_cache, engine.metrics

    async def size(engine):  # the bytes of one support state: the bound below holds one, never two
        await collect(engine.generate(EngineRequest(SUPPORT + "<image>Output:", [png(c) for c in ("red", "blue", "green")],
                                                    SamplingParams(max_tokens=1))))
        return engine.prefix_cache.bytes
    one_entry = run(size, model)
    cache, metrics = run(go, model, EngineConfig(prefix_cache_bytes=one_entry + 100))
    assert len(cache.entries) == 1 and cache.bytes <= one_entry + 100
    assert metrics.prefix_cache_evictions._value.get() == 1 and metrics.prefix_cache_bytes._value.get() == cache.bytes


def test_seeded_sampling_is_reproducible_and_equals_generate_text(model):
    text, colours = REQUESTS[1]
    params = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.95, seed=7, n=2)

    async def go(engine):
        request = EngineRequest(text, [png(c) for c in colours], params)
        return [await collect(engine.generate(request)) for _ in range(2)]

    (first, _), (second, _) = run(go, model)
    assert first == second
    for choice in range(2):  # choice i draws with seed + i
        assert first[choice] == reference(model, text, colours, max_new_tokens=6, do_sample=True, temperature=0.9,
                                          top_p=0.95, seed=7 + choice)


def test_beam_search_returns_the_n_best_hypotheses(model):
    text, colours = REQUESTS[4]

    async def go(engine):
        return await collect(engine.generate(EngineRequest(text, [png(c) for c in colours],
                                                           SamplingParams(max_tokens=5, num_beams=3, n=2))))

    texts, final = run(go, model)
    prompt = text_prompt(text, [solid_image(c) for c in colours])
    best = beam_search(model, encode_prompts(model, [prompt]), GenerationConfig(max_new_tokens=5, num_beams=3),
                       num_return=2)[0]
    assert texts == {0: best[0].text, 1: best[1].text}
    assert best[0].score >= best[1].score and set(final) == {0, 1}


def test_rank_equals_score_candidates(model):
    text, colours = REQUESTS[0]
    candidates = [" a green square.", " red", " a blue circle."]

    async def go(engine):
        return await engine.rank(text, [png(c) for c in colours], candidates)

    scores = run(go, model)
    state = encode_prompts(model, [text_prompt(text, [solid_image(c) for c in colours])])
    expected = score_candidates(model, state, [candidates]).sum_logprob[0]
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-4)


def test_a_long_ranking_does_not_stall_the_decode_batch(model, monkeypatch):
    """A ranking runs as a batch of its own, in passes of a bounded number of candidate tokens;
    between them, requests join the decode batch and decode: a short answer asked for while a
    long ranking runs ends before the ranking does, and both equal what they are alone."""
    import flamingo.serving.model_runner as engine_module

    started, submitted, finished = threading.Event(), threading.Event(), []
    score = engine_module.score_candidates

    def first_pass_waits(*args, before_step, **options):  # until the answer is asked for
        def hook():
            if not started.is_set():
                started.set()
                submitted.wait(60)
            before_step()
        return score(*args, before_step=hook, **options)

    monkeypatch.setattr(engine_module, "score_candidates", first_pass_waits)
    monkeypatch.setattr(engine_module, "RANK_TOKENS_PER_PASS", 64)
    candidates = [" a red circle" * k for k in range(1, 13)]  # 12 lengths: a pass (or more) each
    text, colours = REQUESTS[0]

    async def go(engine):
        ranking = asyncio.ensure_future(engine.rank("the quick brown fox", [], candidates))
        ranking.add_done_callback(lambda _: finished.append("ranking"))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        answer = asyncio.ensure_future(collect(engine.generate(EngineRequest(
            text, [png(c) for c in colours], SamplingParams(max_tokens=3)))))
        answer.add_done_callback(lambda _: finished.append("answer"))
        submitted.set()
        return await asyncio.gather(ranking, answer)

    scores, (texts, _) = run(go, model)
    assert finished == ["answer", "ranking"]
    assert texts[0] == reference(model, text, colours, max_new_tokens=3)
    state = encode_prompts(model, [text_prompt("the quick brown fox", [])])
    expected = score_candidates(model, state, [candidates]).sum_logprob[0]
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-4)


def test_full_queue_raises_engine_overloaded(model):
    async def go():
        engine = Engine(model, EngineConfig(max_queue=2))  # not started: nothing leaves the queue
        request = EngineRequest("<image>An image of", [png("red")], SamplingParams(max_tokens=2))
        streams = [engine.generate(request), engine.generate(request)]
        with pytest.raises(EngineOverloaded):
            engine.generate(request)
        return streams, engine.metrics.requests_rejected.labels("queue_full")._value.get()

    _, rejected = asyncio.run(go())
    assert rejected == 1


def test_cancelling_a_stream_frees_its_slot(model):
    async def go(engine):
        long = engine.generate(EngineRequest("the quick brown fox", [],
                                             SamplingParams(max_tokens=200, stop=("never",))))
        await long.__anext__()
        await long.aclose()  # the client went away
        with pytest.raises(StopAsyncIteration):
            await long.__anext__()
        # with one slot, this request can only finish if the cancelled one left it
        texts, final = await asyncio.wait_for(
            collect(engine.generate(EngineRequest("<image>An image of", [png("red")], SamplingParams(max_tokens=3)))),
            timeout=120)
        return texts, final

    texts, final = run(go, model, EngineConfig(max_running=1))
    assert texts[0] == reference(model, "<image>An image of", ("red",), max_new_tokens=3)


def test_request_stop_ends_running_and_waiting_requests_and_refuses_new_ones(model):
    """What Ctrl-C on `flamingo serve` does: the requests end at once with EngineStopped rather
    than decoding to their end."""
    async def go(engine):
        params = SamplingParams(max_tokens=200, stop=("never",))
        running = engine.generate(EngineRequest("the quick brown fox", [], params))
        waiting = engine.generate(EngineRequest("<image>An image of", [png("red")], params))  # one slot: it waits
        first = await running.__anext__()
        engine.request_stop()
        with pytest.raises(EngineStopped):
            engine.generate(EngineRequest("the quick brown fox", [], params))
        outcomes = []
        for stream in (running, waiting):
            deltas = []
            with pytest.raises(EngineStopped):
                async for delta in stream:
                    deltas.append(delta)
            outcomes.append(deltas)
        return first, outcomes

    first, (running_rest, waiting_deltas) = run(go, model, EngineConfig(max_running=1))
    assert first.finish_reason is None
    assert all(delta.finish_reason is None for delta in running_rest) and len(running_rest) < 199
    assert waiting_deltas == []


def test_request_stop_abandons_a_running_beam_search(model, monkeypatch):
    """Beam search runs as a batch of its own; Ctrl-C stops it between steps, not after its 200."""
    import flamingo.serving.model_runner as engine_module

    started, steps = threading.Event(), []
    run_alone, beam_search = ModelRunner.run_alone, engine_module.beam_search
    monkeypatch.setattr(ModelRunner, "run_alone", lambda self, *args: started.set() or run_alone(self, *args))
    monkeypatch.setattr(engine_module, "beam_search", lambda *args, before_step, **options: beam_search(
        *args, before_step=lambda: steps.append(1) or before_step(), **options))

    async def go(engine):
        stream = engine.generate(EngineRequest("the quick brown fox", [],
                                               SamplingParams(max_tokens=200, num_beams=2, stop=("never",))))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        engine.request_stop()
        with pytest.raises(EngineStopped):
            async for _ in stream:
                pass

    run(go, model)
    assert 1 <= len(steps) < 200


def test_an_lm_with_sliding_window_attention_is_refused_at_startup(model, monkeypatch):
    monkeypatch.setattr(model.lm.config, "sliding_window", 8, raising=False)
    with pytest.raises(UserError, match="sliding-window"):
        Engine(model)


@pytest.mark.parametrize("text, images, params, field", [
    ("<image>Output:", [], {}, "images"),
    ("Output:", [b"not an image"], {}, "images"),
    ("<image>Output:", [b"not an image"], {}, "images[0]"),
    ("Output:", [], {"max_tokens": 0}, "max_tokens"),
    ("Output:", [], {"top_p": 0}, "top_p"),
    ("Output:", [], {"n": 3, "num_beams": 2}, "n"),
    ("Output:", [], {"temperature": -1}, "temperature"),
    ("Output:", [], {"max_tokens": 10_000}, "max_tokens"),
])
def test_bad_requests_raise_at_once_naming_the_field(model, text, images, params, field):
    async def go():
        engine = Engine(model)
        with pytest.raises(UserError, match=re.escape(field)):
            engine.generate(EngineRequest(text, images, SamplingParams(**params)))
    asyncio.run(go())
