"""``deltatune compare``: several methods on the same data, example order and budget, and a report.

    result = compare("run.yaml", ["train.max_steps=50"], methods=["lora", "ia3", "bitfit"], out="runs/cmp")
    print(result.report)          # runs/cmp/report.md; also results.json and the PNG charts

Modules, one job each: ``settings`` (the ``compare:`` section), ``plan`` (one run config per method),
``runner`` (each method in its own process, skipping and resuming), ``child`` (the process that trains
and measures one method), ``measure`` (latency, memory), ``report`` (report.md, results.json), ``plots``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.compare.settings import ALL_HELP, CompareSettings


@dataclass
class CompareResult:
    """What a comparison wrote and which methods finished or failed."""

    out: Path
    report: Path
    results: Path
    plots: list[Path] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> list[str]:
        """Return the methods that finished (in this run or an earlier one)."""
        return [r["method"] for r in self.records if r.get("status") == "finished"]

    @property
    def failed(self) -> list[str]:
        """Return the methods that failed."""
        return [r["method"] for r in self.records if r.get("status") != "finished"]


def compare(path: str | Path | None, overrides: list[str] | None = None, *, methods: list[str] | None = None,
            out: str | Path | None = None, fresh: bool = False, verbose: bool = False,
            say: Callable[[str], None] = print) -> CompareResult:
    """Train every method of a compare file, each in its own process, and write report.md, results.json
    and the charts into the output folder; return what was written.

    ``methods`` (e.g. ``["lora", "ia3"]`` or ``["all"]``) wins over ``compare.methods``; ``out`` over
    ``output.dir``. Methods finished by an earlier run with the same settings are skipped (``fresh``
    retrains them); a failing method is reported as failed while the others run. Raises ConfigError
    before anything trains when the file or data is invalid or the output folder holds files deltatune did
    not write (it writes only into a new, empty or earlier comparison's folder, and holds a lock on it while
    it runs), and CompareInterrupted on Ctrl-C or SIGTERM.
    """
    from deltatune.compare.plan import load_plan
    from deltatune.compare.plots import write_plots
    from deltatune.compare.report import write_report, write_results
    from deltatune.compare.runner import run_methods
    from deltatune.outputs import locked_output

    plan = load_plan(path, overrides, methods=methods, out=out)
    for note in plan.notes:
        say(f"note: {note}")
    say(f"comparing {len(plan.methods)} methods ({', '.join(m.key for m in plan.methods)}) on "
        f"{plan.n_train} training examples, seed {plan.methods[0].config.train.seed if plan.methods else '-'}; "
        f"writing to {plan.out}/")
    with locked_output(plan.out, "--out" if out is not None else "output.dir", "compare"):
        records = run_methods(plan, fresh=fresh, verbose=verbose, say=say)
        plots = write_plots(records, plan.metric, plan.out)
        report = write_report(plan, records, plots)
        results = write_results(plan, records)
    return CompareResult(plan.out, report, results, plots, records)


__all__ = ["ALL_HELP", "CompareResult", "CompareSettings", "compare"]
