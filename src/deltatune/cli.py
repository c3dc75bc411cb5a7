"""The `deltatune` command: parses arguments, calls the library, prints. Errors a user can cause print
one or two lines and exit with code 2.

    deltatune train                          # the built-in demo
    deltatune train run.yaml method.r=16 train.epochs=2
    deltatune config > run.yaml
    deltatune generate runs/demo "Write this date in ISO 8601 format: 5 May 2021"
    deltatune chat runs/demo
    deltatune merge runs/demo merged/
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence

from deltatune.errors import DeltatuneError

Handler = Callable[[argparse.Namespace], int]


def _keys_help() -> str:
    from deltatune.config import describe_keys

    lines = ["config keys (set in the YAML file or as key=value):"]
    for key, default, help_text in describe_keys():
        lines.append(f"  {key} = {default}")
        lines += textwrap.wrap(help_text, width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The optional config file is positional, so `deltatune train a=1` puts an override in its place."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    return config, overrides


def cmd_train(args: argparse.Namespace) -> int:
    """Train a method; with no config and no data, run the built-in demo."""
    from deltatune.config import load_config
    from deltatune.train.loop import train
    from deltatune.train.setup import demo_overrides

    config, overrides = _config_and_overrides(args)
    cfg = load_config(config, overrides)
    if cfg.data.train is None:
        # the demo: its settings first, so the user's own overrides still win
        cfg = load_config(config, [*demo_overrides(), *overrides])
        print("no data.train given: running the built-in demo (LoRA teaches SmolLM2-135M-Instruct to write "
              "dates in ISO 8601)", flush=True)
    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the full default config (or a given config, resolved with overrides) as YAML."""
    from deltatune.config import dump_config, load_config

    print(dump_config(load_config(*_config_and_overrides(args))), end="")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a reply from a base model plus a delta."""
    from deltatune.delta import load_delta
    from deltatune.infer.generate import generate

    delta = load_delta(args.delta, device=args.device)
    if args.merged:
        delta.method.merge(delta.loaded.model)
    replies = generate(delta.loaded.model, delta.loaded.tokenizer, list(args.prompts),
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    for reply in replies:
        print(reply)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat interactively with a base model plus a delta (empty line or Ctrl-D to quit)."""
    from deltatune.delta import load_delta
    from deltatune.infer.generate import generate

    delta = load_delta(args.delta, device=args.device)
    if args.merged:
        delta.method.merge(delta.loaded.model)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("chat with the delta; an empty line or Ctrl-D quits", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        reply = generate(delta.loaded.model, delta.loaded.tokenizer, [history],
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold a delta into its base weights and write a plain transformers model folder."""
    import torch

    from deltatune.delta import load_delta, save_merged

    delta = load_delta(args.delta, device="cpu")
    probe = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        before = delta.loaded.model(input_ids=probe).logits
    out = save_merged(delta, args.out, dtype=args.dtype)
    with torch.no_grad():
        after = delta.loaded.model.float()(input_ids=probe).logits
    print(f"merged model written to {out} (max |logit difference| to base + delta: "
          f"{float((after - before).abs().max()):.2e})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every command."""
    parser = argparse.ArgumentParser(prog="deltatune", description="Fine-tune pre-trained language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a method (no arguments: the built-in demo)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_keys_help(),
                       description="Train with a YAML config and key=value overrides "
                                   "(defaults < YAML < overrides).")
    p.add_argument("config", nargs="?", help="run config YAML (see `deltatune config`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.r=16 train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("config", help="print the full default config (or a resolved one) as YAML")
    p.add_argument("config", nargs="?", help="a YAML config to resolve")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(handler=cmd_config)

    for name, handler, text in (("generate", cmd_generate, "generate replies with base model + delta"),
                                ("chat", cmd_chat, "chat interactively with base model + delta")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("delta", help="the delta folder (output.dir of a training run)")
        if name == "generate":
            p.add_argument("prompts", nargs="+", help="one or more user messages")
        else:
            p.add_argument("--system", help="a system message")
        p.add_argument("--merged", action="store_true", help="fold the delta into the weights first")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
        p.add_argument("--device", default="auto")
        p.set_defaults(handler=handler)

    p = sub.add_parser("merge", help="fold a delta into the weights: a plain transformers model folder")
    p.add_argument("delta", help="the delta folder")
    p.add_argument("out", help="new folder for the merged model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(handler=cmd_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `deltatune` command with ``argv``; return the exit code (2 for user errors)."""
    parser = build_parser()
    # key=value overrides may come after options (`train run.yaml --resume a=1`): collect those too
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    handler: Handler = args.handler
    try:
        return handler(args)
    except DeltatuneError as err:
        from deltatune.train.loop import Interrupted

        print(f"deltatune: {err}", file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 2
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
