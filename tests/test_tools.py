"""Tools and call formats: schemas from type hints and docstrings, the chat-template tool-call format (tools
in the rendered prompt, JSON calls, ``tool`` messages), the Search-R1 tag format, and bad tool settings.

    python -m pytest tests/test_tools.py -q
"""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from test_multiturn import ScriptedEngine, lookup

import trgrpo.agent.tools as tools_mod
from trgrpo.agent.episodes import run_episodes
from trgrpo.agent.formats import ChatFormat, TagFormat
from trgrpo.agent.tools import AgentConfig, FunctionTools, ToolBox, ToolCall, run_calls
from trgrpo.cli import main
from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model
from trgrpo.policy.chartokenizer import build_char_tokenizer
from trgrpo.rollout import SamplingConfig

# the embedded chat template, plus the tool schemas in a system block (as instruct models' templates do)
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|system|>Tools: ' + (tools | tojson) + '\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_char_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    tiny = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return load_model(PolicyConfig(tiny=tiny), tokenizer).eval()


def test_schema_comes_from_type_hints_and_docstring():
    (schema,) = FunctionTools([lookup]).tools()
    assert schema["function"]["name"] == "lookup" and schema["function"]["description"] == "Look a word up."
    assert schema["function"]["parameters"]["properties"]["query"] == {
        "type": "string",
        "description": "the word.",
    }
    assert schema["function"]["parameters"]["required"] == ["query"]


def test_chat_format_renders_tools_parses_calls_and_returns_tool_messages(tokenizer):
    fmt = ChatFormat(FunctionTools([lookup]).tools(), system_prompt="Be brief.")
    prompt = fmt.render_prompt(tokenizer, "What is a cat?")
    assert prompt.startswith("<|system|>Tools: [") and '"name": "lookup"' in prompt
    assert prompt.endswith("<|system|>Be brief.\n<|user|>What is a cat?\n<|assistant|>")
    call = '<tool_call>{"name": "lookup", "arguments": {"query": "cat"}}</tool_call>'
    assert fmt.parse("thinking " + call) == ToolCall("lookup", {"query": "cat"})
    assert fmt.parse(
        '<tool_call>{"name": "lookup", "arguments": "{\\"query\\": \\"x\\"}"}</tool_call>'
    ).arguments == {"query": "x"}  # arguments as a JSON string, as some models write them
    assert fmt.parse("<tool_call>{not json}</tool_call>").error.startswith("malformed tool call")
    assert fmt.parse("the answer is 4") is None
    # the end of the assistant turn, the tool message, the next assistant turn: as the template renders them
    assert fmt.wrap(tokenizer) == ("\n<|tool|>", "\n<|assistant|>")


def test_chat_format_episode_end_to_end(tokenizer, model):
    call = "<tool_call>" + json.dumps({"name": "lookup", "arguments": {"query": "cat"}}) + "</tool_call>"
    sampling = SamplingConfig(
        group_size=2, max_new_tokens=100, agent=AgentConfig(format="chat", tools=[lookup])
    )
    r = run_episodes(
        ScriptedEngine([call, "a pet<eos>"]), model, tokenizer, ["What is a cat?"], sampling, 2, False
    )
    assert r.completions[0] == call + "\n<|tool|>def:cat\n<|assistant|>a pet"
    prompt = tokenizer.decode(r.input_ids[0, : r.prompt_len][r.attention_mask[0, : r.prompt_len].bool()])
    assert '"name": "lookup"' in prompt  # the model saw the tool schema
    tool = (r.completion_mask[0] == 1) & (r.trainable_mask[0] == 0)
    assert tokenizer.decode(r.input_ids[0, r.prompt_len :][tool]) == "\n<|tool|>def:cat\n<|assistant|>"
    assert r.episodes.tool_calls.tolist() == [1, 1] and not r.truncated.any()
    assert r.input_ids[0, r.prompt_len :][r.completion_mask[0].bool()][-1] == tokenizer.eos_token_id
    assert torch.equal(r.trainable_mask[0, -1:], torch.ones(1))  # the model's EOS is trained


DEEP = '<tool_call>{"name": "lookup", "arguments": {"query": ' + "[" * 1000 + "]" * 1000 + "}}</tool_call>"


@pytest.fixture
def default_recursion_limit():
    """Python's default recursion limit for one test (some libraries raise it on import)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(limit)


def test_a_deeply_nested_call_is_a_malformed_call_counted_and_logged_once(
    tokenizer, model, monkeypatch, caplog, default_recursion_limit
):
    """A 1000-deep JSON call makes the JSON parser raise RecursionError at the default recursion limit: an
    error text for the model, like any call that cannot be parsed, and the rollout goes on."""
    call = ChatFormat(FunctionTools([lookup]).tools()).parse(DEEP)
    assert call.name == "" and call.error.startswith("malformed tool call") and "recursion" in call.error
    monkeypatch.setattr(tools_mod, "_said", set())  # as in a fresh process
    good = "<tool_call>" + json.dumps({"name": "lookup", "arguments": {"query": "cat"}}) + "</tool_call>"
    agent = AgentConfig(format="chat", tools=[lookup], max_turns=3, max_tool_tokens=2000)
    sampling = SamplingConfig(group_size=2, max_new_tokens=5000, agent=agent)
    engine = ScriptedEngine([DEEP, DEEP, good, "a pet<eos>"])
    with caplog.at_level(logging.WARNING, logger="trgrpo.agent.tools"):
        r = run_episodes(engine, model, tokenizer, ["What is a cat?"], sampling, 2, False)
    assert r.episodes.tool_calls.tolist() == [3, 3] and r.episodes.tool_errors.tolist() == [2, 2]
    assert r.completions[0].endswith("def:cat\n<|assistant|>a pet") and not r.truncated.any()
    said = [m for m in caplog.messages if "could not be parsed" in m]
    assert len(said) == 1 and "malformed tool call" in said[0]  # four unparsable calls, said once


def test_tag_format_parses_search_r1_calls_and_answers():
    fmt = TagFormat(
        [
            {
                "type": "function",
                "function": {
                    "name": "search",
                    "parameters": {"properties": {"query": {"type": "string"}}, "required": ["query"]},
                },
            }
        ]
    )
    assert fmt.stop == ["</search>", "</answer>"]
    assert fmt.parse("<think>hm</think><search> capital of France </search>") == ToolCall(
        "search", {"query": "capital of France"}
    )
    assert fmt.parse("<answer>Paris</answer>") is None
    assert fmt.parse("oops</search>").error == "</search> without an opening <search>"
    assert fmt.wrap(None) == ("\n\n<information>", "</information>\n\n")


def test_unknown_tools_and_bad_arguments_are_errors_for_the_model():
    box = ToolBox(AgentConfig(tools=[lookup])).episode({}, 0)
    results = run_calls(
        [
            (box, ToolCall("nope", {})),
            (box, ToolCall("lookup", {"q": 1})),
            (box, ToolCall("lookup", {"query": "a"})),
        ],
        timeout=1.0,
    )
    assert results[0].error and "unknown tool 'nope'; available: lookup" in results[0].text
    assert results[1].error and "missing ['query'], unexpected ['q']" in results[1].text
    assert results[2] == (lookup(query="a"), False)


def test_a_tool_path_that_does_not_import_fails_at_start_up(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--model.sampling.agent.tools=[no_such_module.no_such_tool]",
                "--trainer.accelerator=cpu",
            ],
            run=False,
        )
    assert "model.sampling.agent" in capsys.readouterr().err
