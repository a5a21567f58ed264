"""The `flamingo` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from flamingo.cli_options import (
    MAX_SHOTS,
    add_debug_option,
    add_revision_option,
    add_quantize_option,
    add_trust_remote_code_option,
    float_range,
    int_list,
    int_range,
    load_model_quietly,
    non_negative_int,
    positive_int,
    seed,
)
from flamingo.config_io import short
from flamingo.errors import MissingExtra, UserError

EXAMPLES = """examples:
  flamingo demo                                  the embedded model learning from examples, offline
  flamingo eval-offline --shots 0,4,8            few-shot accuracy table on held-out tasks
  flamingo generate --model of-9b --image cat.jpg --prompt "<image>An image of"
  flamingo chat --model of-9b                    talk about images (/image PATH to attach one)
  flamingo serve                                 OpenAI-compatible server + chat page on 127.0.0.1:8000
  flamingo batch prompts.jsonl answers.jsonl     offline batch inference over a dataset of prompts
  flamingo params configs/openflamingo-9b.yaml   parameter counts per component (Table 1 style)
  flamingo params runs/my-model                  ... of a saved model directory
  flamingo convert-openflamingo checkpoint.pt --config configs/openflamingo-9b.yaml --out of9b
  flamingo push runs/my-model my-org/my-flamingo  upload a model directory and its card to the Hub
"""


def _cmd_demo(args: argparse.Namespace) -> None:
    from flamingo.evaluation.demo import run_demo

    run_demo(seed=args.seed, episodes=args.episodes)


def _cmd_eval_offline(args: argparse.Namespace) -> None:
    import json

    from flamingo.data.clipart import ClipartError, catalogue
    from flamingo.data.episodes import TASKS
    from flamingo.evaluation.procedural import caption_objects, evaluate, format_table
    from flamingo.outputs import check_writable, write_text_atomic

    unknown = [t for t in args.task or [] if t not in TASKS]
    if unknown:
        raise UserError(f"--task: unknown task(s) {short(unknown)}; expected some of {sorted(TASKS)}")
    tasks = args.task or list(TASKS)
    captions = args.captions if args.captions is not None else (0 if args.task else 60)
    if args.task is None:
        try:  # the real-object tasks by default only when their data is installed
            catalogue()
        except ClipartError as err:
            print(f"skipping the real-object tasks: {err}", flush=True)
            tasks, captions = [t for t in tasks if not TASKS[t].needs_clipart], 0
    elif captions or any(TASKS[t].needs_clipart for t in tasks):
        catalogue()  # missing packages: one clear line before the model load
    if args.json:  # found out now, not after the evaluation
        check_writable(args.json, "--json", folder=False)
    seeds = list(range(args.seeds))
    model = load_model_quietly(args.model, args.trust_remote_code, args.quantize, args.revision)
    results = evaluate(model, tasks, args.shots, seeds, args.episodes, progress=lambda line: print(line, flush=True),
                       images_as_text=args.images_as_text)
    table = format_table(results)
    print(table)
    report = {"model": args.model, "episodes": args.episodes, "seeds": seeds, "images_as_text": args.images_as_text,
              "results": [{"task": r.task, "shots": r.shots, "accuracies": r.accuracies, "mean": r.mean}
                          for r in results], "table": table}
    if captions and not args.images_as_text:
        result = caption_objects(model, captions)
        cider = "n/a (needs java)" if result.cider is None else f"{100 * result.cider:.1f}"
        print(f"captions of {captions} held-out objects: CIDEr {cider}, name the coarse category "
              f"{100 * result.names_coarse:.1f}%")
        for example in result.examples[:6]:
            print(f"  {example['category']:>10}: {example['caption']!r}")
        report["captions"] = {"count": captions, "cider": result.cider, "names_coarse": result.names_coarse,
                              "examples": result.examples}
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=1))


def _cmd_params(args: argparse.Namespace) -> None:
    from flamingo.model.families import family_of, shapes_only
    from flamingo.model.params import format_parameter_report, parameter_report

    if Path(args.model).is_dir() and not (Path(args.model) / "config.yaml").is_file() and family_of(args.model):
        model = shapes_only(args.model)  # a transformers checkpoint: counted from its config.json, on the meta device
    else:
        model = load_model_quietly(args.model, args.trust_remote_code)
    print(format_parameter_report(parameter_report(model)))


def _cmd_convert(args: argparse.Namespace) -> None:
    from flamingo.model.config import FlamingoConfig
    from flamingo.model.convert_openflamingo import convert_openflamingo

    out = convert_openflamingo(args.checkpoint, FlamingoConfig.load(args.config), args.out, overwrite=args.overwrite,
                               trust_remote_code=args.trust_remote_code)
    print(f"converted {args.checkpoint} -> {out}")


def _cmd_convert_family(args: argparse.Namespace) -> None:
    from flamingo.model.families.convert import convert_family

    out = convert_family(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"converted {args.checkpoint} -> {out}")


def _cmd_push(args: argparse.Namespace) -> None:
    from flamingo.model.hub import push_to_hub

    url = push_to_hub(args.model_dir, args.repo_id, revision=args.revision, private=args.private or None,
                      commit_message=args.message)
    print(f"pushed {args.model_dir} -> {url}")


def _generation_config(args: argparse.Namespace):
    from flamingo.inference.generation import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=getattr(args, "beams", 1),
                            length_penalty=getattr(args, "length_penalty", 1.0), do_sample=args.sample,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            stop_strings=tuple(args.stop), stop_at_end_of_chunk=not args.no_stop_at_eoc)


def _cmd_generate(args: argparse.Namespace) -> None:
    import json

    from flamingo.inference.generation import generate
    from flamingo.inference.prompt import text_prompt
    from flamingo.inference.state import encode_prompts

    # Bad options, images and placeholders are reported before the (slow) model load.
    config = _generation_config(args)
    prompt = text_prompt(args.prompt, [Path(p) for p in args.image], max_pixels=args.max_pixels)
    model = load_model_quietly(args.model, args.trust_remote_code, args.quantize, args.revision)
    if model.config.media_token != "<image>":
        prompt = text_prompt(args.prompt.replace("<image>", model.config.media_token), prompt.media,
                             model.config.media_token)
    state = encode_prompts(model, [prompt], max_new_tokens=config.max_new_tokens)
    stream = args.stream and not args.json and config.num_beams == 1
    on_text = (lambda row, text: print(text, end="", flush=True)) if stream else None
    result = generate(model, state, config, on_text=on_text)[0]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "images": args.image, "text": result.text,
                          "new_tokens": len(result.token_ids), "finish_reason": result.finish_reason,
                          "prompt_tokens": state.length, "score": result.score}))
    elif stream:
        print()
    else:
        print(result.text)


def _cmd_chat(args: argparse.Namespace) -> None:
    from flamingo.inference.chat import run_chat

    config = _generation_config(args)
    model = load_model_quietly(args.model, args.trust_remote_code, args.quantize, args.revision)

    def write(text: str) -> None:
        print(text, end="", flush=True)

    if hasattr(sys.stdin, "reconfigure"):  # a non-UTF-8 line becomes an error message, not the end
        sys.stdin.reconfigure(errors="surrogateescape")

    run_chat(model, config, read=input, write=write, max_pixels=args.max_pixels)


def _add_decoding_options(parser: argparse.ArgumentParser, beams: bool) -> None:
    from flamingo.inference.generation import MAX_BEAMS, MAX_NEW_TOKENS
    from flamingo.model.image_processing import DEFAULT_MAX_PIXELS

    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int_range(1, MAX_NEW_TOKENS), default=30, help="at most this many new tokens (default 30)")
    if beams:
        group.add_argument("--beams", type=int_range(1, MAX_BEAMS), default=1, help="beam search width; the paper evaluates with 3")
        group.add_argument("--length-penalty", type=float_range(-100, 100), default=1.0, help="beam score = log p / length**this")
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    group.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k most likely tokens (0: all)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    group.add_argument("--seed", type=seed, default=None, help="random seed for sampling")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    group.add_argument("--no-stop-at-eoc", action="store_true", help="do not stop at <|endofchunk|> / EOS")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels than this (decompression bombs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flamingo", description="Flamingo visual language models: build, convert, inspect, run.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_option(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the embedded default model learning from examples in its prompt (offline)")
    demo.add_argument("--seed", type=seed, default=0)
    demo.add_argument("--episodes", type=positive_int, default=24, help="episodes per cell of the accuracy-vs-shots table")
    demo.set_defaults(func=_cmd_demo)

    evp = sub.add_parser(
        "eval-offline", aliases=["eval-procedural"],
        help="few-shot accuracy on held-out offline tasks (procedural shapes, real drawn objects)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  flamingo eval-offline                                  the embedded model, every task, 0/1/2/4/8 shots
  flamingo eval-offline --task binding --shots 0,4 --seeds 5 --episodes 200 --json out.json
  flamingo eval-offline --task objects-binding --images-as-text   the frozen LM alone, images given as captions
tasks: binding (new words bound to held-out kinds), binding-colours (... to held-out colours),
induction ("Output: X", the attribute shown only by example); perception: shape, colour (questions
about new scenes of training kinds/colours); real drawn objects of held-out categories (needs
apt-get install openclipart-png tuxpaint-stamps-default): objects-binding (2-way),
objects-binding-3way, objects-binding-grey (the support images replaced by grey: a control),
objects-category (animal, food, plant, ...). Answers are ranked by log-likelihood. --captions N
held-out objects are captioned (CIDEr; rate naming the coarse category; 60 by default without --task).""")
    evp.add_argument("--model", default="embedded", help="a saved model directory, hub id, or 'embedded'")
    evp.add_argument("--task", action="append", help="a task (repeatable; default: all)")
    evp.add_argument("--shots", type=int_list(0, MAX_SHOTS), default=[0, 1, 2, 4, 8],
                     help="comma-separated shot counts (default 0,1,2,4,8)")
    evp.add_argument("--seeds", type=int_range(1, 10_000), default=3, help="seeds 0..N-1, one episode set each (default 3)")
    evp.add_argument("--episodes", type=positive_int, default=100, help="episodes per seed and shot count (default 100)")
    evp.add_argument("--captions", type=non_negative_int, default=None,
                     help="held-out objects to caption (default: 60 without --task, else 0)")
    evp.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    evp.add_argument("--images-as-text", action="store_true",
                     help="replace every image by its true caption (no images: the frozen LM's own in-context "
                          "ability on the same episodes)")
    add_quantize_option(evp)
    add_revision_option(evp)
    add_trust_remote_code_option(evp)
    evp.set_defaults(func=_cmd_eval_offline)

    model_help = ("a saved model directory, a hub id (org/name) of one, a config file (untrained bridge), or "
                  "'embedded' (the default: the offline model that ships with the package)")
    gen = sub.add_parser(
        "generate", help="continue an interleaved prompt of images and text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  flamingo generate --model of-9b --image cat.jpg --prompt "<image>An image of"
  flamingo generate --model of-9b --image a.jpg --image b.jpg --beams 3 \\
      --prompt "<image>Output: two cats.<|endofchunk|><image>Output:"      # 1-shot captioning
  flamingo generate --model of-9b --image q.jpg --json --prompt "<image>Question: what colour? Answer:"
each <image> in the prompt takes the next --image, in order.""")
    gen.add_argument("--model", default="embedded", help=model_help)
    gen.add_argument("--prompt", required=True, help="text with one <image> placeholder per --image")
    gen.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (greedy/sampling)")
    _add_decoding_options(gen, beams=True)
    add_quantize_option(gen)
    add_revision_option(gen)
    add_trust_remote_code_option(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser(
        "chat", help="interactive dialogue about images (the paper's dialogue prompt)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""in the chat:
  /image PATH   attach an image to your next message
  /reset        forget the conversation
  /quit         leave (Ctrl-D works too)""")
    chat.add_argument("--model", default="embedded", help=model_help)
    _add_decoding_options(chat, beams=False)
    add_quantize_option(chat)
    add_revision_option(chat)
    add_trust_remote_code_option(chat)
    chat.set_defaults(func=_cmd_chat)

    params = sub.add_parser("params", help="parameter counts per component (frozen LM, vision, xattn, resampler)")
    params.add_argument("model", help="a config YAML/JSON file or a saved model directory")
    add_trust_remote_code_option(params)
    params.set_defaults(func=_cmd_params)

    convert = sub.add_parser("convert-openflamingo", help="convert an OpenFlamingo checkpoint.pt into a model directory")
    convert.add_argument("checkpoint", help="OpenFlamingo checkpoint (.pt/.bin, loaded with weights_only, or .safetensors)")
    convert.add_argument("--config", required=True, help="our config describing the same architecture")
    convert.add_argument("--out", required=True, help="output model directory")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing model directory --out")
    add_trust_remote_code_option(convert)
    convert.set_defaults(func=_cmd_convert)
    family = sub.add_parser("convert", help="write our model directory from a Llama 3.2 Vision checkpoint "
                                            "(as transformers saves it), once")
    family.add_argument("checkpoint", help="the checkpoint directory (config.json, safetensors, processor files)")
    family.add_argument("out", help="output model directory")
    family.add_argument("--overwrite", action="store_true", help="replace an existing model directory OUT")
    family.set_defaults(func=_cmd_convert_family)
    push = sub.add_parser(
        "push", help="upload a model directory (with its model card) to the Hugging Face Hub",
        epilog="uses your Hub login (huggingface-cli login, or HF_TOKEN); load it back with --model ORG/NAME")
    push.add_argument("model_dir", help="a saved model directory")
    push.add_argument("repo_id", help="the Hub model repository, org/name (created when missing)")
    push.add_argument("--revision", default=None, help="the branch to commit to (created when missing; default main)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--message", default=None, help="the commit message")
    push.set_defaults(func=_cmd_push)
    from flamingo.data.cli import register as add_data_subcommands

    add_data_subcommands(sub)
    from flamingo.training.cli import register as add_training_subcommands

    add_training_subcommands(sub)
    from flamingo.evaluation.cli import register as add_eval_subcommand

    add_eval_subcommand(sub)
    from flamingo.evaluation.robustness.cli import register as add_robustness_subcommand

    add_robustness_subcommand(sub)
    from flamingo.serving.cli import register as add_serve_subcommand

    add_serve_subcommand(sub)
    from flamingo.serving.batch.cli import register as add_batch_subcommand

    add_batch_subcommand(sub)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run a subcommand. A user error (UserError: bad option, config, file) ends with one line on
    stderr and exit code 2 (with --debug, its traceback too); anything else is a bug and keeps its
    traceback."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"flamingo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except MissingExtra as err:  # not the user's mistake: the install lacks an optional part
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
