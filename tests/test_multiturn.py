"""Multi-turn rollouts: the loop (budgets, turns, errors, same task instance), the engines' stop strings, and
tool output masked out of everything that trains or is counted (on gradients).

The loop is driven by ``ScriptedEngine``, an engine whose ``continue_contexts`` answers from a script: it is
also the proof that the loop needs nothing of an engine but that primitive.

    python -m pytest tests/test_multiturn.py -q
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch

import trgrpo.scoring as scoring_mod
from trgrpo.agent.episodes import MAX_CHARS_PER_TOKEN, fit_result, run_episodes
from trgrpo.agent.tools import AgentConfig, ToolEnvironment
from trgrpo.config import LossConfig
from trgrpo.losses import GRPOLoss
from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer
from trgrpo.rewards import RewardResult
from trgrpo.rollout.base import SamplingConfig, StopStrings
from trgrpo.rollout.engines import ENGINES, generate_rollout
from trgrpo.scoring import TokenScorer
from trgrpo.stats import StepStats, StepTimings, UpdateStats
from trgrpo.update import UpdateBatch
from trgrpo.weighting import AdvantageReweighting, HighEntropyTokens, Lopti, TokenRegulatedWeighting

TOOL_TEXT = {"value": "def"}


def lookup(query: str) -> str:
    """Look a word up.

    Args:
        query: the word.
    """
    return f"{TOOL_TEXT['value']}:{query}"


def boom(query: str) -> str:
    """Always fails.

    Args:
        query: ignored.
    """
    raise RuntimeError("kaput")


def slow(query: str) -> str:
    """Takes too long.

    Args:
        query: ignored.
    """
    time.sleep(1.0)
    return "late"


def long_text(query: str) -> str:
    """A long result.

    Args:
        query: ignored.
    """
    return "x" * 200


def huge(query: str) -> str:
    """Two megabytes of output.

    Args:
        query: ignored.
    """
    return "y" * 2_000_000


class SecretEnv(ToolEnvironment):
    """A stateful environment: a secret drawn at reset from the seed and the row."""

    def tools(self):
        return [
            {
                "type": "function",
                "function": {
                    "name": "peek",
                    "description": "the secret",
                    "parameters": {
                        "type": "object",
                        "properties": {"q": {"type": "string"}},
                        "required": ["q"],
                    },
                },
            }
        ]

    def reset(self, row, seed):
        self.secret = f"{row['prompt']}{random.Random(seed).randint(0, 10**9)}"

    def step(self, call):
        return self.secret


class ScriptedEngine:
    """``continue_contexts`` from a script: turn k (k = tool results in the context so far) says
    ``script[k]``."""

    def __init__(self, script):
        self.script = script

    def continue_contexts(self, model, tokenizer, contexts, sampling, max_new_tokens, stop, greedy):
        checker = StopStrings(tokenizer, stop)
        out = []
        for ctx, budget in zip(contexts, max_new_tokens, strict=True):
            turn = tokenizer.decode(ctx).count("</information>") + tokenizer.decode(ctx).count("<|tool|>")
            text = self.script[min(turn, len(self.script) - 1)]
            out.append(
                checker.cut(
                    tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id, budget
                )
            )
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PolicyConfig())


@pytest.fixture(scope="module")
def model(tokenizer):
    return load_model(
        PolicyConfig(
            tiny=TinyModelConfig(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
            )
        ),
        tokenizer,
    ).eval()


def _run(model, tokenizer, script, prompts=("Q1 ",), g=2, max_new_tokens=64, **agent):
    sampling = SamplingConfig(group_size=max(g, 2), max_new_tokens=max_new_tokens, agent=AgentConfig(**agent))
    return run_episodes(ScriptedEngine(script), model, tokenizer, list(prompts), sampling, g, False)


def _tool_spans(tokenizer, rollout, row):
    """Decoded text of the context-only (tool) tokens of a row."""
    ids = rollout.input_ids[row, rollout.prompt_len :]
    tool = (rollout.completion_mask[row] == 1) & (rollout.trainable_mask[row] == 0)
    return tokenizer.decode(ids[tool])


def test_a_call_its_result_and_the_answer_laid_out_as_one_completion(model, tokenizer):
    r = _run(model, tokenizer, ["<lookup>cat</lookup>", "<answer>x</answer>"], tools=[lookup])
    assert (
        r.completions[0] == "<lookup>cat</lookup>\n\n<information>def:cat</information>\n\n<answer>x</answer>"
    )
    assert _tool_spans(tokenizer, r, 0) == "\n\n<information>def:cat</information>\n\n"
    assert torch.equal(r.attention_mask[:, r.prompt_len :].float(), r.completion_mask)
    assert bool((r.trainable_mask <= r.completion_mask).all())
    assert r.episodes.tool_calls.tolist() == [1, 1] and r.episodes.turns.tolist() == [2, 2]
    assert r.episodes.tool_errors.tolist() == [0, 0] and not r.truncated.any()


def test_failing_tools_return_an_error_text_and_are_counted(model, tokenizer):
    script = ["<boom>a</boom>", "<slow>b</slow>", "</lookup>", "<nope>c</nope><answer>y</answer>"]
    t0 = time.perf_counter()
    r = _run(model, tokenizer, script, g=1, tools=[lookup, boom, slow], max_turns=4, tool_timeout=0.2)
    assert time.perf_counter() - t0 < 0.9  # the slow tool is abandoned after its timeout
    text = _tool_spans(tokenizer, r, 0)
    assert (
        "Error: RuntimeError: kaput" in text
        and "timed out after 0.2s" in text
        and "without an opening" in text
    )
    assert r.episodes.tool_errors.tolist() == [3] and r.episodes.tool_calls.tolist() == [3]
    assert r.completions[0].endswith("<answer>y</answer>") and not r.truncated.any()


def test_a_tool_result_over_the_budget_is_cut_with_a_marker_then_the_episode_ends(model, tokenizer):
    r = _run(
        model,
        tokenizer,
        ["<long_text>a</long_text>"] * 2 + ["<answer>z</answer>"],
        g=1,
        tools=[long_text],
        max_tool_tokens=60,
        max_turns=5,
    )
    tool = (r.completion_mask[0] == 1) & (r.trainable_mask[0] == 0)
    assert int(tool.sum()) == 60  # exactly the budget: wrapper and marker included
    assert _tool_spans(tokenizer, r, 0).endswith("x [truncated]</information>\n\n")
    # the second call finds no room left, not even for the wrapper: the episode ends there, truncated
    assert r.truncated.tolist() == [True] and r.episodes.tool_calls.tolist() == [2]


class RecordingTokenizer:
    """A tokenizer that notes the length of every text it is asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


def test_a_huge_tool_result_is_cut_by_characters_before_it_is_tokenized(tokenizer):
    recorder = RecordingTokenizer(tokenizer)
    start = time.perf_counter()
    ids = fit_result(recorder, "<i>", "z" * 10_000_000, "</i>", " [truncated]", room=100)
    assert time.perf_counter() - start < 2  # the whole 10 MB would take this tokenizer over a minute
    assert max(recorder.lengths) == MAX_CHARS_PER_TOKEN * 100  # never the 10 MB
    assert len(ids) == 100 and tokenizer.decode(ids).endswith("zzz [truncated]</i>")
    # a result within its budget is untouched, and one just over it is cut as before
    assert tokenizer.decode(fit_result(tokenizer, "<i>", "abc", "</i>", " [t]", room=100)) == "<i>abc</i>"
    cut = fit_result(tokenizer, "<i>", "z" * 200, "</i>", " [t]", room=20)
    assert tokenizer.decode(cut) == "<i>" + "z" * 9 + " [t]</i>"  # 3 + 9 + 4 + 4 = 20 tokens


class Stopped(Exception):
    """Raised by the test's SIGTERM handler, with the time it ran."""


def test_sigterm_is_acted_on_while_a_tool_returns_megabytes(model, tokenizer):
    """The trainer's SIGTERM handler raises in the main thread, which it can only do between Python
    instructions: a 2 MB result tokenized whole would hold it off for seconds."""
    sent: list[float] = []

    def send() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(signum, frame):
        raise Stopped(time.monotonic())

    previous = signal.signal(signal.SIGTERM, stop)
    timer = threading.Timer(0.5, send)
    try:
        timer.start()
        with pytest.raises(Stopped) as stopped:
            r = _run(model, tokenizer, ["<huge>q</huge>", "<answer>x</answer>"], g=2, tools=[huge])
            assert int(((r.completion_mask == 1) & (r.trainable_mask == 0)).sum(1).max()) <= 512
            time.sleep(10)  # the rollout ended before the signal: it lands here
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGTERM, previous)
    assert sent and stopped.value.args[0] - sent[0] < 2.0


def test_calls_past_max_turns_and_a_spent_budget_end_the_episode_truncated(model, tokenizer):
    r = _run(model, tokenizer, ["<lookup>a</lookup>"], g=1, tools=[lookup], max_turns=2)
    assert r.episodes.tool_calls.tolist() == [2] and r.episodes.turns.tolist() == [3] and r.truncated.all()
    r = _run(model, tokenizer, ["a" * 100], g=1, tools=[lookup], max_new_tokens=30)
    assert int(r.trainable_mask.sum()) == 30 and r.truncated.all() and r.episodes.tool_calls.tolist() == [0]
    r = _run(
        model,
        tokenizer,
        ["<lookup>a</lookup>", "b" * 100],
        g=1,
        tools=[lookup],
        max_new_tokens=40,
        max_turn_tokens=25,
    )
    assert int(r.trainable_mask.sum()) == 18 + 22 and r.truncated.all()  # 40 model tokens over two turns


def test_the_g_completions_of_a_prompt_see_the_same_task_instance(model, tokenizer):
    r = _run(
        model,
        tokenizer,
        ["<peek>q</peek>", "<answer>a</answer>"],
        prompts=("P1 ", "P2 "),
        g=3,
        environment=SecretEnv(),
    )
    seen = [_tool_spans(tokenizer, r, i) for i in range(6)]
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5] and seen[0] != seen[3]


@pytest.mark.parametrize("engine", sorted(set(ENGINES) - {"vllm"}))  # vllm: tests/test_vllm_engine.py
def test_engines_continue_contexts_to_a_stop_string(model, tokenizer, engine):
    sampling = SamplingConfig(group_size=2, max_new_tokens=12)
    ctx = [tokenizer("12+34=", add_special_tokens=False).input_ids] * 2 + [
        tokenizer("7+", add_special_tokens=False).input_ids
    ]
    free = ENGINES[engine]().continue_contexts(model, tokenizer, ctx, sampling, [12, 12, 5], [], True)
    assert [o.finish for o in free] == ["length"] * 3 and [len(o.ids) for o in free] == [12, 12, 5]
    stop = tokenizer.decode(free[0].ids[3:5])  # a 2-token string the greedy model produces
    cut = ENGINES[engine]().continue_contexts(model, tokenizer, ctx, sampling, [12, 12, 5], [stop], True)
    first = tokenizer.decode(free[0].ids).find(stop) + len(stop)
    assert cut[0].finish == "stop" and tokenizer.decode(cut[0].ids) == tokenizer.decode(free[0].ids)[:first]
    assert cut[0] == cut[1]  # greedy: the same context gives the same continuation
    other = ENGINES["hf" if engine == "fast" else "fast"]().continue_contexts(
        model, tokenizer, ctx, sampling, [12, 12, 5], [stop], True
    )
    assert other == cut  # both engines: the same tokens


def test_generate_rollout_runs_the_loop_with_a_real_engine(model, tokenizer):
    torch.manual_seed(0)
    sampling = SamplingConfig(group_size=2, max_new_tokens=8, agent=AgentConfig(tools=[lookup]))
    r = generate_rollout(model, tokenizer, ["a", "bb"], sampling)
    assert r.input_ids.shape[0] == 4 and r.episodes is not None and r.trainable_mask.sum(1).le(8).all()


def test_generate_rollout_hands_the_runs_engine_to_the_loop(model, tokenizer):
    sampling = SamplingConfig(group_size=2, max_new_tokens=64, agent=AgentConfig(tools=[lookup]))
    engine = ScriptedEngine(["<lookup>a</lookup>", "<answer>x</answer>"])
    r = generate_rollout(model, tokenizer, ["Q1 "], sampling, engine=engine)
    assert r.episodes.tool_calls.tolist() == [1, 1] and r.episodes.turns.tolist() == [2, 2]
    assert all(c.endswith("<answer>x</answer>") for c in r.completions)


# ---------------------------------------------------------------- tool tokens never train


def _two_rollouts(model, tokenizer):
    """The same episodes whose tool result differs in text only (same length)."""
    out = []
    for value in ("abc", "xyz"):
        TOOL_TEXT["value"] = value
        out.append(
            _run(
                model,
                tokenizer,
                ["<lookup>cat</lookup>", "<answer>12</answer>"],
                prompts=("Q1 ", "Q22 "),
                g=2,
                tools=[lookup],
            )
        )
    TOOL_TEXT["value"] = "def"
    return out


def _loss_and_logits(model, rollout, monkeypatch, perturb_tool_logits=False):
    """GRPO loss through the real scorer and loss, with the [N, T, V] completion logits kept for their
    gradient."""
    kept = {}
    real = scoring_mod.completion_logits

    def hooked(*args, **kwargs):
        logits = real(*args, **kwargs)
        if perturb_tool_logits:  # any change of the logits at tool positions
            tool = ((rollout.completion_mask == 1) & (rollout.trainable_mask == 0)).unsqueeze(-1)
            logits = logits + tool * torch.randn_like(logits) * 5
        logits.retain_grad()
        kept["logits"] = logits
        return logits

    monkeypatch.setattr(scoring_mod, "completion_logits", hooked)
    model.zero_grad()
    scores = TokenScorer().score(model, rollout, torch.arange(4))
    mask, adv = rollout.trainable_mask, torch.tensor([1.0, -1.0, 0.5, -0.5])
    logp = scores.logp
    ref = logp.detach() - 0.3
    batch = UpdateBatch(torch.arange(4), adv, mask, mask, logp.detach() - 0.1, ref)
    loss = GRPOLoss(LossConfig(beta=0.1))(
        batch, scores, torch.ones_like(mask) * mask, num_tokens=mask.sum().item(), num_seqs=4
    )
    loss.loss.backward()
    return loss, kept["logits"], logp.detach()


def test_tool_tokens_get_exactly_zero_gradient_and_change_only_the_context(model, tokenizer, monkeypatch):
    model.train()
    a, b = _two_rollouts(model, tokenizer)
    model.eval()
    tool = (a.completion_mask == 1) & (a.trainable_mask == 0)  # [N, T]
    assert tool.any() and torch.equal(a.trainable_mask, b.trainable_mask)
    assert not torch.equal(a.input_ids, b.input_ids)  # the tool text differs ...
    assert torch.equal(
        a.input_ids[:, : a.prompt_len + 1], b.input_ids[:, : b.prompt_len + 1]
    )  # ... nothing before it
    loss_a, logits_a, logp_a = _loss_and_logits(model, a, monkeypatch)
    assert torch.equal(logits_a.grad[tool], torch.zeros_like(logits_a.grad[tool]))  # exactly zero
    assert logits_a.grad[a.trainable_mask.bool()].abs().sum() > 0
    loss_p, _, _ = _loss_and_logits(model, a, monkeypatch, perturb_tool_logits=True)
    assert torch.equal(loss_a.loss, loss_p.loss) and torch.equal(
        loss_a.kl, loss_p.kl
    )  # tool logits: no effect
    loss_b, _, logp_b = _loss_and_logits(model, b, monkeypatch)
    positions = torch.arange(tool.shape[1])
    last_tool = torch.where(tool, positions, -1).max(1, keepdim=True).values  # [N, 1]
    after = (positions > last_tool) & a.trainable_mask.bool()  # the answer turn, after the tool output
    assert after.any()
    assert not torch.allclose(logp_a[after], logp_b[after])  # the tool text is context for the later turn


def test_weightings_entropy_quantile_kl_and_length_metric_exclude_tool_tokens(model, tokenizer):
    (r, _) = _two_rollouts(model, tokenizer)
    mask, tool = r.trainable_mask, (r.completion_mask == 1) & (r.trainable_mask == 0)
    logp = torch.full_like(mask, -0.01)  # p ~ 0.99: the largest TR-GRPO / AR weights
    for weighting in (TokenRegulatedWeighting(), AdvantageReweighting(), Lopti(ar_alpha=0.3)):
        w = weighting.weights(logp, logp, torch.ones(4), mask)
        assert torch.equal(w[tool], torch.zeros_like(w[tool])) and (w[mask.bool()] > 0).all()
    low, high = Lopti().passes(torch.where(tool, -5.0, logp), mask, None)
    assert not low[tool].any() and not high[tool].any() and torch.equal(low + high, mask)
    entropy = torch.rand_like(mask)
    spiked = torch.where(tool, 100.0, entropy)  # tool positions would own the top quantile if counted
    (kept,) = HighEntropyTokens(q=0.5).passes(logp, mask, spiked)
    assert torch.equal(kept, HighEntropyTokens(q=0.5).passes(logp, mask, entropy)[0]) and not kept[tool].any()
    stats = StepStats.collect(
        RewardResult(torch.zeros(4), {}, 0),
        r,
        UpdateStats(),
        StepTimings(0, 0, 0, 0),
        group_size=2,
        lr=1.0,
        bounded_weights=False,
        kl=False,
    )
    assert (
        stats.completion_length
        == r.trainable_mask.sum(1).mean().item()
        < r.completion_mask.sum(1).mean().item()
    )
    assert (stats.tool_calls, stats.tool_errors, stats.turns, stats.no_tool_ratio) == (1.0, 0.0, 2.0, 0.0)


def test_agent_settings_are_checked_at_start_up():
    with pytest.raises(ValueError, match="max_turns must be >= 0"):
        AgentConfig(tools=[lookup], max_turns=-1)
    with pytest.raises(ValueError, match="needs tools"):
        AgentConfig()

    def undocumented(x):
        return x

    with pytest.raises(ValueError, match=r"model.sampling.agent.tools\[0\].*type hints and a docstring"):
        AgentConfig(tools=[undocumented])


def test_held_out_evaluation_reports_tool_calls_per_answer_and_the_tasks_scores(
    model, tokenizer, monkeypatch
):
    import trgrpo.evaluation as evaluation

    scripts = {
        "one": ["<lookup>a</lookup>", "<answer>x</answer>"],
        "two": ["<lookup>a</lookup>", "<lookup>b</lookup>", "<answer>y</answer>"],
    }

    def scripted(model, tokenizer, prompts, sampling, greedy=False, rows=None, **_):
        return run_episodes(
            ScriptedEngine(scripts[prompts[0]]), model, tokenizer, prompts, sampling, 1, greedy, rows
        )

    class Task:
        def verify_batch(self, completions, rows):
            return [float("<answer>x" in c) for c in completions]

        def eval_scores(self, completions, rows):
            return {"f1": [0.5] * len(completions)}

    monkeypatch.setattr(evaluation, "generate_rollout", scripted)
    sampling = SamplingConfig(group_size=2, max_new_tokens=64, agent=AgentConfig(tools=[lookup], max_turns=2))
    evaluator = evaluation.HeldoutEvaluator(evaluation.EvalConfig(table_rows=0), sampling, [])
    evaluator.connect(Task())
    assert evaluator.tool_calls is None
    batches = [{"prompt": ["one", "one"], "level": [1, 1]}, {"prompt": ["two"], "level": [2]}]
    for batch in batches:
        evaluator.add_batch(model, tokenizer, batch, keep_table=False)
    metrics = evaluator.finish()
    assert metrics["val/accuracy"] == pytest.approx(2 / 3) and metrics["val/accuracy/level_2"] == 0.0
    assert metrics["val/tool_calls"] == pytest.approx(4 / 3)  # (1 + 1 + 2) calls over 3 answers
    assert (metrics["val/tool_calls/level_1"], metrics["val/tool_calls/level_2"]) == (1.0, 2.0)
    assert metrics["val/f1"] == metrics["val/f1/level_1"] == metrics["val/f1/level_2"] == 0.5
    acc, count = evaluator.accuracy(model, tokenizer, batches)  # the before / after line
    assert (acc, count) == (pytest.approx(2 / 3), 3) and evaluator.tool_calls == pytest.approx(4 / 3)


def test_fast_attention_of_one_group_of_several_rows():
    """One prompt's G rows (U = 1, as a multi-turn turn with a single shared context gives): the fast path's
    attention once failed to lay out its result; it equals attention over the concatenated keys."""
    from trgrpo.fastpath.sampler import _attend

    torch.manual_seed(0)
    n, nkv, hd, p, t = 2, 4, 8, 5, 3
    q, pk, pv = torch.randn(n, nkv, hd), torch.randn(1, nkv, p, hd), torch.randn(1, nkv, p, hd)
    k, v = torch.randn(n, nkv, t, hd), torch.randn(n, nkv, t, hd)
    out = _attend(q, pk, pv, None, k, v, 0.5)
    keys, values = torch.cat([pk.expand(n, -1, -1, -1), k], 2), torch.cat([pv.expand(n, -1, -1, -1), v], 2)
    probs = torch.softmax((q.unsqueeze(2) * 0.5) @ keys.transpose(-1, -2), dim=-1)
    assert torch.allclose(out, (probs @ values).reshape(n, nkv * hd), atol=1e-5)
