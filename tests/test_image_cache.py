"""The serving engine's image cache (an image's visual tokens by the hash of its bytes) and the
prefix cache's budget for chats: the same answers with and without them, hits counted and exported,
budgets kept."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from test_serving_engine import collect, png, reference, run

from flamingo.serving.engine import EngineConfig, EngineRequest, SamplingParams
from flamingo.serving.model_runner import PrefixCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Images sent again in new contexts (no prompt shares a cached prefix with another): red three times,
# blue twice, green once.
REQUESTS = [
    ("<image>An image of", ("red",)),
    ("<image>Question: what colour is it? Answer:", ("red",)),
    ("<image>Look at<image> these two. They are", ("red", "blue")),
    ("Here:<image>This is a", ("blue",)),
    ("<image>A photo of a", ("green",)),
]


def answers(model, config: EngineConfig):
    async def go(engine):
        texts = []
        for text, colours in REQUESTS:  # one at a time: the counts below do not depend on batching
            got, _ = await collect(engine.generate(EngineRequest(text, [png(c) for c in colours],
                                                                 SamplingParams(max_tokens=5))))
            texts.append(got[0])
        return texts, engine.metrics, engine.image_cache
    return run(go, model, config)


def test_the_same_answers_with_and_without_the_image_cache_and_each_image_encoded_once(model, monkeypatch):
    from flamingo.serving.input_processor import InputProcessor

    decode, decoded = InputProcessor._decode, []
    monkeypatch.setattr(InputProcessor, "_decode",
                        lambda self, data, *a: decoded.append(data) or decode(self, data, *a))
    cached, metrics, cache = answers(model, EngineConfig())
    assert len(decoded) == 3  # an image in the cache is not even decoded at the door
    uncached, plain_metrics, none = answers(model, EngineConfig(image_cache_bytes=0))
    assert len(decoded) == 3 + 6
    assert none is None and cached == uncached
    assert cached == [reference(model, text, colours, max_new_tokens=5) for text, colours in REQUESTS]
    assert metrics.image_cache_misses._value.get() == 3 and metrics.image_cache_hits._value.get() == 3
    assert len(cache.entries) == 3 and metrics.image_cache_bytes._value.get() == cache.bytes > 0
    exported = generate_latest(metrics.registry).decode()
    assert "flamingo_image_cache_hits_total 3.0" in exported and "flamingo_image_cache_misses_total 3.0" in exported
    assert plain_metrics.image_cache_hits._value.get() == 0


def test_the_image_cache_keeps_to_its_budget(model):
    _, _, cache = answers(model, EngineConfig())
    one = cache.bytes // 3  # every image makes as many visual tokens
    texts, metrics, small = answers(model, EngineConfig(image_cache_bytes=one + 10))
    assert len(small.entries) == 1 and small.bytes <= one + 10
    # red, red (hit), red + blue (hit, then blue evicts red), blue (hit), green (evicts blue)
    assert metrics.image_cache_evictions._value.get() == 2 and metrics.image_cache_hits._value.get() == 3
    too_small, metrics, tiny = answers(model, EngineConfig(image_cache_bytes=one - 1))
    assert not tiny.entries and metrics.image_cache_misses._value.get() == 6 and too_small == texts


class Sized:
    def __init__(self, size: int) -> None:
        self.size = size

    def nbytes(self) -> int:
        return self.size


def test_chats_have_their_own_prefix_budget_and_never_evict_support_sets():
    from flamingo.serving.metrics import EngineMetrics

    cache = PrefixCache(250, EngineMetrics(), chat_capacity_bytes=200)
    cache.put("support-a", Sized(100))
    cache.put("support-b", Sized(100))
    for turn in range(5):  # a long chat: each turn's prefix longer than the last
        cache.put(f"chat-{turn}", Sized(60 + 10 * turn), chat=True)
    assert "support-a" in cache and "support-b" in cache
    assert [key for key in cache.entries if key.startswith("chat")] == ["chat-3", "chat-4"]  # 90 + 100 <= 200
    assert cache.bytes == 200 + 190
    cache.put("support-c", Sized(100))  # support sets evict support sets only
    assert "support-a" not in cache and "chat-3" in cache
    cache.put("chat-huge", Sized(201), chat=True)  # larger than the chats' budget: not kept, nothing evicted
    assert "chat-huge" not in cache and "chat-4" in cache


def test_a_chat_prompt_is_cached_in_the_chats_budget(model):
    text = "User: <image>What is this?\nFlamingo: a red square.<|endofchunk|>\nUser: <image>And this?\nFlamingo:"

    async def go(engine):
        prompt = engine.processor.prompt(text, [png("red"), png("blue")], 4)
        prompt.chat = True  # as the server's /v1/chat/completions marks its prompts
        await collect(engine.generate(EngineRequest(text, prompt.images, SamplingParams(max_tokens=4)), prompt))
        return engine.prefix_cache
    cache = run(go, model)
    assert [entry[2] for entry in cache.entries.values()] == [True] and cache.used[False] == 0
