"""Run the methods of a plan one after another, each in its own process; skip finished ones, resume others.

    records = run_methods(plan)       # one record per method: compare.json's figures, or a failure

Each method runs ``python -m deltatune.compare.child`` (so its peak memory is its own) writing
``<out>/<method>/`` and, when done, ``<out>/<method>/compare.json``; its output goes to
``<out>/logs/<method>.log``. A method whose compare.json holds the same resolved config is skipped; one
interrupted after a checkpoint resumes from it; anything else starts again. A failing method becomes a
``failed`` record and the others still run. Ctrl-C stops the running method (it writes a checkpoint) and
raises CompareInterrupted saying how to continue.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from deltatune.compare.child import RESULT_FILE
from deltatune.compare.plan import ComparePlan, MethodPlan
from deltatune.config import dump_config
from deltatune.training.signals import Interrupted, Terminated, sigterm_as_interrupt

Start = Literal["skip", "resume", "fresh"]
LOGS = "logs"


class CompareInterrupted(Interrupted):
    """A comparison was stopped with Ctrl-C; the message says how to continue it."""


def fmt_seconds(seconds: float) -> str:
    """Return ``seconds`` as ``42s``, ``3m05s`` or ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _record(item: MethodPlan) -> dict[str, Any] | None:
    path = item.out / RESULT_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _same_settings(record: dict[str, Any], item: MethodPlan) -> bool:
    # the learning rates too: a method's default rate lives in the code, not in the config
    return (record.get("config") == item.config_json() and record.get("lr") == item.lr
            and record.get("head_lr") == item.head_lr)


def earlier_record(item: MethodPlan) -> dict[str, Any] | None:
    """Return the method's compare.json when it exists and was made with the same resolved config and the same
    learning rates, else None."""
    record = _record(item)
    return record if record is not None and _same_settings(record, item) else None


def how_to_start(item: MethodPlan, fresh: bool) -> Start:
    """Return ``skip`` (finished earlier with the same config and rates), ``resume`` (an interrupted run of the
    same config left a checkpoint) or ``fresh`` (also when the last run finished with other settings: a run
    deletes its method's compare.json when it starts, so one that exists belongs to a finished run)."""
    from deltatune.training.checkpoint import checkpoint_dirs

    if fresh:
        return "fresh"
    record = _record(item)
    if record is not None:
        return "skip" if _same_settings(record, item) else "fresh"
    run_file = item.out / "run.yaml"
    if run_file.is_file() and run_file.read_text() == dump_config(item.config) and checkpoint_dirs(item.out):
        return "resume"
    return "fresh"


def failed_record(item: MethodPlan, error: str, seconds: float) -> dict[str, Any]:
    """Return the record of a method that did not finish."""
    return {"method": item.key, "status": "failed", "error": error, "lr": item.lr, "method_seconds": seconds,
            "config": item.config_json()}


def _last_step(item: MethodPlan) -> int | None:
    """The newest step logged in the method's metrics.jsonl (read from the file's end), or None."""
    path = item.out / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _pump(stream: Any, log: Any, echo: bool) -> None:
    """Copy the child's output to its log file (and to the terminal with ``echo``)."""
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def run_child(item: MethodPlan, plan: ComparePlan, resume: bool, *, verbose: bool,
              status: Callable[[int | None, float], None] | None) -> tuple[int, str | None]:
    """Run one method in a subprocess; return (exit code, one-line error or None). ``status`` is called about
    once a second with the newest logged step (None before the first) and the seconds elapsed. Ctrl-C is
    passed on to the child, which writes a checkpoint; then KeyboardInterrupt is raised again."""
    logs = plan.out / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    error_file = logs / f"{item.key}.error"
    error_file.unlink(missing_ok=True)
    request = {"key": item.key, "config": item.config_json(), "resume": resume, "error_file": str(error_file),
               "latency_tokens": plan.settings.latency_tokens, "latency_repeats": plan.settings.latency_repeats}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with (logs / f"{item.key}.log").open("a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {item.key} ({'resume' if resume else 'start'})\n")
        log.flush()
        # a session of its own: the terminal's Ctrl-C reaches only this process, which passes one SIGINT on
        proc = subprocess.Popen([sys.executable, "-m", "deltatune.compare.child"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, verbose), daemon=True)
        pump.start()
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request))
            proc.stdin.close()
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if status is not None:
                        status(_last_step(item), time.monotonic() - started)
        except KeyboardInterrupt:
            _stop(proc)
            raise
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            pump.join(timeout=5)
    if code == 0:
        return 0, None
    if error_file.is_file():
        return code, error_file.read_text().strip() or f"exit code {code}"
    tail = [ln for ln in (logs / f"{item.key}.log").read_text().splitlines() if ln.strip()]
    killed = f" (killed by signal {-code}{': out of memory?' if code == -9 else ''})" if code < 0 else ""
    return code, f"exit code {code}{killed}" + (f": {tail[-1].strip()}" if tail and not killed else "")


def _stop(proc: subprocess.Popen) -> None:
    """Ask the child to stop as Ctrl-C would (it writes a checkpoint); kill it after 120 s or a second Ctrl-C."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def run_methods(plan: ComparePlan, *, fresh: bool = False, verbose: bool = False,
                say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every method of ``plan`` (skipping those finished earlier with the same config, unless ``fresh``);
    print a line per method start and finish with the overall ETA; return one record per method, in plan
    order. Raises CompareInterrupted on Ctrl-C, and on SIGTERM, which is handled the same way (the running
    method writes a checkpoint and stops; no further method starts)."""
    with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        if any("mlflow" in item.config.train.report_to for item in plan.methods):  # the methods: child runs
            from deltatune.training.tracking import parent_run

            stack.enter_context(parent_run(f"compare {plan.out.name}", {"deltatune.compare": str(plan.out)}))
        return _run_methods(plan, fresh=fresh, verbose=verbose, say=say)


def _run_methods(plan: ComparePlan, *, fresh: bool, verbose: bool, say: Callable[[str], None]
                 ) -> list[dict[str, Any]]:
    starts = {item.key: how_to_start(item, fresh) for item in plan.methods}
    todo = [item for item in plan.methods if starts[item.key] != "skip"]
    live = sys.stdout.isatty() and not verbose
    records: list[dict[str, Any]] = []
    durations: list[float] = []
    n = len(plan.methods)
    for i, item in enumerate(plan.methods, 1):
        tag = f"[{i}/{n}] {item.key}"
        if starts[item.key] == "skip":
            say(f"{tag}: skipped (finished in an earlier run with the same settings: {item.out / RESULT_FILE})")
            records.append({**(earlier_record(item) or {}), "method": item.key})
            continue
        resume = starts[item.key] == "resume"
        changed = not fresh and not resume and (item.out / RESULT_FILE).is_file()
        say(f"{tag}: {'resuming from its checkpoint' if resume else 'training'}"
            f"{' again (its settings changed since the earlier run)' if changed else ''}, lr {item.lr:g} "
            f"(log: {plan.out / LOGS / (item.key + '.log')})")

        def status(step: int | None, elapsed: float, item: MethodPlan = item, tag: str = tag) -> None:
            after = len(todo) - len(durations) - 1  # methods still to run after this one
            if durations:
                mean = statistics.mean(durations)
                eta: float | None = max(mean - elapsed, 0) + mean * after
            elif step:  # the first method: extrapolate from its steps
                this = elapsed / step * item.planned_steps
                eta = max(this - elapsed, 0) + this * after
            else:
                eta = None
            where = f"step {step}/{item.planned_steps}" if step else "starting"
            tail = f", ETA ~{fmt_seconds(eta)}" if eta is not None else ""
            print(f"\r\033[K{tag}: {where}, {fmt_seconds(elapsed)}{tail}", end="", flush=True)

        (item.out / RESULT_FILE).unlink(missing_ok=True)  # from now on a compare.json is this run's: finished
        started = time.monotonic()
        try:
            code, error = run_child(item, plan, resume, verbose=verbose, status=status if live else None)
        except KeyboardInterrupt as stop:
            if live:
                print()
            done = sum(1 for r in records if r.get("status") == "finished")
            how, code = ("stopped by SIGTERM", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
            raise CompareInterrupted(
                f"{how} while {item.key} was running ({done} of {n} methods finished). Run the same command "
                f"again to continue: finished methods are skipped and {item.key} resumes from its checkpoint "
                "(or starts again if it had not written one)", code) from None
        if live:
            print("\r\033[K", end="", flush=True)
        seconds = time.monotonic() - started
        durations.append(seconds)
        left = len(todo) - len(durations)
        eta = f", ETA ~{fmt_seconds(statistics.mean(durations) * left)}" if left else ""
        if code == 0 and not (item.out / RESULT_FILE).is_file():
            code, error = 1, f"the method's process ended without writing {item.out / RESULT_FILE}"
        if code == 0:
            record = json.loads((item.out / RESULT_FILE).read_text())
            say(f"{tag}: done in {fmt_seconds(seconds)}{eta}")
        else:
            record = failed_record(item, error or f"exit code {code}", seconds)
            say(f"{tag}: failed after {fmt_seconds(seconds)}: {record['error']}{eta}")
        records.append({**record, "method": item.key})
    return records
