"""Prompt learning: trainable virtual tokens in front of the input, the model itself frozen.

prompt_tuning (Lester, Al-Rfou, Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): N trainable embeddings P (N, D) are prepended to the input embeddings X (T, D):

    h = f([P; X])

p_tuning (Liu et al. 2021, "GPT Understands, Too"): the virtual tokens come out of a small prompt
encoder over N trainable inputs E (N, D), which eases optimisation:

    P = MLP(E)                        mlp:  Linear(D, h) ReLU Linear(h, h) ReLU Linear(h, D)
    P = MLP(BiLSTM(E))                lstm: 2-layer BiLSTM(D -> h), then Linear(2h, 2h) ReLU Linear(2h, D)

prefix_tuning (Li, Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): every
layer l attends to N trainable key/value pairs before the input's own:

    attn_l(x) = softmax(q [K_l^P; K_l]^T / sqrt(d)) [V_l^P; V_l]      K_l^P, V_l^P: (H_kv, N, d)

optionally reparameterised during training as [K^P; V^P] = MLP(E) = Linear(tanh(Linear(E))), which
the paper found to stabilise training (``projection: true``). Nothing here is mergeable.

Saved in peft's formats (PROMPT_TUNING, P_TUNING, PREFIX_TUNING): one tensor ``prompt_embeddings``, the
encoder's *output* (N, D) or (N, 2 * layers * H_kv * d), and a classifier head as
``base_model.<head>.weight``. As in peft, the p-tuning encoder and the prefix MLP are training-only and
dropped at save; a loaded delta holds their output. How the tokens enter the model: prompts_inject.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltatune.config import MethodConfig
from deltatune.errors import DeltatuneError
from deltatune.methods.base import Method, freeze, head_names, register_method, unfreeze_heads
from deltatune.methods.prompts_inject import Kind, VirtualTokens, install, is_causal, kv_layout, virtual_tokens

SAVED = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # peft's key prefix for a prompt method's modules_to_save


class PromptTuningConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (3e-2, 3e-1)
    name: Literal["prompt_tuning"] = "prompt_tuning"
    """The fine-tuning method."""
    num_virtual_tokens: int = Field(default=20, ge=1, le=4096)
    """How many virtual tokens are prepended to every example."""
    init: Literal["random", "vocab", "text"] = "vocab"
    """`vocab`: embeddings of tokens sampled from the vocabulary; `random`: uniform in [-0.5, 0.5] as in
    the paper; `text`: the embeddings of `init_text`'s tokens, repeated or cut to num_virtual_tokens."""
    init_text: str | None = None
    """Text whose token embeddings start the prompt (implies init: text), e.g. a task instruction."""
    tokenizer: str | None = None
    """Tokenizer for init_text (default: the base model's own folder)."""

    @model_validator(mode="after")
    def _text_init(self) -> PromptTuningConfig:
        if self.init_text is not None and "init" not in self.model_fields_set:
            object.__setattr__(self, "init", "text")
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text (the text whose tokens start the prompt)")
        if self.init_text is not None and self.init != "text":
            raise ValueError(f"init_text is only used with init: text (init is {self.init})")
        return self


class PTuningConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (1e-3, 3e-2)
    name: Literal["p_tuning"] = "p_tuning"
    """The fine-tuning method."""
    num_virtual_tokens: int = Field(default=20, ge=1, le=4096)
    """How many virtual tokens are prepended to every example."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """The prompt encoder: a 3-layer MLP, or a bidirectional LSTM followed by a 2-layer MLP (the paper's)."""
    encoder_hidden_size: int | None = Field(default=None, ge=1)
    """Hidden size of the prompt encoder (default: the model's hidden size)."""
    encoder_num_layers: int = Field(default=2, ge=1)
    """LSTM layers (lstm only)."""
    encoder_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout between the LSTM layers (lstm only)."""


class PrefixTuningConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (1e-2, 5e-2)
    name: Literal["prefix_tuning"] = "prefix_tuning"
    """The fine-tuning method."""
    num_virtual_tokens: int = Field(default=20, ge=1, le=4096)
    """How many key/value pairs are prepended in every layer."""
    projection: bool = False
    """Train the prefixes through a reparameterising MLP (dropped at save, only its output is kept)."""
    encoder_hidden_size: int | None = Field(default=None, ge=1)
    """Hidden size of the projection MLP (default: the per-layer key/value width, as in peft)."""


class SoftPrompt(nn.Module):
    """N trainable vectors returned as they are: prompt tuning, and the saved form of every method here."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(weight.float(), freeze=False)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (N, D)


class PromptEncoder(nn.Module):
    """p-tuning's prompt encoder: P = MLP(E) or MLP(BiLSTM(E)) (see the module docstring)."""

    def __init__(self, n: int, dim: int, hidden: int, kind: str, lstm_layers: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, dim)
        self.lstm_head: nn.LSTM | None = None
        if kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight[None]  # (1, N, D)
        if self.lstm_head is not None:
            e = self.lstm_head(e)[0]  # (1, N, 2h)
        return self.mlp_head(e)[0]  # (N, D)


class PrefixProjection(nn.Module):
    """Prefix tuning's reparameterisation: [K^P; V^P] = Linear(tanh(Linear(E))), E: (N, width)."""

    def __init__(self, n: int, width: int, hidden: int, out: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, width)
        self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)  # (N, 2 * layers * H_kv * d)


class _PromptMethod(Method):
    """What the three methods share: install the tokens, train a classifier head beside them, save the
    encoder's output as ``prompt_embeddings``, refuse to merge."""

    kind: ClassVar[Kind]
    peft_type: ClassVar[str]
    packed_attention = False

    def build_encoder(self, model: nn.Module) -> nn.Module:
        """Return the freshly initialised trainable encoder for ``model``."""
        raise NotImplementedError

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        """Return the adapter_config.json fields particular to this method."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model, add the virtual tokens and hook its forward; returns the model."""
        freeze(model)
        device = model.get_input_embeddings().weight.device
        encoder = self.build_encoder(model).to(device)
        install(model, VirtualTokens(encoder, self.config.num_virtual_tokens, self.kind, is_causal(model)))
        unfreeze_heads(model)
        return model

    def _heads(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{HEAD_PREFIX}{head}.{pname}": p for head in head_names(model)
                for pname, p in model.get_submodule(head).named_parameters()}

    def delta_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return ``prompt_embeddings`` (the encoder's output, computed in eval mode) and any head."""
        encoder = virtual_tokens(model).encoder
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            prompts = encoder().detach()
        encoder.train(was_training)
        return {SAVED: prompts, **{k: p.detach() for k, p in self._heads(model).items()}}

    def load_delta_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the encoder by the saved output and copy any head; raise if names or shapes disagree."""
        vt = virtual_tokens(model)
        heads = self._heads(model)
        missing = sorted({SAVED, *heads} - set(tensors))
        extra = sorted(set(tensors) - {SAVED, *heads})
        if missing or extra:
            raise DeltatuneError(f"the {self.name} delta does not fit this model: "
                                 + (f"missing {missing[:3]} " if missing else "")
                                 + (f"unexpected {extra[:3]}" if extra else "")
                                 + "; was it trained on another base model or task?")
        with torch.no_grad():
            want = vt.encoder().shape
        saved = tensors[SAVED]
        if saved.shape != want:
            raise DeltatuneError(f"the delta's {SAVED} has shape {tuple(saved.shape)}, the model expects "
                                 f"{tuple(want)}; was it trained with other num_virtual_tokens or base model?")
        device = model.get_input_embeddings().weight.device
        vt.encoder = SoftPrompt(saved.to(device))
        with torch.no_grad():
            for key, param in heads.items():
                if tensors[key].shape != param.shape:
                    raise DeltatuneError(f"the delta's {key} has shape {tuple(tensors[key].shape)}, the model "
                                         f"expects {tuple(param.shape)}; was it trained with other labels?")
                param.copy_(tensors[key].to(param.dtype))

    def adapter_config(self, model: nn.Module, base_model: str) -> dict[str, Any]:
        """Return peft's config fields for this method, so ``PeftModel.from_pretrained`` loads the delta."""
        cfg = model.config
        heads = head_names(model)
        return {
            "peft_type": self.peft_type,
            "task_type": "SEQ_CLS" if heads else "CAUSAL_LM",
            "auto_mapping": None,
            "base_model_name_or_path": base_model,
            "revision": None,
            "inference_mode": True,
            "num_virtual_tokens": self.config.num_virtual_tokens,
            "token_dim": cfg.hidden_size,
            "num_transformer_submodules": 1,
            "num_attention_heads": cfg.num_attention_heads,
            "num_layers": cfg.num_hidden_layers,
            "modules_to_save": [h.split(".")[-1] for h in heads] or None,
            **self.peft_fields(model),
        }

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Within the block the model runs without the virtual tokens: it computes as the base model."""
        vt = virtual_tokens(model)
        before, vt.enabled = vt.enabled, False
        try:
            yield
        finally:
            vt.enabled = before


@register_method
class PromptTuning(_PromptMethod):
    """Prompt tuning: N trainable input embeddings (see the module docstring)."""

    name = "prompt_tuning"
    config_class = PromptTuningConfig
    config: PromptTuningConfig
    kind = "tokens"
    peft_type = "PROMPT_TUNING"

    def build_encoder(self, model: nn.Module) -> nn.Module:
        """Return a SoftPrompt initialised from random values, sampled vocabulary, or init_text."""
        cfg, n = self.config, self.config.num_virtual_tokens
        table = model.get_input_embeddings().weight  # (V, D)
        if cfg.init == "random":  # Lester et al.: uniform in [-0.5, 0.5]
            return SoftPrompt(torch.rand(n, table.shape[1]) - 0.5)
        if cfg.init == "vocab":
            ids = torch.randint(table.shape[0], (n,))
        else:  # as peft: the text's token ids (with the tokenizer's special tokens), cycled or cut to n
            ids = torch.tensor(self._text_ids(model))
            ids = ids.repeat(math.ceil(n / len(ids)))[:n]
        return SoftPrompt(table.detach()[ids.to(table.device)].clone())

    def _text_ids(self, model: nn.Module) -> list[int]:
        from transformers import AutoTokenizer

        source = self._tokenizer_source(model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as err:  # any loading failure: the path is the user's to fix
            raise DeltatuneError(f"method.tokenizer: cannot load a tokenizer from {source!r} for init_text ({err}); "
                                 "set method.tokenizer to the base model's folder") from None
        ids = tokenizer(self.config.init_text)["input_ids"]
        if not ids:
            raise DeltatuneError("method.init_text: the text has no tokens; give a non-empty text")
        return list(ids)

    def _tokenizer_source(self, model: nn.Module) -> str:
        return self.config.tokenizer or str(getattr(model, "name_or_path", "") or model.config._name_or_path)

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        """Return PromptTuningConfig's own fields."""
        cfg = self.config
        text = cfg.init == "text"
        return {"prompt_tuning_init": {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[cfg.init],
                "prompt_tuning_init_text": cfg.init_text,
                "tokenizer_name_or_path": self._tokenizer_source(model) if text else None,
                "tokenizer_kwargs": None}


@register_method
class PTuning(_PromptMethod):
    """p-tuning: virtual tokens produced by an MLP or LSTM prompt encoder (see the module docstring)."""

    name = "p_tuning"
    config_class = PTuningConfig
    config: PTuningConfig
    kind = "tokens"
    peft_type = "P_TUNING"

    def _hidden(self, model: nn.Module) -> int:
        return self.config.encoder_hidden_size or model.config.hidden_size

    def build_encoder(self, model: nn.Module) -> nn.Module:
        """Return a PromptEncoder with default torch initialisation (as peft)."""
        cfg = self.config
        return PromptEncoder(cfg.num_virtual_tokens, model.config.hidden_size, self._hidden(model), cfg.encoder,
                             cfg.encoder_num_layers, cfg.encoder_dropout)

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        """Return PromptEncoderConfig's own fields."""
        cfg = self.config
        return {"encoder_reparameterization_type": cfg.encoder.upper(), "encoder_hidden_size": self._hidden(model),
                "encoder_num_layers": cfg.encoder_num_layers, "encoder_dropout": cfg.encoder_dropout}


@register_method
class PrefixTuning(_PromptMethod):
    """Prefix tuning: trainable key/value prefixes in every layer (see the module docstring)."""

    name = "prefix_tuning"
    config_class = PrefixTuningConfig
    config: PrefixTuningConfig
    kind = "kv"
    peft_type = "PREFIX_TUNING"

    def _width(self, model: nn.Module) -> int:
        _, heads, head_dim = kv_layout(model.config)
        return heads * head_dim  # one layer's key (or value) width: peft's token_dim under grouped-query attention

    def build_encoder(self, model: nn.Module) -> nn.Module:
        """Return the prefixes (N(0, 1) as peft's nn.Embedding), or the projection MLP that produces them."""
        n, width, layers = self.config.num_virtual_tokens, self._width(model), model.config.num_hidden_layers
        if self.config.projection:
            return PrefixProjection(n, width, self.config.encoder_hidden_size or width, 2 * layers * width)
        return SoftPrompt(torch.randn(n, 2 * layers * width))

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        """Return PrefixTuningConfig's fields, with token_dim and heads counted in key/value heads (as peft)."""
        _, heads, _ = kv_layout(model.config)
        return {"token_dim": self._width(model), "num_attention_heads": heads,
                "encoder_hidden_size": self.config.encoder_hidden_size or self._width(model),
                "prefix_projection": self.config.projection, "init_weights": None}
