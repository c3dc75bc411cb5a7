"""Progress bar and metrics: a tqdm bar (step, loss, tokens/s, ETA) and ``metrics.jsonl``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; flushed at every write. With ``enabled``
    False (ranks other than 0) nothing is read or written."""

    def __init__(self, path: Path, keep_until_step: int | None = None, enabled: bool = True) -> None:
        self.path = path
        self._file: Any = None
        if not enabled:
            return
        if keep_until_step is not None and path.is_file():
            # resuming: drop what was logged after the checkpoint, it will be logged again
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            path.write_text("".join(k + "\n" for k in kept))
        elif path.exists():
            path.unlink()
        self._file = path.open("a")

    def records(self) -> list[dict[str, Any]]:
        """Return every record written so far (including those kept from before a resume)."""
        if self._file is None:
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (a flat dict of figures) as one line."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()


class Progress:
    """The training progress bar: steps done of total, with loss, tokens/s and learning rate."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not enabled, file=sys.stderr,
                        bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} {postfix}")
        self.started = time.perf_counter()
        self.tokens = 0

    def update(self, loss: float, lr: float, tokens: int) -> float:
        """Advance one step; return useful tokens per second since the bar started."""
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"loss {loss:.4f}  {rate:.0f} tok/s  lr {lr:.2e}", refresh=False)
        self.bar.update(1)
        return rate

    def write(self, text: str) -> None:
        """Print a line above the bar."""
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Return the records of a ``metrics.jsonl`` (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
