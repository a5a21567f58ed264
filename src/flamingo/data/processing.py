"""The paper's processing of one raw sample into a `TrainingSample` (section 2.4, A.3).

Interleaved documents (M3W; MMC4 / OBELICS layouts): images failing the filters are removed;
the text becomes `<|endofchunk|><image>` at each image position and `<|endofchunk|>` at the end
(exactly as the paper says: before *every* image, the first one included); a random subsequence
of `max_tokens` tokens (BOS included) is cut; it keeps at most `max_images` images, the first
ones inside it: the sequence stops just before the (N+1)-th `<image>` token (so no text refers
to a dropped image, in either attention mode). An `<image>` token outside the subsequence takes
its image with it. The document draws `attend_next` with probability p_next (A.3.2).

Pairs and videos: `<image>caption<|endofchunk|>`, a single space prepended to the caption with
probability p_space.

Labels: the ids, with -100 on `<image>` tokens, on the first position (nothing predicts it) and,
after collation, on padding. `<|endofchunk|>` is a target: the model must learn to end a chunk.

For a model of another family (`FamilyInputs`: IDEFICS, Llama 3.2 Vision) a pair is written in its
own format instead, `<image>caption<EOC>` in its tokens as its processor builds it (pairs only).

Randomness comes only from the generator passed in, which the loader derives from (seed,
dataset, epoch, record id): the same record is processed the same way on any rank, in any
world size, and after any resume.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from flamingo.data.batch import IGNORE_INDEX, TrainingSample
from flamingo.data.config import DataError, DatasetConfig
from flamingo.data.media import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    Augmentation,
    MediaSource,
    SkipSample,
    decode_image,
    decode_video_clip,
    frame_folder_clip,
    image_problem,
    load_frames,
    upright_rgb,
)
from flamingo.model.families import media_family, training_media
from flamingo.data.sources import (
    CAPTION_EXTS,
    CORRUPT_FIELD,
    UNSAFE_FIELD,
    Record,
    confined,
    frame_files,
    parse_json,
)


# ------------------------------------------------------------------------ token-level units
def interleaved_ids(pieces: Sequence[Sequence[int] | None], media_token_id: int, eoc_token_id: int) -> torch.Tensor:
    """Token ids of a whole document: text pieces as given, `<EOC><image>` for each image (None)
    and a final `<EOC>`."""
    ids: list[int] = []
    for piece in pieces:
        if piece is None:
            ids += (eoc_token_id, media_token_id)
        else:
            ids += piece
    ids.append(eoc_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_subsequence(ids: torch.Tensor, media_token_id: int, length: int, max_images: int,
                       rng: np.random.Generator) -> tuple[torch.Tensor, int, int]:
    """A random window of at most `length` tokens, cut before its (max_images+1)-th `<image>`.

    Returns (window ids, index in the document of its first image, number of images in it): the
    `<image>` tokens of the window are exactly images first .. first + count - 1, in order.
    """
    n = int(ids.numel())
    start = int(rng.integers(0, n - length + 1)) if n > length else 0
    is_media = ids == media_token_id
    first = int(is_media[:start].sum())
    window = ids[start:start + length]
    positions = (window == media_token_id).nonzero().flatten()
    if positions.numel() > max_images:
        window = window[: int(positions[max_images])]
        positions = positions[:max_images]
    return window, first, int(positions.numel())


def make_labels(input_ids: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """Next-token targets on text only: -100 on `<image>` tokens and on position 0 (vectorised)."""
    labels = input_ids.masked_fill(input_ids == media_token_id, IGNORE_INDEX)
    if labels.numel():
        labels[..., 0] = IGNORE_INDEX
    return labels


def pair_ids(caption_ids: Sequence[int], media_token_id: int, eoc_token_id: int, bos_token_id: int | None,
             max_tokens: int) -> torch.Tensor:
    """[BOS] <image> caption <EOC>, cut to max_tokens (a cut caption loses its <EOC>)."""
    head = ([bos_token_id] if bos_token_id is not None else []) + [media_token_id]
    return torch.tensor((head + list(caption_ids) + [eoc_token_id])[:max_tokens], dtype=torch.long)


def maybe_prepend_space(caption: str, p_space: float, rng: np.random.Generator) -> str:
    """The caption, stripped, with a single space in front with probability p_space."""
    caption = caption.strip()
    return " " + caption if rng.random() < p_space else caption


# ------------------------------------------------------------------------------ text encoder
class TextEncoder:
    """Tokenises text pieces (no special tokens added). Occurrences of the `<image>` /
    `<|endofchunk|>` strings in raw text are removed from the ids, so only the processing places
    those tokens and images and tokens can never get out of step."""

    def __init__(self, tokenizer: Any, media_token_id: int, eoc_token_id: int, add_bos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.media_token_id, self.eoc_token_id = int(media_token_id), int(eoc_token_id)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_token_id = int(bos) if (add_bos and bos is not None) else None
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        self._lock = threading.Lock()  # Rust tokenizers may refuse concurrent use of one object

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        with self._lock:
            out = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        special = (self.media_token_id, self.eoc_token_id)
        return [[int(t) for t in ids if t not in special] for ids in out]


class FamilyInputs:
    """How a model of another family (`flamingo.model.families`: IDEFICS, Llama 3.2 Vision) takes a
    training sample: prompt text (its media token where each image goes) tokenized exactly as its
    processor tokenizes it, each image preprocessed by its processor (`MediaFamily.tokenize` and
    `preprocess`, the inference path's), the loss never on a media or special token but the end of
    chunk. Thread-safe."""

    def __init__(self, model: Any) -> None:
        self.model, self.family = model, media_family(model)
        self.media_token, self.eoc_token = model.config.media_token, model.config.end_of_chunk_token
        self.media_token_id = int(model.media_token_id)
        special = set(model.tokenizer.all_special_ids) | {self.media_token_id}
        self.no_loss = torch.tensor(sorted(special - {int(model.eoc_token_id)}), dtype=torch.long)
        # Raw text must not place media or special tokens (as TextEncoder drops their ids).
        self.reserved = sorted({self.media_token, self.eoc_token, *model.tokenizer.all_special_tokens}, key=len,
                               reverse=True)
        self._lock = threading.Lock()  # Rust tokenizers may refuse concurrent use of one object

    def clean(self, text: str) -> str:
        for token in self.reserved:
            text = text.replace(token, "")
        return text

    def tokenize(self, text: str) -> list[int]:
        """A whole prompt's ids, BOS included where the family's processor places it."""
        with self._lock:
            return self.family.tokenize(self.model, text, True)

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        labels = input_ids.masked_fill(torch.isin(input_ids, self.no_loss), IGNORE_INDEX)
        if labels.numel():
            labels[0] = IGNORE_INDEX
        return labels

    def media(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images -> pixels [N, T, 3, H, W] and their vision inputs (`TrainingSample.vision_inputs`)."""
        return training_media(self.model, [self.family.preprocess(self.model, [image]) for image in images])


# ----------------------------------------------------------------------------- documents
def parse_document(doc: Any, name: str) -> list[tuple[str, Any]]:
    """Ordered ("text", str) / ("image", ref) segments of an interleaved document.

    Accepted layouts:
      OBELICS: {"texts": [str|null, ...], "images": [ref|null, ...]}, equal lengths, one of the
        two set at each position;
      MMC4: {"text_list": [str, ...], "image_info": [{"matched_text_index": i, <ref>}, ...]}, each
        image placed before text i;
      {"segments": [{"text": str} | {"image": ref}, ...]}.
    A ref is a file name / path (a member of the same sample in shards), a "data:" URI, or a
    dict with "image_base64" / "bytes" (base64) or "image_name" / "path".
    """
    if not isinstance(doc, dict):
        raise SkipSample("undecodable", f"{name}: expected a JSON object, got {type(doc).__name__}")
    segments: list[tuple[str, Any]] = []
    if "texts" in doc or "images" in doc:
        texts, images = doc.get("texts") or [], doc.get("images") or []
        if not isinstance(texts, list) or not isinstance(images, list):
            raise SkipSample("undecodable", f"{name}: 'texts' and 'images' must be lists, "
                                            f"got {type(texts).__name__} and {type(images).__name__}")
        if images and texts and len(texts) != len(images):
            raise SkipSample("undecodable", f"{name}: 'texts' and 'images' must have the same length, "
                                            f"got {len(texts)} and {len(images)}")
        for i in range(max(len(texts), len(images))):
            image = images[i] if i < len(images) else None
            text = texts[i] if i < len(texts) else None
            if image is not None:
                segments.append(("image", image))
            if text is not None:
                segments.append(("text", text))
    elif "text_list" in doc:
        texts, infos = doc.get("text_list") or [], doc.get("image_info") or []
        if not isinstance(texts, list) or not isinstance(infos, list):
            raise SkipSample("undecodable", f"{name}: 'text_list' and 'image_info' must be lists")
        before: dict[int, list[Any]] = {}
        for info in infos:
            if not isinstance(info, dict) or not isinstance(info.get("matched_text_index"), int):
                raise SkipSample("undecodable", f"{name}: image_info entries need an integer "
                                                f"'matched_text_index', got {info!r:.80}")
            before.setdefault(min(max(info["matched_text_index"], 0), max(len(texts) - 1, 0)), []).append(info)
        for i in range(max(len(texts), 1 if before else 0)):
            segments += [("image", info) for info in before.get(i, [])]
            if i < len(texts):
                segments.append(("text", texts[i]))
    elif "segments" in doc:
        items = doc["segments"]
        if not isinstance(items, list):
            raise SkipSample("undecodable", f"{name}: 'segments' must be a list")
        for item in items:
            if isinstance(item, dict) and "image" in item:
                segments.append(("image", item["image"]))
            elif isinstance(item, dict) and "text" in item:
                segments.append(("text", item["text"]))
            else:
                raise SkipSample("undecodable", f"{name}: a segment must be {{'text': ...}} or "
                                                f"{{'image': ...}}, got {item!r:.80}")
    else:
        raise SkipSample("undecodable", f"{name}: not an interleaved document: expected 'texts'/'images', "
                                        f"'text_list'/'image_info' or 'segments', got keys {sorted(doc)[:8]}")
    for kind, value in segments:
        if kind == "text" and not isinstance(value, str):
            raise SkipSample("undecodable", f"{name}: text segments must be strings, got {type(value).__name__}")
    return segments


def record_document(record: Record) -> Any:
    """The parsed JSON document of an interleaved record (its .json or .jsonl member)."""
    for member in ("json", "jsonl"):
        if member in record.fields:
            return parse_json(record, member)
    raise SkipSample("undecodable", f"{record.name}: no .json document among the members {sorted(record.fields)}")


def resolve_media(ref: Any, record: Record, what: str = "image") -> tuple[str, MediaSource]:
    """(display name, bytes or Path) of a media reference in a record (see parse_document)."""
    missing = "missing_image" if what == "image" else "missing_video"
    if isinstance(ref, dict):
        for key in ("image_base64", "base64", "bytes", "video_base64"):
            if isinstance(ref.get(key), str):
                return f"{record.name}:{key}", _b64(ref[key], record.name)
        for key in ("image_name", "image_path", "path", "file", "name", "video", "image"):
            if isinstance(ref.get(key), str):
                return resolve_media(ref[key], record, what)
        if "url" in ref or "raw_url" in ref:
            raise SkipSample(missing, f"{record.name}: {what} only given as a URL (not downloaded): "
                                      f"{ref.get('url') or ref.get('raw_url')}")
        raise SkipSample("undecodable", f"{record.name}: cannot find the {what} in {ref!r:.100}")
    if not isinstance(ref, str) or not ref:
        raise SkipSample("undecodable", f"{record.name}: expected an {what} reference (a path or name), got {ref!r:.80}")
    if ref.startswith("data:"):
        return f"{record.name}:data-uri", _b64(ref.partition(",")[2], record.name)
    lowered = ref.lower()
    for candidate in (lowered, lowered.split(".", 1)[1] if "." in lowered else None):
        if candidate and candidate in record.fields:
            return f"{record.name}.{candidate}", record.fields[candidate]
    if record.base is None:  # inside a shard: only members of the sample
        raise SkipSample(missing, f"{record.name}: {what} {ref!r} is not a member of the sample "
                                  f"(members: {sorted(record.fields)})")
    path = confined(record.base / ref, record, what)  # an absolute ref replaces the base
    return str(path), path


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as err:
        raise SkipSample("corrupt_image", f"{name}: invalid base64 data: {err}") from None


# ------------------------------------------------------------------------------- processor
@dataclass
class Outcome:
    """What became of one record: a sample, or the reason it was skipped; plus the images
    removed from it (interleaved) by reason."""

    sample: TrainingSample | None = None
    reason: str | None = None
    message: str | None = None
    images_removed: Counter = field(default_factory=Counter)
    removed_messages: dict[str, str] = field(default_factory=dict)


def pair_image(record: Record, doc: dict | None) -> tuple[str, MediaSource]:
    """The image of an image-text pair: a member of the record (`NAME.jpg` in a shard or folder), or
    its JSONL line's `image` reference (under the dataset folder)."""
    ext = next((e for e in IMAGE_EXTS if e in record.fields), None)
    if ext is not None:
        return f"{record.name}.{ext}", record.fields[ext]
    if doc is not None and doc.get("image") is not None:
        return resolve_media(doc["image"], record)
    raise SkipSample("missing_image", f"{record.name}: no image: expected one of the members {'/'.join(IMAGE_EXTS)} "
                                      f"or an 'image' field, got {sorted(doc or record.fields)}")


class SampleProcessor:
    """Record -> TrainingSample for one dataset config (thread-safe)."""

    def __init__(self, config: DatasetConfig, encoder: TextEncoder, image_processor: Any,
                 family: FamilyInputs | None = None) -> None:
        self.config, self.encoder, self.image_processor = config, encoder, image_processor
        self.family = family  # a model of another family: pairs in its own format (image_processor unused)
        if family is not None and config.kind != "pairs":
            raise DataError(f"dataset {config.name!r} (kind {config.kind}): a model of another family takes pairs "
                            f"only from the data pipeline (its documents and videos are written in our format)")
        mean = getattr(image_processor, "mean", (0.5, 0.5, 0.5))
        self.background = tuple(int(round(min(max(float(m), 0.0), 1.0) * 255)) for m in mean)

    def __call__(self, record: Record, rng: np.random.Generator) -> Outcome:
        outcome = Outcome()
        try:
            if CORRUPT_FIELD in record.fields:
                raise SkipSample("corrupt_shard", str(record.fields[CORRUPT_FIELD]))
            if UNSAFE_FIELD in record.fields:
                raise SkipSample("unsafe_path", str(record.fields[UNSAFE_FIELD]))
            kind = self.config.kind
            if kind == "interleaved":
                outcome.sample = self.interleaved(record, rng, outcome)
            elif kind == "pairs":
                outcome.sample = self.pair(record, rng)
            else:
                outcome.sample = self.video(record, rng)
            outcome.sample.dataset = self.config.name
        except SkipSample as skip:
            outcome.sample, outcome.reason, outcome.message = None, skip.reason, skip.message
        except Exception as err:  # noqa: BLE001 - never fatal: an unexpected failure is counted too
            outcome.sample, outcome.reason = None, "error"
            outcome.message = f"{record.name}: {type(err).__name__}: {err}"
        return outcome

    # ------------------------------------------------------------------------- images
    def _load_image(self, name: str, source: MediaSource) -> Image.Image:
        """Decode and filter; SkipSample names the reason."""
        image = decode_image(source, name, self.config.max_pixels)
        if self.config.filter_images:
            problem = image_problem(image, self.config.min_image_side, self.config.max_aspect_ratio,
                                    self.config.single_colour_tolerance)
            if problem is not None:
                raise SkipSample(f"image_{problem}", f"{name}: image {image.size[0]}x{image.size[1]} "
                                                     f"removed by the filter '{problem}'")
        return image

    def _pixels(self, images: Sequence[Image.Image], rng: np.random.Generator, video: bool = False) -> torch.Tensor:
        """Augment and preprocess: images -> [N, 1, 3, S, S]; a video's frames -> [1, T, 3, S, S]."""
        cfg = self.config
        if not images:
            size = self.image_processor.image_size
            return torch.zeros(0, 1, 3, size, size)
        frames = [upright_rgb(img, self.background) for img in images]
        if video:
            augment = Augmentation.draw(rng, cfg.flip_prob, cfg.color_jitter) if cfg.augment else Augmentation()
            frames = [augment(f) for f in frames]
            return self.image_processor.preprocess_video(frames)[None]
        if cfg.augment:
            frames = [Augmentation.draw(rng, cfg.flip_prob, cfg.color_jitter)(f) for f in frames]
        return torch.stack([self.image_processor.preprocess_image(f) for f in frames])[:, None]

    def _finish(self, ids: torch.Tensor, media: torch.Tensor, attend_next: bool) -> TrainingSample:
        count = int((ids == self.encoder.media_token_id).sum())
        if count != media.shape[0]:  # the invariant every sample keeps
            raise AssertionError(f"{count} <image> tokens but {media.shape[0]} media")
        return TrainingSample(input_ids=ids, labels=make_labels(ids, self.encoder.media_token_id),
                              media=media, attend_next=attend_next)

    # -------------------------------------------------------------------- interleaved
    def interleaved(self, record: Record, rng: np.random.Generator, outcome: Outcome) -> TrainingSample:
        cfg, enc = self.config, self.encoder
        segments = parse_document(record_document(record), record.name)
        rng_text, rng_media = (np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(2))
        attend_next = bool(rng_text.random() < cfg.p_next)

        # Filtered / broken images leave the document before tokenisation.
        kept: list[tuple[str, Any]] = []
        images: list[Image.Image] = []
        for kind, value in segments:
            if kind == "text":
                if value.strip():
                    kept.append(("text", value.strip()))
                continue
            try:
                name, source = resolve_media(value, record)
                images.append(self._load_image(name, source))
                kept.append(("image", None))
            except SkipSample as skip:
                reason = skip.reason.removeprefix("image_").removesuffix("_image")
                outcome.images_removed[reason] += 1
                outcome.removed_messages[reason] = skip.message
        # Merge consecutive texts.
        pieces_text: list[str] = []
        layout: list[int | None] = []  # index into pieces_text, or None for an image
        for kind, value in kept:
            if kind == "text" and layout and layout[-1] is not None:
                pieces_text[layout[-1]] += cfg.text_separator + value
            elif kind == "text":
                layout.append(len(pieces_text))
                pieces_text.append(value)
            else:
                layout.append(None)
        if not pieces_text:
            raise SkipSample("empty_document", f"{record.name}: the document has no text"
                             + (f" ({len(images)} image(s))" if images else ""))
        encoded = enc.encode(pieces_text)
        pieces = [None if i is None else encoded[i] for i in layout]
        ids = interleaved_ids(pieces, enc.media_token_id, enc.eoc_token_id)

        budget = cfg.max_tokens - (enc.bos_token_id is not None)
        window, first, count = sample_subsequence(ids, enc.media_token_id, budget, cfg.max_images, rng_text)
        if count < cfg.min_images:
            raise SkipSample("too_few_images", f"{record.name}: {count} image(s) in the sampled subsequence "
                             f"(document: {len(images)} usable image(s)), min_images={cfg.min_images}")
        if enc.bos_token_id is not None:
            window = torch.cat([torch.tensor([enc.bos_token_id]), window])
        media = self._pixels(images[first:first + count], rng_media)
        return self._finish(window, media, attend_next)

    # -------------------------------------------------------------------------- pairs
    def _caption(self, record: Record, doc: dict | None) -> str:
        for ext in CAPTION_EXTS:
            if ext in record.fields:
                try:
                    raw = record.read(ext)
                    caption = raw.decode("utf-8")
                except (UnicodeDecodeError, OSError) as err:
                    raise SkipSample("undecodable", f"{record.name}.{ext}: caption is not UTF-8 text: {err}") from None
                break
        else:
            if doc is None and "json" in record.fields:
                doc = parse_json(record, "json")
            caption = None
            if isinstance(doc, dict):
                caption = next((doc[k] for k in ("caption", "text") if isinstance(doc.get(k), str)), None)
            if caption is None:
                got = sorted(record.fields) if doc is None else sorted(doc)
                raise SkipSample("missing_caption", f"{record.name}: no caption: expected a .txt member/file "
                                                    f"or a 'caption' field, got {got}")
        if not caption.strip():
            raise SkipSample("empty_caption", f"{record.name}: the caption is empty")
        return caption

    def _jsonl_doc(self, record: Record) -> dict | None:
        if "jsonl" not in record.fields:
            return None
        doc = parse_json(record, "jsonl")
        if not isinstance(doc, dict):
            raise SkipSample("undecodable", f"{record.name}: expected a JSON object, got {type(doc).__name__}")
        return doc

    def _caption_ids(self, caption: str, rng: np.random.Generator) -> list[int]:
        return self.encoder.encode([maybe_prepend_space(caption, self.config.p_space, rng)])[0]

    def pair(self, record: Record, rng: np.random.Generator) -> TrainingSample:
        doc = self._jsonl_doc(record)
        caption = self._caption(record, doc)
        image = self._load_image(*pair_image(record, doc))
        rng_text, rng_media = (np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(2))
        if self.family is not None:
            return self._family_pair(caption, image, rng_text, rng_media)
        enc = self.encoder
        ids = pair_ids(self._caption_ids(caption, rng_text), enc.media_token_id, enc.eoc_token_id,
                       enc.bos_token_id, self.config.max_tokens)
        return self._finish(ids, self._pixels([image], rng_media), False)

    def _family_pair(self, caption: str, image: Image.Image, rng_text: np.random.Generator,
                     rng_media: np.random.Generator) -> TrainingSample:
        """A pair for a model of another family: `<image>caption<EOC>` in its media and end-of-chunk
        tokens, exactly as its processor builds that text and image (`FamilyInputs`), cut to max_tokens."""
        fam, cfg = self.family, self.config
        text = fam.media_token + fam.clean(maybe_prepend_space(caption, cfg.p_space, rng_text)) + fam.eoc_token
        ids = torch.tensor(fam.tokenize(text)[:cfg.max_tokens], dtype=torch.long)
        if int((ids == fam.media_token_id).sum()) != 1:
            raise SkipSample("too_long", f"max_tokens {cfg.max_tokens} cuts the image token off")
        frame = upright_rgb(image, self.background)
        if cfg.augment:
            frame = Augmentation.draw(rng_media, cfg.flip_prob, cfg.color_jitter)(frame)
        media, vision_inputs = fam.media([frame])
        return TrainingSample(ids, fam.labels(ids), media, vision_inputs=vision_inputs)

    # -------------------------------------------------------------------------- video
    def video(self, record: Record, rng: np.random.Generator) -> TrainingSample:
        cfg = self.config
        doc = self._jsonl_doc(record)
        meta = doc
        if meta is None and "json" in record.fields:
            meta = parse_json(record, "json")
        caption = self._caption(record, doc if doc is not None else meta)
        rng_text, rng_media = (np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(2))
        source_fps = cfg.frame_folder_fps
        if isinstance(meta, dict) and isinstance(meta.get("fps"), (int, float)) and meta["fps"] > 0:
            source_fps = float(meta["fps"])

        ext = next((e for e in VIDEO_EXTS if e in record.fields), None)
        frame_keys = sorted(k for k in record.fields if k.startswith("frame") and k.rsplit(".", 1)[-1] in IMAGE_EXTS)
        if ext is not None:
            frames = decode_video_clip(record.fields[ext], f"{record.name}.{ext}", cfg.frames, cfg.fps, rng_media)
        elif frame_keys:
            chosen = frame_folder_clip(len(frame_keys), source_fps, cfg.frames, cfg.fps, rng_media)
            frames = load_frames([(f"{record.name}.{frame_keys[i]}", record.fields[frame_keys[i]]) for i in chosen],
                                 cfg.max_pixels)
        elif doc is not None and doc.get("video") is not None:
            name, source = resolve_media(doc["video"], record, "video")
            if isinstance(source, Path) and source.is_dir():
                files = [confined(f, record, "frame") for f in frame_files(source)]
                chosen = frame_folder_clip(len(files), source_fps, cfg.frames, cfg.fps, rng_media)
                frames = load_frames([(str(files[i]), files[i]) for i in chosen], cfg.max_pixels)
            else:
                frames = decode_video_clip(source, name, cfg.frames, cfg.fps, rng_media)
        else:
            raise SkipSample("missing_video", f"{record.name}: no video: expected a {'/'.join(VIDEO_EXTS[:4])} member, "
                                              f"frameNNNNNN.jpg members or a 'video' field")
        enc = self.encoder
        ids = pair_ids(self._caption_ids(caption, rng_text), enc.media_token_id, enc.eoc_token_id,
                       enc.bos_token_id, cfg.max_tokens)
        return self._finish(ids, self._pixels(frames, rng_media, video=True), False)
