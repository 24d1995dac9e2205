"""Multi-turn rollouts: generate until a tool call or EOS, run the tool, append its output, continue.

One episode per completion; the G completions of a prompt start from the same task instance (their tool
environments are reset on the same row with the same seed).  Each turn, every unfinished episode's whole
token context is handed to the engine's single-turn primitive ``continue_contexts`` (stop at EOS, a call's
closing stop string, or the turn's token budget), then::

    EOS / final answer          -> done
    a tool call (stop string)   -> run it (all episodes' calls at once, per-call timeout), append the result
                                   as context, next turn; a call that cannot be parsed or fails returns an
                                   error text (counted); one call more than ``max_turns`` ends the episode
    budget spent                -> done, marked truncated

Budgets are per completion and counted separately: ``model.sampling.max_new_tokens`` for the model's own
tokens over all turns (``agent.max_turn_tokens`` per turn), ``agent.max_tool_tokens`` for tool output.  A
result that would overflow is cut and ends with ``agent.truncation_marker`` (tokens of the wrapper and the
marker included in the budget); when not even those fit, the episode ends, marked truncated.  A result is
cut by characters (``MAX_CHARS_PER_TOKEN`` per token of room) before it is tokenized, so that what a tool
returns costs the loop no more than its budget: a 10 MB result would otherwise be tokenized whole, for
minutes during which the step cannot be stopped.

The ``Rollout`` has the single-turn layout (prompt left-padded, completion right-padded): the completion is
model and tool tokens in order; ``completion_mask`` and ``attention_mask`` are 1 on both (tool output is
context the later turns attend to), ``trainable_mask`` is 1 on the model's tokens only, so tool output is
never trained, weighted or counted.

Prefix re-use: each later turn re-encodes the whole context (one batched prefill per turn).  The G
contexts of a prompt diverge after the first token, a ragged per-row KV cache kept across turns would need
engine internals for little gain on CPU-sized contexts (the prefill is one batched forward per turn; the
decode loop dominates), and vLLM's prefix caching does the re-use by itself.  The first turn, whose
contexts are G copies of each prompt, shares one prompt prefill per group in the ``fast`` engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from trgrpo.agent.formats import make_format
from trgrpo.agent.tools import ToolBox, run_calls
from trgrpo.rollout.base import EpisodeStats, Rollout, RolloutEngine, SamplingConfig, encode_prompts

MAX_CHARS_PER_TOKEN = 64
"""Characters of a tool result read per token of room left; the rest is cut before tokenizing (tokens of
common vocabularies rarely span more than a few dozen characters, so in practice only a result that
overflows its budget anyway loses text)."""


@dataclass
class Episode:
    """One completion being built."""

    box: ToolBox
    pieces: list[tuple[list[int], bool]] = field(default_factory=list)  # (ids, trainable)
    model_tokens: int = 0
    tool_tokens: int = 0
    calls: int = 0
    errors: int = 0
    turns: int = 0
    done: bool = False
    truncated: bool = False

    def ids(self) -> list[int]:
        return [t for ids, _ in self.pieces for t in ids]

    def end(self, truncated: bool) -> None:
        self.done, self.truncated = True, truncated


def turn_budgets(episodes: list[Episode], active: list[int], sampling) -> list[int]:
    """New tokens each active episode's next turn may write: what is left of the completion budget, at most
    ``agent.max_turn_tokens``."""
    turn = sampling.agent.max_turn_tokens or sampling.max_new_tokens
    return [min(sampling.max_new_tokens - episodes[i].model_tokens, turn) for i in active]


def fit_result(tokenizer, before: str, text: str, after: str, marker: str, room: int) -> list[int] | None:
    """Token ids of ``before + text + after``, ``text`` cut (with ``marker``) to fit ``room``;
    None if nothing fits.  At most ``MAX_CHARS_PER_TOKEN * room`` characters of ``text`` are tokenized."""
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    limit = MAX_CHARS_PER_TOKEN * max(room, 0)
    head, body, tail = enc(before), enc(text[:limit]), enc(after)
    if len(text) <= limit and len(head) + len(body) + len(tail) <= room:
        return head + body + tail
    mark = enc(marker)
    keep = room - len(head) - len(tail) - len(mark)
    return head + body[:keep] + mark + tail if keep >= 0 else None


@torch.no_grad()
def run_episodes(
    engine: RolloutEngine,
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    group_size: int,
    greedy: bool,
    rows: list[dict] | None = None,
) -> Rollout:
    """``group_size`` multi-turn completions per prompt (see the module docstring) as one ``Rollout``."""
    agent = sampling.agent
    if getattr(agent.environment, "drives_turns", False):  # every turn is an action (trgrpo.agent.openenv)
        env = agent.environment
        return env.run_episodes(engine, model, tokenizer, prompts, sampling, group_size, greedy, rows)
    toolbox = ToolBox(agent)
    fmt = make_format(agent, toolbox.schemas())
    before, after = fmt.wrap(tokenizer)
    rendered = [fmt.render_prompt(tokenizer, p) for p in prompts]
    enc = encode_prompts(model, tokenizer, rendered)
    prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(enc.input_ids, enc.attention_mask, strict=True)]
    rows = rows if rows is not None else [{"prompt": p} for p in prompts]
    seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()  # one per prompt: same instance for its G
    episodes = [
        Episode(toolbox.episode(rows[i // group_size], seeds[i // group_size]))
        for i in range(len(prompts) * group_size)
    ]
    while active := [i for i, e in enumerate(episodes) if not e.done]:
        budgets = turn_budgets(episodes, active, sampling)
        contexts = [prompt_ids[i // group_size] + episodes[i].ids() for i in active]
        outs = engine.continue_contexts(model, tokenizer, contexts, sampling, budgets, fmt.stop, greedy)
        calls = []
        for i, out in zip(active, outs, strict=True):
            e = episodes[i]
            e.pieces.append((out.ids, True))
            e.model_tokens += len(out.ids)
            e.turns += 1
            call = fmt.parse(tokenizer.decode(out.ids)) if out.finish == "stop" else None
            if out.finish == "eos" or (out.finish == "stop" and call is None):
                e.end(truncated=False)
            elif (
                out.finish == "length"
                or e.calls >= agent.max_turns
                or e.model_tokens >= sampling.max_new_tokens
            ):
                e.end(truncated=True)  # budget spent, or one call more than max_turns
            else:
                calls.append((i, call))
        results = run_calls([(episodes[i].box, call) for i, call in calls], agent.tool_timeout)
        for (i, _), result in zip(calls, results, strict=True):
            e = episodes[i]
            e.calls += 1
            e.errors += int(result.error)
            ids = fit_result(
                tokenizer,
                before,
                result.text,
                after,
                agent.truncation_marker,
                agent.max_tool_tokens - e.tool_tokens,
            )
            if ids is None:
                e.end(truncated=True)
                continue
            e.pieces.append((ids, False))
            e.tool_tokens += len(ids)
    return assemble_episodes(tokenizer, enc.input_ids, enc.attention_mask, episodes, group_size)


def assemble_episodes(
    tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, episodes: list[Episode], group_size: int
) -> Rollout:
    """The ``Rollout`` of finished episodes: [U, P] prompts, completions of model and tool tokens."""
    n, width = len(episodes), max(1, max(len(e.ids()) for e in episodes))
    completion = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    real = torch.zeros(n, width)
    trainable = torch.zeros(n, width)
    for i, e in enumerate(episodes):
        at = 0
        for ids, train in e.pieces:
            completion[i, at : at + len(ids)] = torch.tensor(ids, dtype=torch.long)
            real[i, at : at + len(ids)] = 1.0
            trainable[i, at : at + len(ids)] = float(train)
            at += len(ids)
    device = prompt_ids.device
    completion, real, trainable = completion.to(device), real.to(device), trainable.to(device)
    stats = EpisodeStats(
        *(torch.tensor([getattr(e, k) for e in episodes]) for k in ("calls", "errors", "turns"))
    )
    return Rollout(
        input_ids=torch.cat([prompt_ids.repeat_interleave(group_size, 0), completion], dim=1),
        attention_mask=torch.cat([prompt_mask.repeat_interleave(group_size, 0), real.long()], dim=1),
        completion_mask=real,
        truncated=torch.tensor([e.truncated for e in episodes], device=device),
        prompt_len=prompt_ids.shape[1],
        completions=tokenizer.batch_decode(completion, skip_special_tokens=True),
        trainable_mask=trainable,
        episodes=stats,
    )


__all__ = ["Episode", "EpisodeStats", "assemble_episodes", "fit_result", "run_episodes"]
