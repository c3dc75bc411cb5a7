"""One base model, many deltas: each delta gets a slot, its tensors go into the served layers of that slot.

    bank = DeltaBank(load_model(ModelConfig(name="default")))
    bank.add("dates", "runs/demo")         # refuses a delta trained on another base, or of a method it cannot serve
    slot = bank.slot("dates")              # the row plan's number for it (0: the base alone)

The methods served per row (several deltas in one batch, see ``rowwise``): LoRA (and rsLoRA), IA3, BitFit and
prompt tuning. Prompt tuning changes only the input: its virtual tokens' keys and values do not depend on the
request (they attend only to each other), so they are computed once when the delta is added and put in front
of each request's cache, which is what ``deltatune generate`` computes for it. The base's weights exist once,
whatever the number of deltas; each delta adds only its own tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from deltatune.delta import read_delta_info, read_delta_tensors, run_system_prompt
from deltatune.errors import DeltatuneError
from deltatune.models import LoadedModel, resolve_source
from deltatune.serving.rowwise import RowDeltaLinear, int8_linear

ROW_METHODS = ("lora", "ia3", "bitfit", "prompt_tuning")
PEFT_PREFIX = "base_model.model."


@dataclass
class ServedDelta:
    """A delta the server holds: its name, folder, method, slot, and (prompt tuning) its cached prefix."""

    name: str
    folder: Path
    method: str
    slot: int
    nbytes: int
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (1, H_kv, N, d), prompt tuning
    system_prompt: str | None = None
    modules: list[str] = field(default_factory=list)


class DeltaBank:
    """The base model with its served deltas."""

    def __init__(self, loaded: LoadedModel, base_name: str, *, quantize: str | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.base_name = base_name
        self.quantize = quantize
        self.deltas: dict[str, ServedDelta] = {}
        self._next_slot = 1
        # every linear layer of the decoder becomes a served layer now, so int8 storage happens once and deltas
        # loaded later find their layers in place
        layers = [name for name, module in self.model.named_modules() if isinstance(module, nn.Linear)]
        output = {name for name in layers if self.model.get_submodule(name) is self.model.get_output_embeddings()}
        for name in layers:
            if name not in output:
                self._wrap(name)
        if quantize == "int8":
            if next(self.model.parameters()).dtype != torch.float32:
                raise DeltatuneError("serve: --quantize int8 runs on a float32 base; drop --dtype")
            for module in self.model.modules():
                if isinstance(module, RowDeltaLinear):
                    module.use_int8()
            for name in output:
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child,
                        int8_linear(self.model.get_submodule(name)))
        elif quantize is not None:
            raise DeltatuneError(f"serve: --quantize {quantize!r}: the server quantizes to int8 only")

    def slot(self, name: str) -> int:
        """Return the slot of delta ``name`` (the base's name: 0); raise KeyError for an unknown one."""
        if name == self.base_name:
            return 0
        return self.deltas[name].slot

    def add(self, name: str, folder: str | Path) -> ServedDelta:
        """Load the delta in ``folder`` as ``name``; return it. Raises DeltatuneError when it was trained on
        another base, its method cannot be served per row, or the name is taken."""
        path = Path(folder)
        if name in self.deltas or name == self.base_name:
            raise DeltatuneError(f"serve: the name {name!r} is given twice; name deltas NAME=PATH")
        info = read_delta_info(path)
        if info.task != "causal_lm":
            raise DeltatuneError(f"serve: {path} is a {info.task} delta; the server generates text (causal LMs)")
        if resolve_source(info.base_model) != self.loaded.source:
            raise DeltatuneError(f"serve: {path} was trained on {info.base_model}, not on the served base "
                                 f"{self.loaded.source}; serve it with --base {info.base_model}")
        method = info.method_config
        if method.name not in ROW_METHODS or getattr(method, "use_dora", False):
            kind = "DoRA" if method.name == "lora" else method.name
            raise DeltatuneError(f"serve: {path} is a {kind} delta; the server applies {', '.join(ROW_METHODS)} "
                                 "deltas per request. Merge it (`deltatune merge`) and serve the merged model as "
                                 "--base")
        tensors = read_delta_tensors(path)
        served = ServedDelta(name, path, method.name, self._next_slot, sum(t.numel() * 4 for t in tensors.values()),
                             system_prompt=run_system_prompt(path))
        if method.name == "prompt_tuning":
            served.prefix = self._prompt_prefix(tensors["prompt_embeddings"])
        else:
            self._load_layers(served, method, tensors)
        self._next_slot += 1
        self.deltas[name] = served
        return served

    def _load_layers(self, served: ServedDelta, method: object, tensors: dict[str, torch.Tensor]) -> None:
        """Put a LoRA, IA3 or BitFit delta's tensors into the served layers of its slot."""
        dtype = next(self.model.parameters()).dtype
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            module, _, leaf = key.removeprefix(PEFT_PREFIX).rpartition(".")
            if leaf == "weight" and module.endswith((".lora_A", ".lora_B")):
                module, _, leaf = module.rpartition(".")
            by_module.setdefault(module, {})[leaf] = value.to(dtype)
        for module, parts in by_module.items():
            layer = self._served_layer(module, served.folder)
            base_bias = layer.base_bias
            if served.method == "lora":
                r = parts["lora_A"].shape[0]
                scale = method.alpha / (math.sqrt(r) if method.use_rslora else r)  # type: ignore[attr-defined]
                layer.lora[served.slot] = (parts["lora_A"], parts["lora_B"], scale)
            elif served.method == "ia3":
                vector = parts["ia3_l"]
                if vector.shape[0] == 1:  # (1, in): scales the input (feed-forward)
                    layer.scale_in[served.slot] = vector.flatten()
                else:  # (out, 1): scales the output
                    layer.scale_out[served.slot] = vector.flatten()
            else:  # bitfit: the trained bias; the base's bias is zero where the layer had none
                delta = parts["bias"] - (base_bias if base_bias is not None else 0)
                layer.bias_delta[served.slot] = delta
            served.modules.append(module)

    def _served_layer(self, module: str, folder: Path) -> RowDeltaLinear:
        """Return the served wrapper of the base's linear layer ``module`` (wrapping it the first time)."""
        try:
            layer = self.model.get_submodule(module)
        except AttributeError:
            raise DeltatuneError(f"serve: {folder} names the layer {module}, which the served base does not "
                                 "have") from None
        if not isinstance(layer, RowDeltaLinear):
            raise DeltatuneError(f"serve: {folder} adapts {module}, a {type(layer).__name__}; the server applies "
                                 "deltas to the decoder's linear layers")
        return layer

    def _wrap(self, module: str) -> None:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, RowDeltaLinear(getattr(parent, child)))

    @torch.no_grad()
    def _prompt_prefix(self, embeddings: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys and values of prompt tuning's virtual tokens (positions 0..N-1, attending to each other)."""
        dtype = next(self.model.parameters()).dtype
        device = self.loaded.device
        n = embeddings.shape[0]
        cache = DynamicCache()
        self.model(inputs_embeds=embeddings.to(device, dtype)[None], use_cache=True, cache=cache,
                   position_ids=torch.arange(n, device=device)[None])
        return [(layer.keys, layer.values) for layer in cache.layers]

    def remove(self, name: str) -> None:
        """Unload delta ``name`` (its slot is not reused)."""
        served = self.deltas.pop(name)
        for module in served.modules:
            layer = self.model.get_submodule(module)
            if isinstance(layer, RowDeltaLinear):
                layer.remove(served.slot)
