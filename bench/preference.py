"""The preference-tuning benchmark: DPO, SimPO and ORPO with LoRA on SmolLM2-135M-Instruct, against TRL.

    .venv/bin/python bench/preference.py                      # speed table (6 steps each) + quality (1 epoch each)
    .venv/bin/python bench/preference.py --speed-only --steps 3
    .venv/bin/python bench/preference.py --quality-only --epochs 2

The data: ../shared/data/dpo_en_train.json (200 ShareGPT preference pairs), tokenized with deltatune's own data
path (chat template, loss on each reply and its end-of-turn); the pairs whose longer sequence (prompt + reply)
exceeds 1,024 tokens are dropped, the last 31 kept pairs are held out for evaluation, the others train.

Speed: each contender in its own process (its peak resident memory its own), 2 threads, float32, LoRA r 16 alpha
32 on every linear layer, no dropout, 4 pairs per optimizer step, AdamW lr 2e-4 constant, gradient norm clipped
at 1.0; the same pairs in the same order for everyone (deltatune's plan: one seeded permutation cut into 4s; TRL
reads those rows with a sequential sampler).

- ``deltatune sft``: supervised fine-tuning on the same steps' prompt + chosen conversations (the SFT baseline).
- ``deltatune dpo`` / ``simpo`` / ``orpo``: ``train.objective``; pairs packed with the prompt shared by both replies;
  DPO's reference under LoRA's disable switch, one no-grad forward per step.
- ``trl dpo``: TRL's DPOTrainer with a peft LoraConfig (its reference: the adapter disabled), beta 0.1, padded
  batches of [chosen; rejected] (TRL 1.x has disabled ``padding_free`` for DPO), activation checkpointing off.
- ``trl sft``: TRL's SFTTrainer (padding-free) on the same prompts and chosen replies as prompt-completion rows
  (loss on the reply only), for the SFT ratio.

Tokens/s counts the same numerator for every preference contender: each pair's prompt once plus both replies
(what the pair holds); the SFT contenders count prompt + chosen. Steps 2..N are timed (step 1 warms up).

Quality (deltatune only): DPO, SimPO and ORPO each trained on the training pairs (``--epochs``, default 1, 4 pairs
per step), evaluated on the 31 held-out pairs before and after: reward accuracy and mean reward margin (rewards
as each objective defines them, compute/preference.py).

Printed: Markdown tables; everything also goes to runs/bench-preference/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dpo_en_train.json"
SEED, PAIRS_PER_STEP, LR, RANK, ALPHA, CLIP, MAX_LENGTH, HELD_OUT = 42, 4, 2e-4, 16, 32, 1.0, 1024, 31
OBJECTIVES = ("dpo", "simpo", "orpo")
CONTENDERS = ("deltatune-sft", "trl-sft", "deltatune-dpo", "trl-dpo", "deltatune-simpo", "deltatune-orpo")


def deltatune_settings(spec: dict[str, Any], objective: str) -> list[str]:
    """The deltatune settings of the work."""
    data = spec["sft_train"] if objective == "sft" else spec["train"]
    evals = f"data.eval={spec['eval']}" if spec.get("with_eval") else "data.eval=null"
    budget = [f"train.max_steps={spec['steps']}"] if spec.get("steps") else [f"train.epochs={spec['epochs']}"]
    return ["model.name=default", f"data.train={data}", evals, f"data.max_length={MAX_LENGTH}", "method.name=lora",
            f"method.r={RANK}", f"method.alpha={ALPHA}", "method.dropout=0", "method.targets=all-linear",
            f"train.batch_size={PAIRS_PER_STEP}", f"train.lr={LR}", *budget, "train.schedule=constant",
            "train.warmup=0", f"train.seed={SEED}", f"train.objective={objective}", "train.precision=fp32",
            f"output.dir={spec['out']}",
            "output.overwrite=true"]


def worker_deltatune(spec: dict[str, Any]) -> dict[str, Any]:
    """deltatune's train() with the objective; each step timed by a callback; the eval figures when asked."""
    torch = speed._child_setup(spec)
    import deltatune.training.loop as loop
    from deltatune.config import load_config
    from deltatune.training.callbacks import Callback

    records: list[dict[str, Any]] = []
    tokens = spec.get("tokens_per_step")

    class StepTimer(Callback):
        def on_train_start(self, run: Any) -> None:
            self.mark = time.perf_counter()

        def on_step_end(self, run: Any, metrics: dict[str, Any]) -> None:
            now = time.perf_counter()
            seconds, self.mark = now - self.mark, now
            k = len(records)
            records.append({"seconds": seconds, "loss": float(metrics["loss"]),
                            "tokens": tokens[k] if tokens else metrics["step_tokens"],
                            "examples": sorted(run.step_examples)})
            print(f"STEP {k + 1} {seconds:.1f} s loss {metrics['loss']:.4f}", flush=True)

    result = loop.train(load_config(None, deltatune_settings(spec, spec["objective"])), progress=False,
                        callbacks=[StepTimer()])
    del torch
    return {"steps": records, "eval_start": result.eval_start, "eval_end": result.eval_end,
            "peak_rss_bytes": speed.resource.getrusage(speed.resource.RUSAGE_SELF).ru_maxrss * 1024}


def _trl_clock(torch: Any, marks: list[float]) -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())
            print(f"STEP {len(marks) - 1} {marks[-1] - marks[-2]:.1f} s", flush=True)

    return Clock()


def _trl_common(spec: dict[str, Any]) -> dict[str, Any]:
    return {"output_dir": str(spec["out"]), "per_device_train_batch_size": PAIRS_PER_STEP,
            "gradient_accumulation_steps": 1, "max_steps": spec["steps"], "learning_rate": LR,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": CLIP,
            "optim": "adamw_torch", "seed": SEED, "train_sampling_strategy": "sequential",
            "activation_checkpointing": False, "bf16": False, "fp16": False, "use_cpu": True, "report_to": [],
            "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0}


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer (``objective`` dpo) or SFTTrainer (``sft``) with a peft LoRA, on the work's rows in order."""
    torch = speed._child_setup(spec)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = json.loads(Path(spec["work"]).read_text())["rows"]
    source = spec["source"]
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    marks: list[float] = []
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if spec["objective"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        trainer = DPOTrainer(model=model, args=DPOConfig(**_trl_common(spec), beta=0.1, max_length=None),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora,
                             callbacks=[_trl_clock(torch, marks)])
    else:
        from trl import SFTConfig, SFTTrainer

        # prompt-completion rows: TRL puts the loss on the completion only, as deltatune does on the reply
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["chosen"]}]}
                                  for r in rows])
        trainer = SFTTrainer(model=model, args=SFTConfig(**_trl_common(spec), padding_free=True, max_length=None,
                                                         shuffle_dataset=False),
                             train_dataset=data, processing_class=tokenizer, peft_config=lora,
                             callbacks=[_trl_clock(torch, marks)])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = spec["tokens_per_step"]
    steps = [{"seconds": marks[k + 1] - marks[k], "loss": losses[k] if k < len(losses) else None, "tokens": tokens[k]}
             for k in range(len(marks) - 1)]
    return {"steps": steps, "peak_rss_bytes": speed.resource.getrusage(speed.resource.RUSAGE_SELF).ru_maxrss * 1024}


WORKERS = {"deltatune": worker_deltatune, "trl": worker_trl}


# ---- the parent ------------------------------------------------------------------------------------------------

def prepare(out: Path, steps: int) -> dict[str, Any]:
    """Tokenize the pairs once with deltatune, keep those within MAX_LENGTH, hold out the last HELD_OUT, write the
    training, eval and SFT files, and plan the speed run's steps; return what the contenders need."""
    from transformers import AutoTokenizer

    from deltatune.data import load_examples, plan_batches, tokenize_examples
    from deltatune.data.formats import Example, Message
    from deltatune.data.pairs import tokenize_pairs
    from deltatune.models import resolve_source

    source = str(resolve_source("default"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    records = json.loads(DATA.read_text())
    examples = load_examples(str(DATA))
    pairs, _ = tokenize_pairs(examples, tokenizer, max_length=10**6, truncation="error")
    kept = [k for k, p in enumerate(pairs) if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
            <= MAX_LENGTH]
    train_ids, eval_ids = kept[:-HELD_OUT], kept[-HELD_OUT:]
    files = {"train": out / "pairs-train.json", "eval": out / "pairs-eval.json", "sft_train": out / "sft-train.json"}
    files["train"].write_text(json.dumps([records[k] for k in train_ids]))
    files["eval"].write_text(json.dumps([records[k] for k in eval_ids]))
    files["sft_train"].write_text(json.dumps([{"conversations": records[k]["conversations"] + [records[k]["chosen"]]}
                                              for k in train_ids]))
    plan = plan_batches([len(pairs[k].input_ids) for k in train_ids], batch_size=PAIRS_PER_STEP, mode="pack",
                        seed=SEED, epoch=0)[:steps]

    def prompt(k: int) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in examples[k].messages or []]

    rows = [{"prompt": prompt(train_ids[i]), "chosen": examples[train_ids[i]].chosen.content,  # type: ignore[union-attr]
             "rejected": examples[train_ids[i]].rejected.content} for step in plan for i in step]  # type: ignore[union-attr]
    sft_examples = [Example(examples[train_ids[i]].origin, messages=[
        *[Message(m.role, m.content) for m in examples[train_ids[i]].messages or []],
        examples[train_ids[i]].chosen]) for step in plan for i in step]  # type: ignore[list-item]
    sft_tokenized, _ = tokenize_examples(sft_examples, tokenizer, task="causal_lm", max_length=10**6,
                                         truncation="error")
    sft_lengths = [len(t.input_ids) for t in sft_tokenized]
    pair_tokens = [sum(len(pairs[train_ids[i]].input_ids) for i in step) for step in plan]
    sft_tokens = [sum(sft_lengths[j * PAIRS_PER_STEP:(j + 1) * PAIRS_PER_STEP]) for j in range(len(plan))]
    shared = sum(len(pairs[k].prompt_ids) for k in train_ids)
    separate = sum(len(pairs[k].input_ids) + len(pairs[k].prompt_ids) for k in train_ids)
    (out / "work.json").write_text(json.dumps({"rows": rows}))
    return {"source": source, **{k: str(v) for k, v in files.items()}, "work": str(out / "work.json"),
            "plan": plan, "pair_tokens": pair_tokens, "sft_tokens": sft_tokens, "n_train": len(train_ids),
            "n_eval": len(eval_ids), "n_dropped": len(pairs) - len(kept), "prompt_share_saved": shared / separate}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s and s/step over steps 2..N, the losses at the first and last step, peak memory."""
    timed = raw["steps"][1:] or raw["steps"]
    seconds = sum(s["seconds"] for s in timed)
    return {"tokens_per_s": sum(s["tokens"] for s in timed) / seconds, "s_per_step": seconds / len(timed),
            "loss_first": raw["steps"][0]["loss"], "loss_last": raw["steps"][-1]["loss"],
            "peak_rss_gb": raw["peak_rss_bytes"] / 1e9}


def run_speed(opts: argparse.Namespace, work: dict[str, Any], out: Path) -> dict[str, Any]:
    """Each contender for ``opts.steps`` steps; print the table and the ratios; return the figures."""
    rows: dict[str, dict[str, Any]] = {}
    for name in opts.contenders.split(","):
        kind, objective = name.split("-")
        spec = {**work, "name": name, "tag": name, "objective": objective, "steps": opts.steps,
                "threads": opts.threads, "out": str(out / name), "device": "cpu",
                "tokens_per_step": work["sft_tokens"] if objective == "sft" else work["pair_tokens"]}
        print(f"running {name} ...", file=sys.stderr, flush=True)
        raw = speed.run_child(kind, spec, out / "logs", script=__file__)
        if raw is not None:
            rows[name] = {**summarize(raw), "raw": raw}
    print(f"\n### Speed: {opts.steps} steps of {PAIRS_PER_STEP} pairs (steps 2..{opts.steps} timed), "
          f"{cpu_name()}, {opts.threads} threads, float32\n")
    print("| contender | tokens/s | s/step | peak RSS GB | loss step 1 | loss last |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        last = "-" if r["loss_last"] is None else f"{r['loss_last']:.4f}"
        first = "-" if r["loss_first"] is None else f"{r['loss_first']:.4f}"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} | {r['peak_rss_gb']:.2f} | {first} "
              f"| {last} |")
    ratios = {}
    for mine, peer in (("deltatune-sft", "trl-sft"), ("deltatune-dpo", "trl-dpo")):
        if mine in rows and peer in rows:
            ratios[f"{mine} / {peer}"] = rows[mine]["tokens_per_s"] / rows[peer]["tokens_per_s"]
            print(f"- {mine} / {peer}: {ratios[f'{mine} / {peer}']:.2f}x tokens/s, "
                  f"{rows[mine]['peak_rss_gb'] / rows[peer]['peak_rss_gb']:.2f}x peak memory")
    if "deltatune-dpo" in rows and "deltatune-sft" in rows:
        share = rows["deltatune-dpo"]["tokens_per_s"] / rows["deltatune-sft"]["tokens_per_s"]
        print(f"- deltatune dpo / deltatune sft: {share:.2f}x tokens/s (dpo also runs the reference forward)")
    if len(ratios) == 2:
        sft, dpo = ratios.values()
        print(f"- target: deltatune's lead over TRL for DPO ({dpo:.2f}x) at least its lead for SFT ({sft:.2f}x): "
              f"{'holds' if dpo >= sft else 'misses'}")
    print(f"- sharing each prompt between its two replies saves {work['prompt_share_saved']:.1%} of the tokens a "
          "layout with the prompt twice would run (training pairs)")
    return {"rows": {k: {kk: vv for kk, vv in v.items() if kk != "raw"} for k, v in rows.items()}, "ratios": ratios,
            "raw": {k: v["raw"] for k, v in rows.items()}}


def run_quality(opts: argparse.Namespace, work: dict[str, Any], out: Path) -> dict[str, Any]:
    """DPO, SimPO and ORPO for ``opts.epochs`` epochs with eval on the held-out pairs; print the table."""
    rows = {}
    for objective in OBJECTIVES:
        spec = {**work, "name": objective, "tag": f"quality-{objective}", "objective": objective, "steps": None,
                "epochs": opts.epochs, "with_eval": True, "threads": opts.threads, "out": str(out / f"q-{objective}"),
                "device": "cpu"}
        print(f"training {objective} ...", file=sys.stderr, flush=True)
        raw = speed.run_child("deltatune", spec, out / "logs", script=__file__)
        if raw is not None:
            rows[objective] = {"start": raw["eval_start"], "end": raw["eval_end"], "steps": len(raw["steps"]),
                               "tokens_per_s": summarize(raw)["tokens_per_s"]}
    print(f"\n### Quality: {work['n_train']} training pairs, {opts.epochs} epoch(s) of {PAIRS_PER_STEP} pairs per "
          f"step, eval on {work['n_eval']} held-out pairs\n")
    print("| objective | steps | reward accuracy before | after | reward margin before | after | eval loss before "
          "| after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        s, e = r["start"], r["end"]
        print(f"| {name} | {r['steps']} | {s['eval_reward_accuracy']:.1%} | {e['eval_reward_accuracy']:.1%} | "
              f"{s['eval_reward_margin']:.3f} | {e['eval_reward_margin']:.3f} | {s['eval_loss']:.4f} | "
              f"{e['eval_loss']:.4f} |")
    return rows


def main() -> None:
    """Run the benchmark (or, with --one, one worker, printing its RESULT line)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="speed: optimizer steps per contender")
    p.add_argument("--epochs", type=float, default=1.0, help="quality: epochs over the training pairs")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--quality-only", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.one:
        print("RESULT " + json.dumps(WORKERS[opts.one](json.loads(opts.spec))), flush=True)
        return
    if not DATA.is_file():
        sys.exit(f"{DATA} not found: this benchmark reads the shared preference data beside the checkout")
    out = ROOT / "runs" / "bench-preference"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = prepare(out, opts.steps)
    print(f"# bench/preference.py: SmolLM2-135M-Instruct + LoRA r{RANK} on {DATA.name}: {work['n_train']} training "
          f"pairs, {work['n_eval']} held out, {work['n_dropped']} over {MAX_LENGTH} tokens dropped; "
          f"{cpu_name()}")
    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu": cpu_name()}
    if not opts.quality_only:
        results["speed"] = run_speed(opts, work, out)
    if not opts.speed_only:
        results["quality"] = run_quality(opts, work, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n(total {time.perf_counter() - started:.0f} s; figures in {out / 'results.json'})")


if __name__ == "__main__":
    main()
