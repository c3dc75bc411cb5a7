"""The method contract on the two bundled real models (slow): SmolLM2-135M-Instruct and MiniLM-L6.

For each method: the attached model computes what the base computes (prompt methods excepted, they
change the input by design), save -> load is bit-identical, and merge matches unmerged or refuses.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.config import ModelConfig
from deltatune.errors import DeltatuneError

from .test_method_contract import METHODS, randomize

pytestmark = pytest.mark.slow

PROMPTS = [("prompt_tuning", {"name": "prompt_tuning", "num_virtual_tokens": 4}),
           ("p_tuning", {"name": "p_tuning", "num_virtual_tokens": 4}),
           ("prefix_tuning", {"name": "prefix_tuning", "num_virtual_tokens": 4})]
CASES = [(c.id, c.config, c.mergeable) for c in METHODS] + [(n, c, False) for n, c in PROMPTS]
INPUTS = {"smollm2": torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 30, 2]]),
          "minilm": torch.tensor([[101, 2023, 3185, 2001, 6429, 102]])}


@pytest.fixture(scope="module")
def real_bases() -> dict[str, dt.LoadedModel]:
    """Both bundled models, loaded once (the tests work on deep copies)."""
    try:
        return {"smollm2": dt.load_model(ModelConfig(name="default", device="cpu")),
                "minilm": dt.load_model(ModelConfig(name="minilm", device="cpu"), task="classification",
                                        num_labels=2)}
    except DeltatuneError as err:
        pytest.skip(f"bundled models not available: {err}")


@pytest.mark.parametrize("kind", ["smollm2", "minilm"])
@pytest.mark.parametrize(("name", "config", "mergeable"), CASES, ids=[c[0] for c in CASES])
def test_contract_on_the_bundled_model(name: str, config: dict, mergeable: bool, kind: str,
                                       real_bases: dict[str, dt.LoadedModel], tmp_path: Path) -> None:
    loaded = real_bases[kind]
    ids = INPUTS[kind]
    model = copy.deepcopy(loaded.model).eval()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    method = dt.attach(model, config)
    with torch.no_grad():
        attached = model(input_ids=ids).logits
    if name not in dict(PROMPTS):
        assert torch.allclose(attached, base, atol=1e-5, rtol=0), float((attached - base).abs().max())
    randomize(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    dt.save_delta(tmp_path, method, model, loaded.source, task=loaded.task)
    delta = dt.load_delta(tmp_path, device="cpu")
    # the reloaded tensors are bit-identical; the logits are compared to 1e-6 because BLAS may pick
    # another kernel path for the same values at other memory addresses (seen: 3e-8 on MiniLM)
    reloaded = delta.method.delta_state_dict(delta.loaded.model)
    assert all(torch.equal(v, reloaded[k]) for k, v in method.delta_state_dict(model).items())
    with torch.no_grad():
        got = delta.loaded.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0), float((got - want).abs().max())
    if mergeable:
        merged = dt.merge(model, method)
        with torch.no_grad():
            got = merged(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-3, rtol=1e-4), float((got - want).abs().max())
    else:
        with pytest.raises(DeltatuneError, match=config["name"]):
            dt.merge(model, method)
