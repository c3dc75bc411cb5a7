"""The running batch's attention cache, allocated once and written in place.

Per layer, keys and values live in one buffer each, (rows, H_kv, columns, d). Row i of the batch holds its
positions 0..lengths[i]-1 in columns 0..lengths[i]-1 (right-padded: rows of different lengths need no
shifting). A decoding step writes each row's new key and value at its own column ``lengths[i]`` with one
indexed store per layer, and attention reads the views ``[:n, :, :W]`` (W = the longest row + 1) under a mask
that hides each row's unused columns. Nothing is concatenated per step: the cost of a step no longer grows with
the copy of the whole cache that ``DynamicCache`` makes. A finished row's place is taken by the batch's last
row (one row copied), so the running rows are always 0..n-1.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache


class KVSlots:
    """Keys and values of up to ``rows`` running requests, grown by doubling the columns when one gets longer."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, rows: int, dtype: torch.dtype,
                 device: torch.device | str, columns: int = 0) -> None:
        self.shape = (rows, kv_heads, columns, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.lengths = torch.zeros(0, dtype=torch.long)  # per running row: positions held (= its next position)
        self.peak_nbytes = 0  # the most the buffers have taken

    @property
    def rows(self) -> int:
        """How many requests are running."""
        return len(self.lengths)

    @property
    def columns(self) -> int:
        """The columns each row has room for."""
        return self.shape[2]

    def nbytes(self) -> int:
        """The bytes the buffers take."""
        return 2 * len(self.keys) * self.keys[0].numel() * self.keys[0].element_size()

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` positions in every row (doubling, the contents kept)."""
        if columns <= self.columns:
            return
        grown = max(columns, 2 * self.columns, 64)
        rows, heads, old, dim = self.shape
        self.shape = (rows, heads, grown, dim)
        for table in (self.keys, self.values):
            for i, buffer in enumerate(table):
                bigger = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
                bigger[:, :, :old] = buffer
                table[i] = bigger
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes())

    def shrink(self, columns: int = 0) -> None:
        """Give back memory when the batch is empty: buffers of ``columns`` columns again (none by default)."""
        if self.rows == 0 and self.columns > columns:
            rows, heads, _, dim = self.shape
            self.shape = (rows, heads, columns, dim)
            self.keys = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in self.keys]
            self.values = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in self.values]

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
        """Add a request whose cache is ``keys``/``values`` (per layer (1, H_kv, L, d)) as the last row; return
        its row."""
        length = keys[0].shape[2]
        self.reserve(length + 1)
        row = self.rows
        for buffer, k in zip(self.keys, keys, strict=True):
            buffer[row, :, :length] = k[0]
        for buffer, v in zip(self.values, values, strict=True):
            buffer[row, :, :length] = v[0]
        self.lengths = torch.cat([self.lengths, torch.tensor([length])])
        return row

    def remove(self, rows: list[int]) -> list[int]:
        """Drop ``rows``; the last rows move into their places. Return the new order: ``order[i]`` is the old row
        now at row i."""
        order = list(range(self.rows))
        for row in sorted(rows, reverse=True):
            last = len(order) - 1
            if row != last:
                width = int(self.lengths[order[last]])
                for table in (self.keys, self.values):
                    for buffer in table:
                        buffer[row, :, :width] = buffer[last, :, :width]
                order[row] = order[last]
            order.pop()
        self.lengths = self.lengths[torch.tensor(order, dtype=torch.long)] if order else self.lengths[:0]
        return order

    def step_cache(self) -> StepCache:
        """Return the cache for one decoding step of every running row (one new position each)."""
        self.reserve(int(self.lengths.max()) + 1)
        return StepCache(self)

    def step_mask(self, boolean: bool) -> torch.Tensor:
        """The (n, 1, 1, W) attention mask of a decoding step: row i sees its columns 0..lengths[i]. Boolean for
        SDPA (True: attend), else additive (0 or the dtype's minimum) for eager attention."""
        width = int(self.lengths.max()) + 1
        seen = torch.arange(width)[None, :] <= self.lengths[:, None]
        seen = seen.to(self.device)[:, None, None, :]
        if boolean:
            return seen
        return torch.zeros(seen.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~seen, torch.finfo(self.dtype).min)

    def advance(self) -> None:
        """Count the position each row's decoding step wrote."""
        self.lengths = self.lengths + 1


class StepCache(Cache):
    """A transformers ``Cache`` over :class:`KVSlots` for one decoding step: ``update`` stores each row's new key
    and value at its own column and returns the views attention reads."""

    def __init__(self, slots: KVSlots) -> None:
        super().__init__(layers=[])
        self.slots = slots
        n = slots.rows
        self._rows = torch.arange(n, device=slots.device)
        self._columns = slots.lengths.to(slots.device)
        self._width = int(slots.lengths.max()) + 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (n, H_kv, 1, d) of layer ``layer_idx``; return the layer's (n, H_kv, W, d)
        views."""
        n = len(self._rows)
        keys, values = self.slots.keys[layer_idx], self.slots.values[layer_idx]
        keys[self._rows, :, self._columns] = key_states[:, :, 0].to(keys.dtype)
        values[self._rows, :, self._columns] = value_states[:, :, 0].to(values.dtype)
        return keys[:n, :, : self._width], values[:n, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The columns attention spans before this step's."""
        return self._width - 1
