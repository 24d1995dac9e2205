"""How tool calls look in the model's text, and how their results are put back into its context.

``TagFormat`` (Search-R1-style)::

    <think>...</think><search>capital of France</search>
    <information>Doc 1: Paris is the capital ...</information>           (inserted, never trained)
    <think>...</think><answer>Paris</answer>                             (ends the completion)

``ChatFormat`` (instruct models): the tools are described to the model by the tokenizer's chat template
(``apply_chat_template(messages, tools=schemas)``), a call is the JSON object of the model's tool-call block
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the Hermes / Qwen2.5 convention; the tags are
settable), and the result comes back as a ``tool`` message: the text inserted is what the chat template
renders between the end of the assistant's turn and the start of the next one, found by rendering a
two-turn conversation with and without the tool message.

A format gives the loop its stop strings, parses the text of a finished turn into a ``ToolCall`` (or None:
the turn was the final answer) and the text around a tool result.  No torch, no Lightning.
"""

from __future__ import annotations

import json
import re

from trgrpo.agent.tools import ToolCall

_SENTINEL = "TRGRPOSENTINEL"


class TagFormat:
    """Search-R1 tags: ``<name>argument</name>`` calls the tool ``name`` with its first required argument;
    ``</answer>`` ends the completion; results come back as ``<information>...</information>``."""

    result_tag = "information"

    def __init__(self, schemas: list[dict], answer_tag: str = "answer") -> None:
        self.answer_tag = answer_tag
        self.argument = {}
        for s in schemas:
            params = s["function"]["parameters"]
            names = params.get("required") or list(params.get("properties", {}))
            if not names:
                raise ValueError(
                    f"model.sampling.agent: tag format needs tool {s['function']['name']!r} to "
                    "take one text argument"
                )
            self.argument[s["function"]["name"]] = names[0]
        self.stop = [f"</{n}>" for n in self.argument] + [f"</{answer_tag}>"]

    def render_prompt(self, tokenizer, prompt: str) -> str:
        return prompt  # the task's prompt template describes the tags

    def parse(self, text: str) -> ToolCall | None:
        """The call that ends ``text`` (one turn), or None when the turn ended with the final answer."""
        end = text.rstrip()
        if end.endswith(f"</{self.answer_tag}>"):
            return None
        for name, arg in self.argument.items():
            if end.endswith(f"</{name}>"):
                start = end.rfind(f"<{name}>")
                if start < 0:
                    return ToolCall(name, {}, f"</{name}> without an opening <{name}>")
                return ToolCall(name, {arg: end[start + len(name) + 2 : -(len(name) + 3)].strip()})
        return ToolCall("", {}, "no tool call found")

    def wrap(self, tokenizer) -> tuple[str, str]:
        return f"\n\n<{self.result_tag}>", f"</{self.result_tag}>\n\n"


class ChatFormat:
    """The chat template's tool calls: tools in the rendered prompt, JSON calls, ``tool`` result messages."""

    def __init__(
        self,
        schemas: list[dict],
        system_prompt: str | None = None,
        call_open: str = "<tool_call>",
        call_close: str = "</tool_call>",
    ) -> None:
        self.schemas, self.system_prompt = schemas, system_prompt
        self.call_open, self.call_close = call_open, call_close
        self.stop = [call_close]
        self._wrap: tuple[str, str] | None = None

    def render_prompt(self, tokenizer, prompt: str) -> str:
        """The user prompt rendered with the tool schemas (``data.chat_template`` stays off)."""
        if tokenizer.chat_template is None:
            raise ValueError("model.sampling.agent.format is 'chat' but the tokenizer has no chat template")
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(
            messages, tools=self.schemas, tokenize=False, add_generation_prompt=True
        )

    def parse(self, text: str) -> ToolCall | None:
        end = text.rstrip()
        if not end.endswith(self.call_close):
            return None
        start = end.rfind(self.call_open)
        if start < 0:
            return ToolCall("", {}, f"{self.call_close} without an opening {self.call_open}")
        body = end[start + len(self.call_open) : -len(self.call_close)].strip()
        try:
            call = json.loads(body)
            args = call.get("arguments", {})
            args = json.loads(args) if isinstance(args, str) else args
            if not isinstance(call.get("name"), str) or not isinstance(args, dict):
                raise ValueError('expected {"name": str, "arguments": object}')
        except (ValueError, AttributeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            return ToolCall("", {}, f"malformed tool call {body[:200]!r}: {exc}")
        return ToolCall(call["name"], args)

    def wrap(self, tokenizer) -> tuple[str, str]:
        """(text before, text after) a tool result: the end of the assistant turn, the tool message around the
        result, and the start of the next assistant turn, as the chat template renders them."""
        if self._wrap is None:
            base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}]
            prefix = tokenizer.apply_chat_template(base, tools=self.schemas, tokenize=False)
            full = tokenizer.apply_chat_template(
                base + [{"role": "tool", "content": _SENTINEL + "R"}],
                tools=self.schemas,
                tokenize=False,
                add_generation_prompt=True,
            )
            if not full.startswith(prefix) or full.count(_SENTINEL + "R") != 1:
                raise ValueError(
                    "model.sampling.agent.format 'chat': the chat template does not render a tool "
                    "message after an assistant turn"
                )
            end_of_turn = prefix[prefix.index(_SENTINEL) + len(_SENTINEL) :]
            before, after = full[len(prefix) :].split(_SENTINEL + "R")
            self._wrap = (end_of_turn + before, after)
        return self._wrap


def make_format(agent, schemas: list[dict]) -> TagFormat | ChatFormat:
    """The format ``model.sampling.agent.format`` names."""
    if agent.format == "chat":
        return ChatFormat(schemas, agent.system_prompt)
    return TagFormat(schemas, agent.answer_tag)


def last_tag(text: str, tag: str = "answer") -> str | None:
    """The content of the last ``<tag>...</tag>`` of ``text``, or None."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1] if found else None


__all__ = ["ChatFormat", "TagFormat", "last_tag", "make_format"]
