"""The run schema: one pydantic model for a whole run, read from YAML with ``key=value`` overrides.

Precedence is defaults < YAML file < ``key=value`` overrides; unknown keys raise with the key named.

    cfg = load_config("run.yaml", ["method.r=16", "train.epochs=2"])
    print(dump_config(cfg))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from deltatune.errors import ConfigError


class Section(BaseModel):
    """A config section: unknown keys are errors, every field documents itself."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    name: str = "default"
    """`default` (bundled SmolLM2-135M-Instruct), `minilm` (bundled MiniLM-L6 encoder), a local HF folder,
    a .gguf file, or a hub id (from the local Hugging Face cache when there, else online; `dir/x` is a
    local path when `dir/` exists here)."""
    task: Literal["auto", "causal_lm", "classification"] = "auto"
    """What head to load: `auto` picks `classification` when data.format is classification."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype: `auto` is float32 on CPU and bfloat16 on CUDA."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`."""
    num_labels: int | None = Field(default=None, ge=2)
    """Classification: number of labels (inferred from the training data when unset)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for hub ids you trust)."""
    quantize: Literal["none", "int8", "nf4", "fp4"] = "none"
    """Store the frozen linear weights in 8 or 4 bits (bitsandbytes): `int8` (LLM.int8), `nf4` (QLoRA's
    4-bit NormalFloat), `fp4`; embeddings, norms and the head stay unquantized."""
    double_quant: bool | None = None
    """4-bit only: quantize the quantization constants too (about 0.37 bits per weight saved); null means
    true for nf4/fp4."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype 4-bit layers de-quantize to and compute in: `auto` is bfloat16 on CUDA, float32 elsewhere."""

    @model_validator(mode="after")
    def _double_quant_is_4bit(self) -> ModelConfig:
        if self.double_quant and self.quantize not in ("nf4", "fp4"):
            raise ValueError(f"double_quant=true applies to 4-bit quantization (nf4, fp4), not to quantize="
                             f"{self.quantize}; remove it or set model.quantize=nf4")
        return self


class DataConfig(Section):
    train: str | None = None
    """Training data: a .json/.jsonl/.csv/.tsv/.parquet file, or `hub:NAME` (online).
    Unset: the built-in demo task."""
    eval: str | float | None = 0.1
    """Eval data: a file, or a fraction (0-0.5) of the training data to hold out, or null for none."""
    format: Literal[
        "auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "classification", "preference",
        "sharegpt_preference"
    ] = "auto"
    """Example format; `auto` detects it from the fields of the first example."""
    max_length: int = Field(default=512, ge=8)
    """Maximum tokens per example (prompt + response)."""
    truncation: Literal["drop", "truncate", "error"] = "drop"
    """What to do with an example longer than max_length."""
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too (default: assistant tokens only)."""
    system_prompt: str | None = None
    """A system message added to chat examples that have none."""
    batching: Literal["pack", "bucket", "pad"] = "pack"
    """`pack`: a micro-batch's examples share one row, isolated by a block-diagonal mask (no padding);
    `bucket`: padded batches of similar length; `pad`: padded batches in shuffled order."""
    split: str = "train"
    """Hub data sets: the split to read."""
    max_examples: int | None = Field(default=None, ge=1)
    """Use only the first N training examples."""
    on_invalid: Literal["error", "skip"] = "error"
    """A malformed record (a bad field, a tool call whose arguments are not JSON, a tool result with no call before
    it, a call to a function missing from the record's tools): `error` stops with file:line before training;
    `skip` leaves it out and says how many were left out and why (the first few)."""

    @field_validator("eval")
    @classmethod
    def _eval_fraction(cls, value: str | float | None) -> str | float | None:
        if isinstance(value, float) and not 0.0 < value <= 0.5:
            raise ValueError("a fraction must be in (0, 0.5], e.g. 0.1; or give a file path, or null")
        return value


class MethodConfig(Section):
    """The base of every method's config; `name` selects the method in the registry."""

    presets: ClassVar[dict[str, Any]] = {}
    """Options of other sections this method sets (``{"model.quantize": "nf4"}``): see
    :func:`resolve_presets`."""

    recommended_lr: ClassVar[tuple[float, float]] = (2e-4, 1e-3)
    trains_all_weights: ClassVar[bool] = False
    """True for a method whose trained parameters are the base's own weights, all of them (full fine-tuning): under
    bf16-mixed its weights load in float32, as the master copies, instead of bfloat16."""
    """The peak learning rate used when ``train.lr`` is unset: (causal LM, sequence classifier). Each method
    sets its own from its paper and from measurements on the bundled models (README, methods table)."""

    name: str = "lora"
    """The fine-tuning method."""

    def default_lr(self, task: str) -> float:
        """Return this method's recommended peak learning rate for ``task`` (``causal_lm`` or
        ``classification``)."""
        causal, classifier = self.recommended_lr
        return classifier if task == "classification" else causal


HEAD_LR = 1e-3
"""The smallest learning rate of a classifier's fresh head when neither ``train.head_lr`` nor ``train.lr`` is
set (the method's own default when larger)."""


class TrainConfig(Section):
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training data (fractions allowed); ignored when max_steps is set."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps."""
    max_seconds: float | None = Field(default=None, gt=0)
    """A wall-clock budget for the step loop: stop after the step during which it runs out (the schedule is
    still computed on max_steps or epochs; after a resume the budget counts from the resume)."""
    batch_size: int = Field(default=8, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum examples)."""
    lr: float | None = Field(default=None, gt=0)
    """Peak learning rate; null: the method's recommended rate (README, methods table; e.g. lora 2e-4 on a
    causal LM, 1e-3 on a classifier; prompt_tuning 3e-2 / 3e-1)."""
    head_lr: float | None = Field(default=None, gt=0)
    """Classifiers: peak learning rate of the fresh classification head; null: train.lr when set, else the
    method's default rate but at least 1e-3."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    """`adamw` (torch), `adamw_8bit` (bitsandbytes, 8-bit moments), `paged_adamw`, `paged_adamw_8bit`
    (moments in CUDA unified memory that pages out under memory pressure; on CPU the same unpaged)."""
    pass_tokens: int | None = Field(default=640, ge=1)
    """Packed causal-LM batches: a micro-batch whose examples hold more tokens than this runs as several
    rows of at most this many tokens (an example is never split), gradients accumulated. The same math and,
    on a CPU, the same speed, with activation memory bounded by this number; null: one row per micro-batch."""
    packed_attention: bool = True
    """Packed causal-LM rows attend per example with the fused causal sdpa kernel (no T x T mask; models on
    transformers' attention interface); false: the block-diagonal mask (the same math, slower)."""
    fused_modules: bool = True
    """Llama-style RMSNorm and SwiGLU run as fused autograd functions that keep fewer activations for backward
    (checked against the model's own modules at start); false: the model's own modules."""
    chunked_loss: bool = True
    """The output layer and cross-entropy run in chunks of 256 supervised rows, so the full logits never exist
    (Llama/Mistral/Qwen heads, one process); false: the output layer at the supervised positions, then the loss."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: much less memory, about 30% more time."""
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup: float = Field(default=0.03, ge=0)
    """Warmup: a fraction of the steps if < 1, else a number of steps."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the gradient norm to this value (null: no clipping)."""
    seed: int = 42
    """Seed for initialisation, data order and dropout."""
    eval_every: int = Field(default=0, ge=0)
    """Eval loss every N steps (0: only at the start and the end)."""
    save_every: int = Field(default=0, ge=0)
    """Write a checkpoint every N steps (0: only at the end)."""
    eval_generations: int = Field(default=0, ge=0)
    """Chat data: exact match of greedy replies on this many eval examples, before and after training."""
    log_every: int = Field(default=1, ge=1)
    """Write metrics every N steps."""
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    """Experiment trackers that get every figure of metrics.jsonl, the resolved config and (MLflow) the delta:
    `tensorboard` (event files in <output.dir>/tensorboard), `mlflow` (MLFLOW_TRACKING_URI, else ./mlruns);
    `none` or [] for none. Needs the extra: pip install 'deltatune[track]'."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for torch (default: all cores)."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun with several processes: `ddp` replicates the model on every rank, `fsdp` shards it
    (FSDP2; methods full and lora); `auto` is ddp. Ignored in a single process."""
    dist_timeout: float = Field(default=1800.0, gt=0)
    """Seconds a rank waits for the others (a collective, a barrier) before the job stops with an error."""
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    """`fp32`; `bf16-mixed`: the frozen base weights stored and multiplied in bfloat16, the trained parameters,
    their gradients and optimizer state in float32 (master weights), norms, softmax and the loss in float32;
    `bf16`: everything in bfloat16 (fastest, but small updates round away); `auto`: bf16-mixed where the device
    has bfloat16 units (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), else fp32 (an explicit model.dtype keeps
    its meaning). The choice and its reason are printed."""
    objective: Literal["sft", "dpo", "ipo", "simpo", "orpo"] = "sft"
    """`sft`: supervised fine-tuning. Preference tuning on pairs (prompt, chosen, rejected): `dpo` (Rafailov et al.
    2023), `ipo` (Azar et al. 2023), `simpo` (Meng et al. 2024), `orpo` (Hong et al. 2024); dpo and ipo compare
    with the reference model (the base: the delta switched off), simpo and orpo need none."""
    beta: float | None = Field(default=None, gt=0)
    """Preference objectives: the reward scale beta (IPO's tau); null: 0.1 for dpo and ipo, 2.0 for simpo
    (ORPO's weight is train.orpo_lambda)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """dpo: the assumed share of flipped preference labels (conservative DPO); 0: plain DPO."""
    simpo_gamma: float = Field(default=0.5, ge=0)
    """simpo: the target reward margin gamma."""
    orpo_lambda: float = Field(default=0.1, gt=0)
    """orpo: the weight lambda of the odds-ratio term beside the chosen reply's NLL."""
    precompute_ref: bool = False
    """dpo/ipo: compute the reference log-probabilities of every pair once before training and keep them with the
    run (reference_logps.safetensors; --resume reads them) instead of a reference forward per step. Always on
    for `full`, which keeps no copy of the base."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        if isinstance(value, str):  # report_to=tensorboard,mlflow from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and "none" in value:
            if len(value) > 1:
                raise ValueError("`none` cannot be combined with trackers; give [tensorboard, mlflow] or none")
            return []
        return value


class OutputConfig(Section):
    dir: str = "runs/demo"
    """Where the delta, checkpoints, metrics.jsonl and run.yaml are written."""
    overwrite: bool = False
    """Replace an earlier run in output.dir (only a folder deltatune wrote, holding only what it wrote)."""

    @field_validator("dir", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError("empty; name a folder for the run, e.g. runs/my-run")
        return value


class RunConfig(Section):
    """A whole run: model, data, method, train, output."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: _method_config({"name": "lora"}))
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, data: Any) -> Any:
        return resolve_presets(data) if isinstance(data, dict) else data

    @field_validator("method", mode="before")
    @classmethod
    def _dispatch_method(cls, value: Any) -> Any:
        if isinstance(value, MethodConfig):
            value = value.model_dump()
        if isinstance(value, list):  # several methods stacked on one model
            value = {"name": "compose", "methods": value}
        if not isinstance(value, dict):
            raise ValueError("must be a mapping with at least `name`, e.g. {name: lora, r: 8}, "
                             "or a list of them to combine methods")
        return _method_config(value)


def resolve_presets(tree: dict[str, Any]) -> dict[str, Any]:
    """Apply the chosen method's presets to a raw run config; return the new tree (the input is not changed).

    A method may set options of other sections (``method.name: qlora`` sets ``model.quantize: nf4``,
    ``model.double_quant: true`` and ``train.optimizer: paged_adamw_8bit``). Each preset fills its key when
    the key is absent or at its default; a key the user set to another value is a conflict and raises
    ValueError naming both, so a preset never silently overrides an explicit choice.
    """
    method = tree.get("method")
    if isinstance(method, BaseModel):
        name = str(getattr(method, "name", "lora"))
    elif isinstance(method, dict):
        name = str(method.get("name", "lora"))
    else:
        return tree
    try:
        presets = method_config_class(name).presets
    except ValueError:
        return tree  # the method section reports the unknown name
    if not presets:
        return tree
    out = dict(tree)
    sections = {"model": ModelConfig, "train": TrainConfig}
    for key, value in presets.items():
        section, field = key.split(".", 1)
        raw = out.get(section) or {}
        current = raw.model_dump() if isinstance(raw, BaseModel) else dict(raw)
        default = sections[section].model_fields[field].default
        if field in current and current[field] not in (default, value):
            raise ValueError(
                f"method.name={name} sets {key}={json.dumps(value)}, but the config sets {key}="
                f"{json.dumps(current[field])}; remove {key}, or use method.name=lora with the options you want"
            )
        current[field] = value
        out[section] = current
    return out


_METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}  # filled by deltatune.methods' register_method


def register_method_config(name: str, config_class: type[MethodConfig]) -> None:
    """Make ``config_class`` the schema of ``method.name: <name>`` (called by the method registry, which sits
    above the config schema: the schema never imports the methods)."""
    _METHOD_CONFIGS[name] = config_class


def method_config_class(name: str) -> type[MethodConfig]:
    """Return the config class of method ``name``; raise ValueError listing the known names."""
    if name not in _METHOD_CONFIGS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_METHOD_CONFIGS))}")
    return _METHOD_CONFIGS[name]


def _method_config(value: dict[str, Any]) -> MethodConfig:
    return method_config_class(str(value.get("name", "lora"))).model_validate(value)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Return a pydantic error as lines ``source: key: what is wrong``, one per problem."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        # pydantic reports nested method errors under the method's class name; drop it
        key = ".".join(p for p in key.split(".") if not p[:1].isupper())
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (see `deltatune config` for every key)"
        where = f"{source}: {key}: " if key else f"{source}: "  # a whole-config check has no key
        lines.append(where + msg + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden"
                                    and not isinstance(e["input"], dict) else ""))
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a YAML-parsed value; raise ConfigError if malformed."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=2")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key part; write e.g. method.r=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def config_from_dict(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict as a RunConfig; raise ConfigError naming each bad key."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_config_tree(path: str | Path | None, overrides: list[str] | None,
                     sections: str = "model, data, method, train, output") -> tuple[dict[str, Any], str]:
    """Read a YAML file (or nothing) and apply ``key=value`` overrides; return the raw tree and a source name
    for messages. Raises ConfigError naming the file, line or override."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p, source = Path(path), str(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections ({sections})")
        tree = loaded or {}
    for text in overrides or []:
        key_path, value = parse_override(text)
        _set_path(tree, key_path, value, f"override {text!r}")
    if overrides:
        source = f"{source} + overrides" if path else "overrides"
    return tree, source


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None), apply overrides, validate.

    Returns the validated RunConfig; raises ConfigError with the file and key on any problem.
    """
    tree, source = read_config_tree(path, overrides)
    return config_from_dict(tree, source)


def dump_config(cfg: RunConfig) -> str:
    """Return the config as YAML text, in section order."""
    data = json.loads(cfg.model_dump_json())
    return yaml.safe_dump(data, sort_keys=False)


def describe_keys() -> list[tuple[str, str, str]]:
    """Return ``(key, default, help)`` for every config key, for `--help` and the docs."""
    rows: list[tuple[str, str, str]] = []
    sections: list[tuple[str, str, type[BaseModel]]] = [("model", "", ModelConfig), ("data", "", DataConfig)]
    methods = dict(_METHOD_CONFIGS)
    rows_method = [("method", "", MethodConfig)]
    rows_method += [("method", f"[{name}] ", cls) for name, cls in methods.items()]
    sections += [*rows_method, ("train", "", TrainConfig), ("output", "", OutputConfig)]
    for prefix, tag, cls in sections:
        for name, field in cls.model_fields.items():
            if tag and name == "name":
                continue  # `method.name` is listed once, with every choice
            default = "(required)" if field.is_required() else json.dumps(field.get_default(call_default_factory=True))
            help_text = " ".join((field.description or "").split())
            if not tag and prefix == "method":
                help_text += f" One of: {', '.join(sorted(methods))}."
            rows.append((f"{prefix}.{name}", default, tag + help_text))
    return rows
