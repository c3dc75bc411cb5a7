"""Tool calling: data formats and their checks, rendering (the template's own and the fallback), loss masks, the
tool-call accuracy metric, a trained tiny model calling a function through `deltatune serve` and the openai SDK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from deltatune.cli import main
from deltatune.data import load_examples, tokenize_examples
from deltatune.data.chat import ChatRenderer
from deltatune.data.formats import to_examples
from deltatune.data.tools import ToolCall, parse_tool_calls, system_block
from deltatune.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "toolcall_en_train.json"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
OPENAI_ROW = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees in Paris."}]}
SHAREGPT_ROW = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
    {"from": "observation", "value": '{"temp": 21}'},
    {"from": "gpt", "value": "21 degrees in Paris."}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_both_formats_read_to_the_same_conversation() -> None:
    (a,) = to_examples([("a.jsonl:1", OPENAI_ROW)])
    (b,) = to_examples([("b.jsonl:1", SHAREGPT_ROW)])
    for ex in (a, b):
        assert ex.tools is not None and ex.tools[0]["function"]["name"] == "get_weather"
        roles = [m.role for m in ex.messages or []]
        assert roles[-4:] == ["user", "assistant", "tool", "assistant"]
        call = (ex.messages or [])[-3].tool_calls[0]  # type: ignore[index]
        assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"})
        result = (ex.messages or [])[-2]
        assert result.name == "get_weather" and result.tool_call_id == call.id and call.id


@pytest.mark.parametrize(("row", "message"), [
    ({**SHAREGPT_ROW, "conversations": [SHAREGPT_ROW["conversations"][0],
                                        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {'},
                                        {"from": "gpt", "value": "x"}]}, "the function call is not valid JSON"),
    ({**SHAREGPT_ROW, "conversations": [SHAREGPT_ROW["conversations"][0], {"from": "observation", "value": "{}"},
                                        {"from": "gpt", "value": "x"}]}, "a tool result with no function call"),
    ({**SHAREGPT_ROW, "conversations": [SHAREGPT_ROW["conversations"][0],
                                        {"from": "function_call", "value": '{"name": "get_time", "arguments": {}}'},
                                        {"from": "gpt", "value": "x"}]}, "'get_time', which is not among"),
    ({**OPENAI_ROW, "messages": [*OPENAI_ROW["messages"][:2], {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "city=Paris"}}]}]},
     "the arguments of get_weather is not valid JSON"),
    ({**OPENAI_ROW, "messages": [*OPENAI_ROW["messages"][:3], {"role": "tool", "tool_call_id": "call_9",
                                                                 "content": "{}"}]},
     "tool_call_id 'call_9' answers no earlier call"),
])
def test_malformed_tool_data_stops_with_file_and_line_or_is_skipped_with_a_count(
        row: dict, message: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = OPENAI_ROW if "messages" in row else SHAREGPT_ROW
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, good, row, good)))
    with pytest.raises(DataError, match=message) as err:
        load_examples(str(path))
    assert f"{path}:3" in str(err.value)
    skipped: list[str] = []
    assert len(load_examples(str(path), skipped=skipped)) == 3 and len(skipped) == 1 and f"{path}:3" in skipped[0]
    # the run: one line, exit 2; with data.on_invalid=skip it trains on the rest and says what it left out
    args = ["train", f"model.name={tiny_llama_dir}", f"data.train={path}", f"output.dir={tmp_path / 'o'}",
            "train.max_steps=1", "data.eval=null", "--no-progress"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert main([*args, "data.on_invalid=skip"]) == 0
    assert "left out 1 invalid records (data.on_invalid=skip)" in capsys.readouterr().out


def test_the_fallback_rendering_is_the_templates_own_output_of_the_tagged_turns(tokenizer: object) -> None:
    (ex,) = to_examples([("a:1", OPENAI_ROW)])
    renderer = ChatRenderer(tokenizer)
    assert not renderer.native_tools  # SmolLM2's ChatML template renders no tools
    rendered = renderer.render_with_spans(ex.messages or [], "a:1", tools=ex.tools)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    by_hand = [{"role": "system", "content": "Be brief.\n\n" + system_block(ex.tools or [])},
               {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": call},
               {"role": "user", "content": '<tool_response>\n{"temp": 21}\n</tool_response>'},
               {"role": "assistant", "content": "21 degrees in Paris."}]
    assert rendered.text == tokenizer.apply_chat_template(by_hand, tokenize=False)  # type: ignore[attr-defined]
    assert '"name": "get_weather"' in by_hand[0]["content"] and "<tools>" in by_hand[0]["content"]
    supervised = [rendered.text[s.start:s.end] for s in rendered.spans]
    assert supervised == [call + "<|im_end|>", "21 degrees in Paris.<|im_end|>"]


NATIVE = """{%- if tools %}<|im_start|>system
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function | tojson }}</call>{% endfor %}{% else %}\
{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_renders_tools_gets_them_itself_and_the_loss_covers_the_call(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = NATIVE
    (ex,) = to_examples([("a:1", OPENAI_ROW)])
    renderer = ChatRenderer(tok)
    assert renderer.native_tools
    rendered = renderer.render_with_spans(ex.messages or [], "a:1", tools=ex.tools)
    hf = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
          {"role": "tool", "content": '{"temp": 21}'}, {"role": "assistant", "content": "21 degrees in Paris."}]
    assert rendered.text == tok.apply_chat_template(hf, tools=[WEATHER], tokenize=False)
    supervised = [rendered.text[s.start:s.end] for s in rendered.spans]
    assert supervised[0].startswith("<call>") and "Paris" in supervised[0] and supervised[0].endswith("<|im_end|>")


def test_the_loss_covers_the_assistants_text_and_calls_and_nothing_else(tokenizer: object) -> None:
    (ex,) = to_examples([("a:1", OPENAI_ROW)])
    (tokenized,), _ = tokenize_examples([ex], tokenizer, task="causal_lm", max_length=4096, truncation="error")
    ids, labels = tokenized.input_ids, tokenized.labels
    runs, current = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != -100:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    texts = [tokenizer.decode(r) for r in runs]  # type: ignore[attr-defined]
    assert texts == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                     "21 degrees in Paris.<|im_end|>"]


@pytest.mark.parametrize(("reply", "calls", "malformed"), [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": "x"}}\n</tool_call>', [("f", {"a": 1, "b": "x"})], 0),
    ('Sure.\n<tool_call>{"arguments": {"b": "x", "a": 1}, "name": "f"}</tool_call>', [("f", {"a": 1, "b": "x"})], 0),
    ('{"name": "f", "arguments": {"a": 1}}', [("f", {"a": 1})], 0),  # a bare JSON call
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', [("f", {"a": 1})], 0),  # cut off before the closing tag
    ("<tool_call>\n{name: f}\n</tool_call>", [], 1),
    ("It is sunny.", [], 0),
])
def test_replies_parse_into_calls(reply: str, calls: list, malformed: int) -> None:
    got = parse_tool_calls(reply)
    assert [(c.name, c.arguments) for c in got.calls] == calls and got.malformed == malformed


def test_tool_call_accuracy_compares_arguments_as_objects(monkeypatch: pytest.MonkeyPatch, tokenizer: object) -> None:
    import deltatune.evaluate as ev

    rows = []
    for args in ('{"city": "Paris", "days": 2}', '{"city": "Rome"}', '{"city": "Oslo"}', '{"city": "Bern"}'):
        row = json.loads(json.dumps(OPENAI_ROW))
        row["messages"][2]["tool_calls"][0]["function"]["arguments"] = args
        rows.append(row)
    examples = to_examples([(f"a:{i}", r) for i, r in enumerate(rows)])
    canned = iter([
        ['<tool_call>{"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}</tool_call>',  # key order
         '<tool_call>\n{ "name" : "get_weather" ,\n "arguments" : { "city" : "Rome" } }\n</tool_call>',  # spaces
         '<tool_call>{"name": "get_weather", "arguments": {"city": ["Oslo"]}}</tool_call>',  # wrong type
         "<tool_call>{not json}</tool_call>"],  # does not parse
        ["fine", "<tool_call>", "ok", "ok"],  # the text turns: one starts a call where the reference answers in text
    ])
    monkeypatch.setattr(ev, "generate", lambda *a, **k: next(canned))
    result = ev.tool_call_accuracy(None, tokenizer, examples, limit=10)  # type: ignore[arg-type]
    assert result["n"] == 4 and result["tool_call_accuracy"] == 0.5
    assert result["tool_call_parse_rate"] == 0.75 and result["tool_call_false_calls"] == 0.25


def test_the_shared_tool_calling_data_reads() -> None:
    if not SHARED.is_file():
        pytest.skip("../shared/data is not beside this checkout (a user's clone): nothing to read")
    examples = load_examples(str(SHARED))
    calls = [c for ex in examples for m in ex.messages or [] for c in m.tool_calls or []]
    assert len(examples) == 200 and len(calls) > 100 and all(isinstance(c, ToolCall) for c in calls)


def test_a_trained_tiny_model_calls_a_function_through_the_openai_sdk(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Train the tiny Llama to call get_weather for one question, then ask through `deltatune serve` with the openai
    SDK: the reply comes back as tool_calls with an id and finish_reason tool_calls (and streamed the same way);
    asked without tools, the same model's text comes back as text, never as an error."""
    openai = pytest.importorskip("openai")
    from deltatune.serving import serve

    data = tmp_path / "calls.jsonl"
    data.write_text("".join(json.dumps(OPENAI_ROW) + "\n" for _ in range(8)))
    out = tmp_path / "delta"
    assert main(["train", f"model.name={tiny_llama_dir}", f"data.train={data}", f"output.dir={out}",
                 "data.eval=null", "train.max_steps=30", "train.lr=2e-2", "method.r=8", "train.batch_size=4",
                 "--no-progress"]) == 0
    handle = serve({"weather": out}, base=str(tiny_llama_dir), port=0, device="cpu", background=True,
                   say=lambda text: None)
    try:
        api = openai.OpenAI(base_url=handle.url + "/v1", api_key="-", max_retries=0)
        messages = OPENAI_ROW["messages"][:2]
        reply = api.chat.completions.create(model="weather", messages=messages, tools=[WEATHER], temperature=0,
                                            max_tokens=40)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        # the call's result goes back in, as OpenAI clients send it
        follow = api.chat.completions.create(model="weather", tools=[WEATHER], temperature=0, max_tokens=12,
                                             messages=[*messages, choice.message.model_dump(exclude_none=True),
                                                       {"role": "tool", "tool_call_id": call.id, "content": "{}"}])
        assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
        stream = api.chat.completions.create(model="weather", messages=messages, tools=[WEATHER], temperature=0,
                                             max_tokens=40, stream=True)
        chunks = list(stream)
        streamed = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert streamed[0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
        plain = api.chat.completions.create(model="weather", messages=messages, temperature=0, max_tokens=40)
        assert plain.choices[0].finish_reason in ("stop", "length") and plain.choices[0].message.tool_calls is None
    finally:
        handle.stop(timeout=5)


def test_hosted_openai_keeps_tools_and_calls_in_openais_shape(tmp_path: Path) -> None:
    from deltatune import hosted

    path = tmp_path / "calls.json"
    path.write_text(json.dumps([SHAREGPT_ROW] * 12))
    report = hosted.check(str(path), "openai")
    assert report.ok, report.errors
    row = report.rows[0]
    assert row["tools"] == [WEATHER]
    call_turn, result_turn = row["messages"][1], row["messages"][2]
    assert call_turn["content"] is None and call_turn["role"] == "assistant"
    (call,) = call_turn["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert result_turn == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": call["id"]}


def test_hosted_vertex_maps_tools_to_function_declarations_calls_and_responses(tmp_path: Path) -> None:
    from deltatune import hosted

    path = tmp_path / "calls.json"
    path.write_text(json.dumps([SHAREGPT_ROW] * 16))
    report = hosted.check(str(path), "vertex")
    assert report.ok, report.errors
    row = report.rows[0]
    assert row["tools"] == [{"functionDeclarations": [WEATHER["function"]]}]
    assert row["contents"][1] == {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                                                                                "args": {"city": "Paris"}}}]}
    assert row["contents"][2] == {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                                                   "response": {"temp": 21}}}]}
    assert row["contents"][-1]["role"] == "model"


def test_hosted_prepare_reports_bad_tool_data_per_line(tmp_path: Path) -> None:
    from deltatune import hosted

    bad = {**SHAREGPT_ROW, "conversations": [SHAREGPT_ROW["conversations"][0],
                                             {"from": "function_call", "value": '{"name": "nope", "arguments": {}}'},
                                             {"from": "gpt", "value": "x"}]}
    path = tmp_path / "calls.json"
    path.write_text(json.dumps([SHAREGPT_ROW] * 11 + [bad]))
    report = hosted.check(str(path), "openai")
    assert len(report.errors) == 1 and "'nope', which is not among the record's tools" in report.errors[0]


def test_the_server_returns_a_reply_whose_call_does_not_parse_as_text() -> None:
    from deltatune.serving.api import _assistant_message

    message, calls = _assistant_message('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', True)
    assert calls and message["content"] is None and message["tool_calls"][0]["function"]["name"] == "f"
    for text in ("<tool_call>{not json}</tool_call>", "plain words"):
        message, calls = _assistant_message(text, True)
        assert calls == [] and message == {"role": "assistant", "content": text}
    assert _assistant_message('<tool_call>{"name": "f"}</tool_call>', False)[1] == []  # no tools asked: text
