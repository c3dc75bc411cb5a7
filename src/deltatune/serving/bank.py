"""One base model, many deltas: each delta gets a slot, its tensors go into the served layers of that slot.

    bank = DeltaBank(load_model(ModelConfig(name="default")))
    bank.add("dates", "runs/demo")         # refuses a delta trained on another base
    slot = bank.slot("dates")              # the row plan's number for it (0: the base alone)

The methods served per row (several deltas in one batch, see ``rowwise``): LoRA (rsLoRA, DoRA), IA3, BitFit,
and the prompt methods (prompt tuning, p-tuning, prefix tuning). The prompt methods change only what the
request attends to: their virtual tokens' keys and values do not depend on the request (they attend only to
each other), so they are computed once when the delta is added and put in front of each request's cache, which
is what ``deltatune generate`` computes for it. DoRA's magnitude rescaling ``m / ||W + s B A||`` is one vector
per layer, computed once.

Every other method (bottleneck adapters, HiWi, full fine-tuning, the selective and sparse methods, compositions)
is served on its own *view* of the base: a second set of module objects over the same weight tensors, with the
method attached as in training. Only the tensors the delta changes are copied, so a view costs the delta's size,
not a base. The engine runs a view's requests in batches of their own (``engine``, groups).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from deltatune.delta import read_delta_info, read_delta_tensors, run_system_prompt
from deltatune.errors import DeltatuneError
from deltatune.methods import build_method
from deltatune.methods.prompts_inject import kv_layout
from deltatune.models import LoadedModel, resolve_source
from deltatune.serving.rowwise import RowDeltaLinear, int8_linear

ROW_METHODS = ("lora", "ia3", "bitfit", "prompt_tuning", "p_tuning", "prefix_tuning")
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
PEFT_PREFIX = "base_model.model."


@dataclass
class ServedDelta:
    """A delta the server holds: its name, folder, method, slot, and (prompt tuning) its cached prefix."""

    name: str
    folder: Path
    method: str
    slot: int
    nbytes: int
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (1, H_kv, N, d): prompt methods
    system_prompt: str | None = None
    modules: list[str] = field(default_factory=list)
    view: nn.Module | None = None  # methods not served per row: the base's modules with the method attached

    @property
    def group(self) -> int:
        """The engine's batch group of this delta's requests: 0 (per row, with the base) or its own slot."""
        return self.slot if self.view is not None else 0


class DeltaBank:
    """The base model with its served deltas."""

    def __init__(self, loaded: LoadedModel, base_name: str, *, quantize: str | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.base_name = base_name
        self.quantize = quantize
        self.deltas: dict[str, ServedDelta] = {}
        self._next_slot = 1
        self.model.requires_grad_(False)
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
        tensors = read_delta_tensors(path)
        served = ServedDelta(name, path, method.name, self._next_slot, sum(t.numel() * 4 for t in tensors.values()),
                             system_prompt=run_system_prompt(path))
        if method.name in PROMPT_METHODS:
            served.prefix = self._prompt_prefix(method.name, tensors["prompt_embeddings"])
        elif method.name in ROW_METHODS:
            self._load_layers(served, method, tensors)
        else:
            served.view = self._view(served, method, tensors)
        self._next_slot += 1
        self.deltas[name] = served
        return served

    def by_slot(self, slot: int) -> ServedDelta | None:
        """Return the delta served in ``slot`` (None for the base)."""
        return next((d for d in list(self.deltas.values()) if d.slot == slot), None)

    def memory(self) -> dict[str, int]:
        """Return the bytes the tensors take: ``base`` (the base model's weights, each storage counted once) and
        per delta name what it adds (its per-row tensors, cached prefix, or a view's own tensors)."""
        seen: set[int] = set()

        def size(tensors: Any) -> int:
            total = 0
            for t in tensors:
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
            return total

        out = {"base": size([*self.model.parameters(), *self.model.buffers(), *self._int8_tensors()])}
        for served in self.deltas.values():
            tensors: list[torch.Tensor] = []
            for module in served.modules:
                layer = self.model.get_submodule(module)
                for table in (layer.lora, layer.scale_out, layer.scale_in, layer.bias_delta, layer.dora):
                    entry = table.get(served.slot)
                    tensors += [t for t in (entry if isinstance(entry, tuple) else (entry,))
                                if isinstance(t, torch.Tensor)]
            for k, v in served.prefix or []:
                tensors += [k, v]
            if served.view is not None:
                tensors += [*served.view.parameters(), *served.view.buffers()]
            out[served.name] = size(tensors)
        return out

    def _int8_tensors(self) -> list[torch.Tensor]:
        from deltatune.serving.rowwise import Int8Linear

        return [t for m in self.model.modules() if isinstance(m, Int8Linear)
                for t in (m.weight, m.scale, m.bias) if t is not None]

    def model_of(self, group: int) -> nn.Module:
        """Return the model that runs the requests of batch ``group`` (0: the base with its per-row deltas)."""
        if group == 0:
            return self.model
        served = self.by_slot(group)
        if served is None or served.view is None:
            raise DeltatuneError(f"serve: no delta is served in group {group}")
        return served.view

    def _load_layers(self, served: ServedDelta, method: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Put a LoRA (DoRA), IA3 or BitFit delta's tensors into the served layers of its slot."""
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
                scale = method.alpha / (math.sqrt(r) if method.use_rslora else r)
                layer.lora[served.slot] = (parts["lora_A"], parts["lora_B"], scale)
                if "lora_magnitude_vector" in parts:  # DoRA: rows rescaled by m / ||W + s B A||
                    update = (parts["lora_B"].float() @ parts["lora_A"].float()) * scale
                    norm = torch.linalg.norm(layer.dense_weight() + update, dim=1)
                    layer.dora[served.slot] = (parts["lora_magnitude_vector"].float() / norm).to(dtype)
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
    def _prompt_prefix(self, method: str, saved: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The per-layer keys and values (1, H_kv, N, d) of a prompt method's N virtual tokens at positions
        0..N-1: prefix tuning saved them (peft's layout (N, 2 * layers * H_kv * d)); prompt tuning and p-tuning
        saved their embeddings (N, D), which go through the base once."""
        dtype = next(self.model.parameters()).dtype
        device = self.loaded.device
        n = saved.shape[0]
        if method == "prefix_tuning":
            layers, heads, head_dim = kv_layout(self.model.config)
            kv = saved.to(device, dtype).view(n, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)
            return [(kv[2 * i][None].contiguous(), kv[2 * i + 1][None].contiguous()) for i in range(layers)]
        cache = DynamicCache()
        self.model(inputs_embeds=saved.to(device, dtype)[None], use_cache=True, cache=cache,
                   position_ids=torch.arange(n, device=device)[None])
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _view(self, served: ServedDelta, method_config: Any, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """A view of the base for a method not served per row: new module objects over the same weight tensors
        (the served layers unwrapped), the method attached and its tensors loaded. A base tensor the method
        trains (full fine-tuning, BitFit-like selections) gets its own copy first, so the base stays intact."""
        if self.quantize is not None:
            raise DeltatuneError(f"serve: {served.folder} is a {served.method} delta, which runs on a float base; "
                                 f"--quantize int8 serves {', '.join(ROW_METHODS)} deltas (or merge it with "
                                 "`deltatune merge` and serve the merged model as --base)")
        memo: dict[int, Any] = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        for module in self.model.modules():
            if isinstance(module, RowDeltaLinear):
                memo[id(module)] = copy.deepcopy(module.base, memo)
        view = copy.deepcopy(self.model, memo)
        shared = {id(p) for p in self.model.parameters()}
        method = build_method(method_config)
        try:
            method.attach(view)
            copies: dict[int, nn.Parameter] = {}  # one copy per tensor, so tied weights stay tied
            for module in view.modules():
                for key, param in list(module.named_parameters(recurse=False)):
                    if param.requires_grad and id(param) in shared:
                        if id(param) not in copies:
                            copies[id(param)] = nn.Parameter(param.detach().clone())  # trainable, as attached
                        setattr(module, key, copies[id(param)])
            method.load_delta_state_dict(view, tensors)
        except DeltatuneError as err:
            raise DeltatuneError(f"serve: {served.folder}: {err}") from None
        finally:
            self.model.requires_grad_(False)
        view.requires_grad_(False)
        return view.eval()

    def remove(self, name: str) -> None:
        """Unload delta ``name`` (its slot is not reused)."""
        served = self.deltas.pop(name)
        for module in served.modules:
            layer = self.model.get_submodule(module)
            if isinstance(layer, RowDeltaLinear):
                layer.remove(served.slot)
