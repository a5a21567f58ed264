"""`flamingo chat`: an interactive dialogue with images, with the paper's dialogue prompt (B.1.6),
or for a model of another family in its own chat format (`MediaFamily.chat_text`).

Each turn is appended to the history as "User: <images> text" / "Flamingo: reply<|endofchunk|>";
the oldest turns are dropped when the history would not fit the LM's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from flamingo.inference.family import DIALOGUE_PROMPT, DIALOGUE_STOP_STRINGS, FLAMINGO, family_io
from flamingo.inference.generation import GenerationConfig, generate
from flamingo.inference.prompt import Prompt, PromptError, check_text, context_length
from flamingo.inference.state import encode_prompts
from flamingo.model.families import MEDIA, ChatMessage
from flamingo.model.flamingo import Flamingo
from flamingo.model.image_processing import DEFAULT_MAX_PIXELS, load_image

__all__ = ["DIALOGUE_PROMPT", "DIALOGUE_STOP_STRINGS", "Turn", "build_prompt", "run_chat"]
HELP = "type a message; /image PATH attaches an image to your next message; /reset clears the history; /quit ends"


@dataclass
class Turn:
    text: str  # in the paper's dialogue format
    images: list[Image.Image] = field(default_factory=list)
    message: ChatMessage | None = None  # the same turn for another family's chat format


def build_prompt(model: Flamingo, turns: list[Turn]) -> Prompt:
    images = [[im] for turn in turns for im in turn.images]
    family = family_io(model)
    if family is not FLAMINGO:
        return Prompt(family.chat_text(model, [turn.message for turn in turns]), images)
    return Prompt(DIALOGUE_PROMPT + "".join(turn.text for turn in turns), images)


def run_chat(model: Flamingo, config: GenerationConfig, read: Callable[[str], str], write: Callable[[str], None],
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Turn]:
    """The chat loop; `read(prompt)` returns a line (raises EOFError at the end), `write` prints.
    Returns the history."""
    media = model.config.media_token
    eoc = model.config.end_of_chunk_token
    config.stop_strings = tuple(config.stop_strings) + family_io(model).chat_stop_strings
    limit = context_length(model)
    history: list[Turn] = []
    pending: list[Image.Image] = []
    write(f"{HELP}\n")
    while True:
        try:
            line = read("User: ").strip()
        except EOFError:
            break
        if not line:
            continue
        try:
            check_text(line, "that line")
        except PromptError as err:
            write(f"error: {err}; ignored\n")
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history, pending = [], []
            write("(history cleared)\n")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending.append(load_image(Path(path), max_pixels=max_pixels))
                write(f"(image {path} attached to your next message)\n")
            except (ValueError, OSError) as err:
                write(f"error: {err}\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]!r}; {HELP}\n")
            continue
        user = Turn(f"User: {media * len(pending)}{line}\nFlamingo:", pending,
                    ChatMessage("user", [MEDIA] * len(pending) + [line]))
        pending = []
        turns = history + [user]
        state = None
        while state is None:
            try:
                state = encode_prompts(model, [build_prompt(model, turns)], max_new_tokens=config.max_new_tokens)
            except PromptError as err:
                if len(turns) == 1 or limit is None:
                    write(f"error: {err}\n")
                    break
                turns = turns[1:]  # keep within the context: forget the oldest turn
        if state is None:
            continue
        write("Flamingo:")
        reply = generate(model, state, config, on_text=lambda row, text: write(text))[0]
        write("\n")
        history = turns[:-1] + [user, Turn(f"{reply.text.rstrip()}{eoc}\n",
                                           message=ChatMessage("assistant", [reply.text.strip()]))]
    return history
