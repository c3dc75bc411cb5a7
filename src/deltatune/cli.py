"""The `deltatune` command: parses arguments, calls the library, prints. Errors a user can cause print
one or two lines and exit with code 2.

    deltatune train                          # the built-in demo
    deltatune train run.yaml method.r=16 train.epochs=2
    deltatune config > run.yaml
    deltatune generate runs/demo "Write this date in ISO 8601 format: 5 May 2021"
    deltatune chat runs/demo
    deltatune merge runs/demo merged/
    deltatune export runs/demo -o model.gguf --quant q8_0 --ollama
    deltatune serve runs/demo support=runs/support --port 8000
    deltatune compare run.yaml --methods lora,ia3,bitfit train.max_steps=50
    deltatune hosted submit train.jsonl --provider openai --model gpt-4o-mini-2024-07-18
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

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
    from deltatune.training.loop import train
    from deltatune.training.setup import demo_overrides

    config, overrides = _config_and_overrides(args)
    cfg = load_config(config, overrides)
    if args.nproc is not None and args.nproc > 1:
        return _launch_torchrun(args.nproc, config, overrides, args)
    if cfg.data.train is None:
        # the demo: its settings first, so the user's own overrides still win
        cfg = load_config(config, [*demo_overrides(cfg.output.dir), *overrides])
        print("no data.train given: running the built-in demo (LoRA teaches SmolLM2-135M-Instruct to write "
              "dates in ISO 8601)", flush=True)
    train(cfg, resume=args.resume, progress=not args.no_progress, callbacks=getattr(args, "callbacks", ()))
    return 0


def _launch_torchrun(nproc: int, config: str | None, overrides: list[str], args: argparse.Namespace) -> int:
    """`deltatune train ... --nproc N`: run the same command under torchrun on this host; return its exit code."""
    import os
    import subprocess

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DeltatuneError("--nproc: already running under torchrun; drop --nproc (torchrun sets the ranks)")
    argv = [*([config] if config else []), *overrides, *(["--resume"] if args.resume else []),
            *(["--no-progress"] if args.no_progress else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "deltatune", "train", *argv]
    print("launching: torchrun " + " ".join(cmd[3:]), flush=True)
    return subprocess.call(cmd)


def cmd_compare(args: argparse.Namespace) -> int:
    """Train several methods on the same data and budget, each in its own process; write the report.
    Exit 0 when at least one method finished, 1 when none did."""
    from deltatune.compare import compare

    config, overrides = _config_and_overrides(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    result = compare(config, overrides, methods=methods, out=args.out, fresh=args.fresh, verbose=args.verbose)
    print(f"report: {result.report}; figures: {result.results}"
          + (f"; charts: {', '.join(p.name for p in result.plots)}" if result.plots else ""))
    if result.failed:
        print(f"failed: {', '.join(result.failed)} (the error of each is in the report; logs in "
              f"{result.out / 'logs'}/)", file=sys.stderr)
    return 0 if result.finished else 1


def cmd_config(args: argparse.Namespace) -> int:
    """Print the full default config (or a given config, resolved with overrides) as YAML."""
    from deltatune.config import dump_config, load_config

    print(dump_config(load_config(*_config_and_overrides(args))), end="")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a reply from a base model plus a delta."""
    from deltatune.delta import load_delta
    from deltatune.infer.generate import generate

    tools = _read_tools(args.tools)
    delta = load_delta(args.delta, device=args.device, dtype=_inference_dtype(args.precision, args.device))
    if args.merged:
        delta.method.merge(delta.loaded.model)
    replies = generate(delta.loaded.model, delta.loaded.tokenizer, list(args.prompts),
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       tools=[tools] * len(args.prompts) if tools else None)
    for reply in replies:
        print(_shown_reply(reply, tools))
    return 0


def _inference_dtype(precision: str, device: str) -> str:
    """The weight dtype of ``--precision`` for inference: fp32 is float32; bf16 (and bf16-mixed, the same for a
    model that does not train) is bfloat16; auto is bfloat16 where the device has bf16 units."""
    from deltatune.compute.precision import resolve
    from deltatune.models import pick_device

    chosen = resolve(precision, "auto", pick_device(device))
    return "float32" if chosen.name == "fp32" else "bfloat16"


def _read_tools(path: str | None) -> list[dict[str, Any]] | None:
    """The function schemas of ``--tools FILE`` (a JSON list, OpenAI's or bare schemas); None without one."""
    if path is None:
        return None
    import json
    from pathlib import Path

    from deltatune.data.tools import normalize_tools
    from deltatune.errors import DataError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"--tools: cannot read {path} ({err.strerror}); give a JSON file of function schemas"
                        ) from None
    try:
        return normalize_tools(json.loads(text), path)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); --tools takes a JSON list of function "
                        "schemas") from None


def _shown_reply(reply: str, tools: list[dict[str, Any]] | None) -> str:
    """A reply as the CLI prints it: its text, then each parsed tool call as ``tool call: {json}``."""
    if not tools:
        return reply
    from deltatune.data.tools import parse_tool_calls

    parsed = parse_tool_calls(reply)
    lines = [parsed.content] if parsed.content else []
    lines += [f"tool call: {call.as_json()}" for call in parsed.calls]
    lines += ["(a tool call that does not parse: " + reply + ")"] if parsed.malformed else []
    return "\n".join(lines)


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat interactively with a base model plus a delta (empty line or Ctrl-D to quit)."""
    from deltatune.data.tools import parse_tool_calls
    from deltatune.delta import load_delta
    from deltatune.infer.generate import generate

    tools = _read_tools(args.tools)
    delta = load_delta(args.delta, device=args.device, dtype=_inference_dtype(args.precision, args.device))
    if args.merged:
        delta.method.merge(delta.loaded.model)
    history: list[dict[str, Any]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("chat with the delta; an empty line or Ctrl-D quits"
          + ("; when it calls a tool, type the tool's result" if tools else ""), flush=True)
    prompt = "you> "
    while True:
        try:
            text = input(prompt).strip()
        except EOFError:
            break
        if not text:
            break
        if prompt == "you> ":
            history.append({"role": "user", "content": text})
        else:  # the result of the call the model just made
            history.append({"role": "tool", "content": text, "tool_call_id": history[-1]["tool_calls"][0]["id"]})
        reply = generate(delta.loaded.model, delta.loaded.tokenizer, [history], tools=[tools] if tools else None,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature)[0]
        parsed = parse_tool_calls(reply) if tools else None
        if parsed is not None and parsed.calls:
            history.append({"role": "assistant", "content": parsed.content, "tool_calls": [parsed.calls[0].openai()]})
            prompt = f"tool {parsed.calls[0].name}> "
        else:
            history.append({"role": "assistant", "content": reply})
            prompt = "you> "
        print(f"model> {_shown_reply(reply, tools)}", flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate base model + delta on a data file: loss (and perplexity or accuracy), exact match."""
    import json
    from pathlib import Path

    from deltatune.config import load_config
    from deltatune.data import load_examples, tokenize_examples
    from deltatune.delta import load_delta
    from deltatune.evaluate import eval_loss, exact_match, has_tool_calls, tool_call_accuracy
    from deltatune.training.shape import batching_mode

    run_file = Path(args.delta) / "run.yaml"
    run_cfg = load_config(run_file if run_file.is_file() else None)
    data_cfg = run_cfg.data  # the run's own data settings
    delta = load_delta(args.delta, device=args.device, dtype=_inference_dtype(args.precision, args.device))
    model, tokenizer, task = delta.loaded.model, delta.loaded.tokenizer, delta.info.task
    examples = load_examples(args.data, args.format or data_cfg.format, system_prompt=data_cfg.system_prompt)
    if examples and examples[0].is_pair:  # preference pairs: the objective's loss and reward figures
        from deltatune.models import load_model
        from deltatune.training.preference import evaluate_delta_on_pairs

        base_cfg = run_cfg.model.model_copy(update={"name": delta.info.base_model, "device": args.device})
        print(json.dumps(evaluate_delta_on_pairs(
            model, delta.method, tokenizer, examples, run_cfg, batch_size=args.batch_size,
            device=delta.loaded.device, base_loader=lambda: load_model(base_cfg, task="causal_lm").model)))
        return 0
    label2id = {v: k for k, v in model.config.id2label.items()} if task == "classification" else None
    tokenized, report = tokenize_examples(examples, tokenizer, task=task, max_length=data_cfg.max_length,
                                          truncation=data_cfg.truncation, train_on_prompt=data_cfg.train_on_prompt,
                                          label2id=label2id)
    mode = batching_mode(data_cfg, task)  # as the run trained
    figures: dict[str, object] = eval_loss(model, tokenized, task=task, batch_size=args.batch_size, mode=mode,
                                           pad_id=tokenizer.pad_token_id or 0, device=delta.loaded.device)
    if args.generations and task == "causal_lm":
        measure = tool_call_accuracy if has_tool_calls(examples) else exact_match  # calls compared as objects
        figures.update({k: v for k, v in measure(model, tokenizer, examples, limit=args.generations).items()
                        if k != "samples"})
    figures["examples"] = report.n_kept
    print(json.dumps(figures))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold a delta into its base weights (de-quantizing a quantized base first) and write a plain
    transformers model folder; print how far the merged model's logits are from base + delta."""
    import torch

    from deltatune.delta import load_delta, save_merged
    from deltatune.outputs import check_new_folder
    from deltatune.quantize import QuantSpec

    check_new_folder(args.out, "merge: OUT")  # before the slow load
    delta = load_delta(args.delta, device="cpu")
    quant = delta.info.quantization
    probe = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        before = delta.loaded.model(input_ids=probe).logits
    out = save_merged(delta, args.out, dtype=args.dtype)
    with torch.no_grad():
        after = delta.loaded.model.float()(input_ids=probe).logits
    unmerged = f"the {QuantSpec(**quant).describe()} base + delta" if quant else "base + delta"
    print(f"merged model written to {out} ({args.dtype}{', de-quantized' if quant else ''}); max |logit "
          f"difference| to {unmerged}: {float((after - before).abs().max()):.2e}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write base + delta (merged), a base alone, or a LoRA delta alone as a GGUF file for llama.cpp/Ollama."""
    from deltatune.export import export_gguf

    export_gguf(args.delta, args.output, base=args.base, quant=args.quant, adapter_only=args.adapter_only,
                ollama=args.ollama, force=args.force)
    return 0


def _delta_root(args: argparse.Namespace) -> str | None:
    if args.allow_delta_updates and not args.delta_root:
        raise DeltatuneError("serve --allow-delta-updates: also give --delta-root DIR, the folder deltas may be "
                             "loaded from")
    if args.delta_root and not args.allow_delta_updates:
        raise DeltatuneError("serve --delta-root: deltas are added and removed only with --allow-delta-updates")
    return args.delta_root if args.allow_delta_updates else None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve deltas on one base over an OpenAI-compatible HTTP API until Ctrl-C or SIGTERM."""
    import os

    from deltatune.serving import delta_names, serve

    api_key = args.api_key or os.environ.get("DELTATUNE_API_KEY") or None  # never printed
    delta_root = _delta_root(args)
    if args.engine == "vllm" and delta_root is not None:
        raise DeltatuneError("serve --engine vllm: --allow-delta-updates is for deltatune's engine; vLLM's own is "
                             "the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
    if args.engine == "vllm":
        from deltatune.serving.vllm import run_vllm, vllm_command

        command = vllm_command(delta_names(args.deltas), base=args.base, host=args.host, port=args.port,
                               api_key=api_key, max_batch=args.max_batch)
        return run_vllm(command, api_key)
    serve(delta_names(args.deltas), base=args.base, host=args.host, port=args.port, api_key=api_key,
          max_batch=args.max_batch, max_queue=args.max_queue, device=args.device,
          dtype=args.dtype if args.dtype != "auto" else _inference_dtype(args.precision, args.device),
          quantize=args.quantize, delta_root=delta_root)
    return 0


# ---- hosted fine-tuning (OpenAI, Vertex AI) -----------------------------------------------------------

def _hosted_options(args: argparse.Namespace) -> dict[str, object]:
    """The provider options given on the command line (None where not given: the SDK decides)."""
    return {"base_url": args.base_url, "project": args.project, "location": args.location,
            "staging": getattr(args, "staging", None)}


def _print_warnings(warnings: list[str]) -> None:
    for text in warnings:
        print(f"warning: {text}", file=sys.stderr)


def cmd_hosted_prepare(args: argparse.Namespace) -> int:
    """Convert a data file to the provider's format and check it; write it when there are no errors."""
    from pathlib import Path

    from deltatune import hosted

    out = args.output or f"{Path(args.data).stem}.{args.provider}.jsonl"
    report = hosted.prepare(args.data, args.provider, None, model=args.model, fmt=args.format)
    _print_warnings(report.warnings)
    report.raise_for_errors(args.data)
    hosted.write_jsonl(report.rows, out)
    print(f"{len(report.rows)} examples written to {out} ({args.provider} format)")
    return 0


def cmd_hosted_estimate(args: argparse.Namespace) -> int:
    """Print token counts, the epochs the provider would pick, billed tokens and (given a price) the cost."""
    from deltatune import hosted

    est = hosted.estimate(args.data, args.provider, args.model, epochs=args.epochs,
                          price_per_million=args.price_per_1m, fmt=args.format)
    print("\n".join(est.lines()))
    return 0


def cmd_hosted_submit(args: argparse.Namespace) -> int:
    """Check, upload and start a hosted fine-tuning job; print its id."""
    from deltatune import hosted

    if args.provider == "openai":
        print(hosted.OPENAI_SUNSET_NOTICE, file=sys.stderr)
    job = hosted.submit(args.data, args.provider, args.model, validation=args.validation, epochs=args.epochs,
                        lr_multiplier=args.lr_multiplier, batch_size=args.batch_size, suffix=args.suffix,
                        fmt=args.format, beta=args.beta, **_hosted_options(args))
    _print_warnings(job.warnings)
    print(job.id)
    print(f"follow it with: deltatune hosted wait {job.id}", file=sys.stderr)
    return 0


def cmd_hosted_status(args: argparse.Namespace) -> int:
    """Print a job's unified status, base model, progress, result or error."""
    from deltatune import hosted

    print(hosted.job(args.job, args.provider, **_hosted_options(args)).status().summary())
    return 0


def cmd_hosted_events(args: argparse.Namespace) -> int:
    """Print a job's most recent events, oldest first."""
    import time

    from deltatune import hosted

    for event in hosted.job(args.job, args.provider, **_hosted_options(args)).events(limit=args.limit):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.created_at))
        print(f"{stamp}  {event.level:<5}  {event.message}")
    return 0


def cmd_hosted_list(args: argparse.Namespace) -> int:
    """Print the provider's recent jobs, one line each."""
    from deltatune import hosted

    for info in hosted.list_jobs(args.provider or "openai", args.limit, **_hosted_options(args)):
        print(info.summary())
    return 0


def cmd_hosted_cancel(args: argparse.Namespace) -> int:
    """Cancel a job and print its status after the request."""
    from deltatune import hosted

    print(hosted.job(args.job, args.provider, **_hosted_options(args)).cancel().summary())
    return 0


def cmd_hosted_wait(args: argparse.Namespace) -> int:
    """Follow a job with a live status line until it ends: exit 0 on success, 1 on failure or cancel."""
    import time

    from deltatune import hosted

    live = sys.stdout.isatty()
    start, last = time.monotonic(), ""

    def show(info: hosted.JobInfo) -> None:
        nonlocal last
        elapsed = int(time.monotonic() - start)
        line = f"{info.summary()}  [{elapsed // 60:02d}:{elapsed % 60:02d}]"
        if live:
            print(f"\r\033[K{line}", end="", flush=True)
        elif info.summary() != last:
            print(line, flush=True)
        last = info.summary()

    info = hosted.job(args.job, args.provider, **_hosted_options(args)).wait(
        poll_interval=args.poll, timeout=args.timeout, on_update=show)
    if live:
        print()
    if info.status == "succeeded":
        print(f"succeeded: {info.fine_tuned_model or info.id}")
        return 0
    print(f"deltatune: job {info.id} {info.status}" + (f": {info.error}" if info.error else ""), file=sys.stderr)
    return 1


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "bf16-mixed"],
                   help="weights in float32 or bfloat16 (auto: bf16 where the CPU/GPU has bf16 units, else fp32)")


def _add_hosted_parser(sub: argparse._SubParsersAction) -> None:
    """The `hosted` command group: prepare, estimate, submit, status, events, list, cancel, wait."""
    notice = ("OpenAI has announced that self-serve fine-tuning job creation ends for all organisations on "
              "2027-01-06. Credentials: OPENAI_API_KEY for OpenAI; Google Application Default Credentials "
              "and GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_LOCATION for Vertex AI. Never printed.")
    group = sub.add_parser("hosted", help="fine-tune with OpenAI or Vertex AI: the same data, hosted",
                           description="Hosted fine-tuning with OpenAI or Vertex AI. " + notice)
    hsub = group.add_subparsers(dest="hosted_command", required=True, metavar="SUBCOMMAND")

    def command(name: str, handler: Handler, text: str, *, data: bool = False, job: bool = False,
                provider_required: bool = False) -> argparse.ArgumentParser:
        p = hsub.add_parser(name, help=text, description=f"{text}. {notice}")
        if data:
            p.add_argument("data", help="a data file in any format deltatune reads (.jsonl, .json, .csv, ...)")
        if job:
            p.add_argument("job", help="the job id (OpenAI ftjob-...; Vertex projects/.../tuningJobs/...)")
        p.add_argument("--provider", choices=["openai", "vertex"], required=provider_required,
                       default=None, help="the hosted service" + ("" if provider_required else
                                                                 " (default: told from the job id, else openai)"))
        p.add_argument("--base-url", help="API endpoint (default: the SDK's, or OPENAI_BASE_URL)")
        p.add_argument("--project", help="Vertex: Google Cloud project (default: GOOGLE_CLOUD_PROJECT)")
        p.add_argument("--location", help="Vertex: region (default: GOOGLE_CLOUD_LOCATION or us-central1)")
        p.set_defaults(handler=handler)
        return p

    for name, handler, text in (("prepare", cmd_hosted_prepare, "convert and check data for the provider"),
                                ("estimate", cmd_hosted_estimate, "estimate tokens, epochs, billed tokens, price"),
                                ("submit", cmd_hosted_submit, "check, upload and start a fine-tuning job")):
        p = command(name, handler, text, data=True, provider_required=True)
        p.add_argument("--format", default="auto", help="data format (default: detected)")
        p.add_argument("--model", required=name != "prepare", help="the base model, e.g. gpt-4o-mini-2024-07-18 "
                                                                   "or gemini-2.5-flash")
        if name == "prepare":
            p.add_argument("-o", "--output", help="output JSONL (default: DATA.PROVIDER.jsonl here)")
        if name != "prepare":
            p.add_argument("--epochs", type=int, help="epochs (default: the provider picks)")
        if name == "estimate":
            p.add_argument("--price-per-1m", type=float, help="the provider's price per 1M training tokens")
        if name == "submit":
            p.add_argument("--validation", help="a validation data file (any format)")
            p.add_argument("--lr-multiplier", type=float, help="learning-rate multiplier")
            p.add_argument("--batch-size", type=int, help="batch size")
            p.add_argument("--suffix", help="name suffix of the tuned model (Vertex: its display name)")
            p.add_argument("--beta", type=float, help="preference data (prompt/chosen/rejected), which starts a DPO "
                                                      "job (OpenAI) or preference tuning (Vertex): its beta")
            p.add_argument("--staging", help="Vertex: gs://BUCKET/PREFIX the training file is uploaded to")
    for name, handler, text in (("status", cmd_hosted_status, "show a job's status"),
                                ("events", cmd_hosted_events, "show a job's events"),
                                ("cancel", cmd_hosted_cancel, "cancel a job"),
                                ("wait", cmd_hosted_wait, "follow a job live until it ends (exit 0 on "
                                                          "success, 1 on failure)")):
        p = command(name, handler, text, job=True)
        if name == "events":
            p.add_argument("--limit", type=int, default=50, help="most recent events to show")
        if name == "wait":
            p.add_argument("--poll", type=float, default=10.0, help="seconds between polls")
            p.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    p = command("list", cmd_hosted_list, "list recent jobs")
    p.add_argument("--limit", type=int, default=20)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be computed only when help is shown (the list of config keys
    imports every method, which no command but `--help` needs)."""

    def __init__(self, *args: Any, epilog_factory: Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epilog_factory = epilog_factory

    def format_help(self) -> str:
        """Return the help text, computing the epilog first when it is lazy."""
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def _export_epilog() -> str:
    from deltatune.export.tensors import K_QUANT_HINT

    return K_QUANT_HINT + "."


def _compare_all_help() -> str:
    from deltatune.compare.settings import ALL_HELP

    return ALL_HELP


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every command."""
    parser = _Parser(prog="deltatune", description="Fine-tune pre-trained language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a method (no arguments: the built-in demo)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog_factory=_keys_help,
                       description="Train with a YAML config and key=value overrides "
                                   "(defaults < YAML < overrides).")
    p.add_argument("config", nargs="?", help="run config YAML (see `deltatune config`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.r=16 train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train on N processes of this host (N GPUs, or N CPU processes): launches "
                        "`torchrun --standalone --nproc-per-node N -m deltatune train ...`; for several hosts "
                        "run torchrun yourself (README: Several GPUs and hosts)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("compare", help="train several methods on the same data and budget; report and charts",
                       description="Train each method in its own process on the same data, example order and "
                                   "budget, and write report.md, results.json and PNG charts into the output "
                                   "folder. Running the same command again skips finished methods and resumes "
                                   "an interrupted one. The compare file is a run config with an optional "
                                   "`compare:` section (README: Comparing methods).")
    p.add_argument("config", nargs="?", help="run config YAML with an optional compare: section")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50 "
                                                "compare.overrides.lora.method.r=16")
    p.add_argument("--methods", metavar="LIST", help="comma-separated methods, or all (default: compare.methods, "
                                                    "else all); " + _compare_all_help())
    p.add_argument("-o", "--out", help="output folder (default: output.dir of the file, else runs/compare)")
    p.add_argument("--fresh", action="store_true", help="train every method again, ignoring earlier results")
    p.add_argument("--verbose", action="store_true", help="show each method's training output (always in "
                                                          "<out>/logs/<method>.log)")
    p.set_defaults(handler=cmd_compare)

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
        _add_precision(p)
        p.add_argument("--tools", metavar="FILE", help="a JSON list of function schemas the model may call "
                                                       "(rendered as in training; calls printed as JSON)")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
        p.add_argument("--device", default="auto")
        p.set_defaults(handler=handler)

    p = sub.add_parser("eval", help="evaluate base model + delta on a data file (loss, accuracy, exact match)")
    p.add_argument("delta", help="the delta folder")
    p.add_argument("--data", required=True, help="a data file in any supported format")
    p.add_argument("--format", help="data format (default: the run's data.format)")
    p.add_argument("--batch-size", type=int, default=8)
    _add_precision(p)
    p.add_argument("--generations", type=int, default=0, help="exact match of greedy replies on N examples "
                   "(tool-calling data: tool-call accuracy and parse rate on N call turns)")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("merge", help="fold a delta into the weights: a plain transformers model folder")
    p.add_argument("delta", help="the delta folder")
    p.add_argument("out", help="new folder for the merged model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("export", help="write a GGUF file for llama.cpp and Ollama (merged, base, or LoRA adapter)",
                       description="Write base + delta, merged, as one GGUF file that llama.cpp, Ollama and LM "
                                   "Studio load; or a base model alone (--base), or a LoRA delta alone as a "
                                   "llama.cpp adapter (--adapter-only). Pure Python: no llama.cpp build needed.",
                       epilog_factory=_export_epilog)
    p.add_argument("delta", nargs="?", help="the delta folder (output.dir of a training run); omit with --base")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write, e.g. model.gguf")
    p.add_argument("--quant", help="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 (default q8_0; f16 for "
                                   "--adapter-only); 1-D tensors stay f32")
    p.add_argument("--base", metavar="MODEL", help="export this base model alone (any model.name: default, minilm, "
                                                   "a folder, a .gguf file, a hub id)")
    p.add_argument("--adapter-only", action="store_true", help="a LoRA delta alone, in llama.cpp's adapter format: "
                                                               "llama-cli -m base.gguf --lora adapter.gguf")
    p.add_argument("--ollama", action="store_true", help="also write a Modelfile beside the file (FROM, TEMPLATE "
                                                         "and stop tokens of the model's chat format, the system "
                                                         "prompt): ollama create NAME -f Modelfile")
    p.add_argument("--force", action="store_true", help="replace an existing GGUF file (never any other file)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("serve", help="serve deltas on one base: an OpenAI-compatible API, continuous batching",
                       description="Load the base once and every delta on it, and answer the OpenAI API "
                                   "(/v1/chat/completions, /v1/completions, /v1/models, /health); the request's "
                                   "`model` picks the delta. Requests for different deltas share one batch "
                                   "(LoRA and DoRA, IA3, BitFit, prompt tuning, p-tuning, prefix tuning); the "
                                   "other methods run in turns on views of the base. Ctrl-C or SIGTERM: requests "
                                   "in flight finish, then the server exits.")
    p.add_argument("deltas", nargs="*", help="delta folders, as PATH (named after the folder) or NAME=PATH")
    p.add_argument("--base", metavar="MODEL", help="the base model (default: the one the first delta was "
                                                   "trained on); alone, it serves the base")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $DELTATUNE_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    p.add_argument("--quantize", choices=["int8"],
                   help="the base's linear layers in int8, multiplied in int8 (LLM.int8: outlier channels in float); "
                        "deltas stay float32")
    p.add_argument("--engine", choices=["deltatune", "vllm"], default="deltatune",
                   help="vllm: start vLLM's OpenAI server for the same base and LoRA deltas instead (where vLLM is "
                        "installed; GPUs, several machines)")
    p.add_argument("--allow-delta-updates", action="store_true",
                   help="accept POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's request shape, any "
                        "method) for folders under --delta-root")
    p.add_argument("--delta-root", metavar="DIR", help="the only folder deltas may be loaded from at run time")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the base's weights (auto: as --precision says)")
    _add_precision(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=cmd_serve)

    _add_hosted_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, callbacks: Sequence[Any] = ()) -> int:
    """Run the `deltatune` command with ``argv``; return the exit code (2 for user errors). ``callbacks``
    (``deltatune.Callback`` objects) join a `train` run's own, as ``train(callbacks=...)`` takes them."""
    parser = build_parser()
    # key=value overrides may come after options (`train run.yaml --resume a=1`): collect those too
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    handler: Handler = args.handler
    args.callbacks = list(callbacks)
    try:
        return handler(args)
    except DeltatuneError as err:
        print(f"deltatune: {err}", file=sys.stderr)
        code = getattr(err, "exit_code", 2)  # Interrupted: 130 (Ctrl-C) or 143 (SIGTERM)
        if getattr(err, "exit_at_once", False):
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt as stop:
        from deltatune.training.signals import Terminated

        terminated = isinstance(stop, Terminated)
        print(f"deltatune: {'stopped by SIGTERM' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
