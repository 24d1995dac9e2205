"""Model-graded rewards (``trgrpo.graders``): a reward model from a folder, an LLM judge over HTTP.

The reward model is a tiny ``Qwen2ForSequenceClassification`` with the embedded character tokenizer, saved to
a temporary folder; its rewards are compared with a direct forward pass of the same weights, one text at a
time.  The judge talks to a fake OpenAI-compatible server on a free local port that scores by a rule, fails,
hangs or goes down on request; every request it could wait on is bounded by a short timeout.

    python -m pytest tests/test_graders.py -q
"""

from __future__ import annotations

import json
import pickle
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from helpers import arithmetic_args, run_cli, train_rows
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

import trgrpo.module as module_mod
from trgrpo.graders import JudgeReward, RewardModelReward
from trgrpo.policy.chartokenizer import build_char_tokenizer
from trgrpo.rewards import RewardSpec, SampleFailures, check_rewards, compute_rewards

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["1 + 2 = ", "7 + 8 = ", "What is 4 + 4?", "9 + 9 = "]
COMPLETIONS = ["3", "15 is the sum", "8", " eighteen, I think, or 18"]


def save_reward_model(folder, num_labels: int = 1, seed: int = 0):
    tok = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
        initializer_range=0.5,  # logits far from 0, so a wrong token or mask shows
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    return save_reward_model(tmp_path_factory.mktemp("rm"), num_labels=3)


def direct_scores(folder, texts, label_index, dtype=torch.float32):
    """The model's logit for each text, one text per forward (no padding), with the folder's tokenizer."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits[0, label_index].float().item() for t in texts]


def test_reward_model_equals_a_direct_forward_in_any_batching(rm_folder):
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    expected = direct_scores(rm_folder, texts, label_index=2)
    assert max(expected) - min(expected) > 0.01  # the texts are told apart
    for batch_size in (1, 3, 8):
        reward = RewardModelReward(str(rm_folder), label_index=2, batch_size=batch_size, device="cpu")
        assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)
    scaled = RewardModelReward(str(rm_folder), label_index=2, scale=-2.0, shift=0.5)
    assert scaled(PROMPTS, COMPLETIONS) == pytest.approx([-2.0 * e + 0.5 for e in expected], abs=1e-4)


def test_reward_model_dtype_and_no_gradient(rm_folder):
    reward = RewardModelReward(str(rm_folder), label_index=0, dtype="bfloat16", batch_size=2)
    with torch.enable_grad():
        scores = reward(PROMPTS, COMPLETIONS)
    model, _ = reward.load()
    assert model.dtype == torch.bfloat16 and str(model.device) == "cpu" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert scores == pytest.approx(direct_scores(rm_folder, texts, 0, torch.bfloat16), abs=0.05)
    assert reward.load()[0] is model  # loaded once and kept
    copy = pickle.loads(pickle.dumps(reward))  # a spawned process gets the settings and loads its own model
    assert copy._model is None and copy(PROMPTS[:1], COMPLETIONS[:1]) == pytest.approx(scores[:1])


def test_reward_model_input_rule(rm_folder):
    reward = RewardModelReward(str(rm_folder))
    tok = build_char_tokenizer()
    # the policy saw the row's prompt as is: the reward model reads prompt + completion
    assert reward.texts(["2 + 2 = "], ["4"], raw_prompt=["2 + 2 = "]) == ["2 + 2 = 4"]
    # the policy saw it through a chat template: the reward model's own template, the completion as the reply
    chat = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    expected = tok.apply_chat_template(chat, tokenize=False)
    assert reward.texts(["<|user|>2 + 2?\n<|assistant|>"], ["4"], raw_prompt=["2 + 2?"]) == [expected]
    scores = reward(
        ["<|user|>2 + 2?\n<|assistant|>", "2 + 2 = "], ["4", "4"], raw_prompt=["2 + 2?", "2 + 2 = "]
    )
    assert scores == pytest.approx(direct_scores(rm_folder, [expected, "2 + 2 = 4"], 0), abs=1e-5)
    never = RewardModelReward(str(rm_folder), chat_template=False)
    assert never.texts(["<|user|>2 + 2?\n<|assistant|>"], ["4"], raw_prompt=["2 + 2?"]) == [
        "<|user|>2 + 2?\n<|assistant|>4"
    ]
    always = RewardModelReward(str(rm_folder), chat_template=True)
    assert always.texts(["2 + 2?"], ["4"], raw_prompt=["2 + 2?"]) == [expected]


def test_reward_model_start_up_errors(tmp_path, rm_folder):
    from transformers import Qwen2ForCausalLM

    causal = tmp_path / "causal"
    tok = build_char_tokenizer()
    Qwen2ForCausalLM(
        Qwen2Config(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(causal)
    with pytest.raises(ValueError, match=r"init_args\.path.*Qwen2ForCausalLM.*ForSequenceClassification"):
        RewardModelReward(str(causal))
    with pytest.raises(ValueError, match=r"init_args\.path.*does not exist"):
        RewardModelReward(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"init_args\.label_index"):
        RewardModelReward(str(rm_folder), label_index=3)
    with pytest.raises(ValueError, match=r"init_args\.dtype"):
        RewardModelReward(str(rm_folder), dtype="float8")
    with pytest.raises(ValueError, match=r"init_args\.device"):
        RewardModelReward(str(rm_folder), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"init_args\.device.*CUDA is not available"):
            RewardModelReward(str(rm_folder), device="cuda:0")


# --------------------------------------------------------------------------- the judge


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True  # a hanging reply never holds the test up at shutdown

    def handle_error(self, request, client_address) -> None:
        pass  # the client gave up on a hanging reply: a broken pipe is expected


class FakeJudge:
    """An OpenAI-compatible server on a free port: scores ``len(completion) % 11`` as 'Score: N' (out of 10),
    after ``errors`` HTTP 500 replies; ``hang`` seconds of silence before each reply; ``blank`` replies have
    no score."""

    def __init__(self) -> None:
        self.errors, self.hang, self.blank, self.posts = 0, 0.0, False, 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.posts += 1
                if judge.errors > 0:
                    judge.errors -= 1
                    return self._send(500, {"error": "busy"})
                time.sleep(judge.hang)
                completion = re.search(r"A: (.*)\nR:", body["messages"][-1]["content"], re.DOTALL).group(1)
                text = "no idea" if judge.blank else f"Looks fine.\nScore: {len(completion) % 11}"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    fake = FakeJudge()
    yield fake
    fake.close()


def judge(server, **kwargs) -> JudgeReward:
    options = {
        "template": "Q: {prompt}\nA: {completion}\nR: {answer}",
        "request_timeout": 2.0,
        "backoff": 0.01,
    }
    return JudgeReward(server.url, "judge", **{**options, **kwargs})


def rule(completions):
    return [(len(c) % 11) / 10 for c in completions]


def test_judge_scores_by_the_servers_rule_and_caches(server, tmp_path):
    cache = tmp_path / "judge.jsonl"
    reward = judge(server, cache_file=str(cache), concurrency=3)
    assert reward(PROMPTS, COMPLETIONS, answer=["3", "15", "8", "18"]) == pytest.approx(rule(COMPLETIONS))
    assert server.posts == 4
    assert reward(PROMPTS, COMPLETIONS, answer=["3", "15", "8", "18"]) == pytest.approx(rule(COMPLETIONS))
    assert server.posts == 4  # every request answered from the cache
    resumed = judge(server, cache_file=str(cache))  # a resumed run reads the file
    assert resumed(PROMPTS, COMPLETIONS, answer=["3", "15", "8", "18"]) == pytest.approx(rule(COMPLETIONS))
    assert server.posts == 4 and len(cache.read_text().splitlines()) == 4
    resumed(PROMPTS[:1], COMPLETIONS[:1], answer=["4"])  # another reference answer: another request
    assert server.posts == 5


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("Fine.\nScore: 7", 0.7),
        ("**Score:** 10", 1.0),
        ("score=2.5 of 10", 0.25),
        ("4", 0.4),
        ("Score: 3. Revised score: 6/10", 0.6),
        ("Score: 11", None),
        ("Score: -1", None),
        ("great answer", None),
    ],
)
def test_judge_reads_the_last_score_in_range(reply, score):
    reward = JudgeReward("http://127.0.0.1:9/v1", "judge", check_endpoint=False)
    if score is None:
        with pytest.raises(Exception, match="no score|outside"):
            reward.parse_score(reply)
    else:
        assert reward.parse_score(reply) == pytest.approx(score)


def test_judge_retries_errors(server):
    server.errors = 2
    reward = judge(server, retries=2, concurrency=1)
    assert reward(PROMPTS[:2], COMPLETIONS[:2]) == pytest.approx(rule(COMPLETIONS[:2]))
    assert server.posts == 4 and reward.requests == 4


def test_judge_failures_are_per_sample(server):
    server.errors = 1  # the first sample's only try fails; the second is scored
    reward = judge(server, retries=0, concurrency=1)
    with pytest.raises(SampleFailures) as info:
        reward(PROMPTS[:2], COMPLETIONS[:2])
    assert info.value.failed == [0] and info.value.scores[1] == pytest.approx(rule(COMPLETIONS[1:2])[0])
    server.blank = True  # a reply without a score
    with pytest.raises(SampleFailures, match="no score") as info:
        reward(PROMPTS[2:3], COMPLETIONS[2:3])
    assert info.value.failed == [0]


def test_a_hanging_judge_fails_its_samples_after_the_timeout(server):
    server.hang = 3.0
    reward = judge(server, request_timeout=0.5, retries=1, concurrency=4)
    spec = RewardSpec(fn=reward, failure_score=-1.0, timeout=20)
    start = time.monotonic()
    result = compute_rewards([spec], PROMPTS, COMPLETIONS, {"answer": ["3", "15", "8", "18"]})
    assert time.monotonic() - start < 6.0  # 2 tries of 0.5 s each, four at once
    assert result.errors == 4 and result.total.tolist() == [-1.0] * 4


def test_judge_start_up_errors(server, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ValueError, match=rf"init_args\.base_url.*{re.escape(down)}/models"):
        JudgeReward(down, "judge")
    JudgeReward(down, "judge", check_endpoint=False)  # checked later, per sample
    with pytest.raises(ValueError, match=r"init_args\.model.*'other'.*\['judge'\]"):
        JudgeReward(server.url, "other")
    monkeypatch.delenv("JUDGE_KEY_FOR_TEST", raising=False)
    with pytest.raises(ValueError, match=r"init_args\.api_key_env.*JUDGE_KEY_FOR_TEST"):
        JudgeReward(server.url, "judge", api_key_env="JUDGE_KEY_FOR_TEST")
    with pytest.raises(ValueError, match=r"init_args\.template"):
        JudgeReward(server.url, "judge", template="no placeholder")
    needs_answer = RewardSpec(fn=judge(server))  # the rubric uses {answer}: the task must give it
    with pytest.raises(ValueError, match=r"needs the column 'answer'"):
        check_rewards([needs_answer], ["solution"])
    check_rewards([needs_answer], ["answer"])


# --------------------------------------------------------------------------- through the CLI


def grader(class_path: str, **init_args) -> str:
    return "--model.rewards=" + json.dumps([{"fn": {"class_path": class_path, "init_args": init_args}}])


def test_cli_start_up_errors_come_before_the_policy_loads(tmp_path, no_model):
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ValueError, match=r"init_args\.path.*Qwen2ForCausalLM"):
        run_cli(
            tmp_path / "a", *arithmetic_args(), grader("trgrpo.graders.RewardModelReward", path=str(causal))
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ValueError, match=r"init_args\.base_url.*/models"):
        run_cli(
            tmp_path / "b", *arithmetic_args(), grader("trgrpo.graders.JudgeReward", base_url=down, model="j")
        )


@pytest.fixture
def scored(monkeypatch):
    """(prompts, completions, per-term scores) of every training step's reward call, through the CLI."""
    calls: list[tuple[list[str], list[str], dict]] = []
    real = module_mod.compute_rewards

    def spy(specs, prompts, completions, columns):
        result = real(specs, prompts, completions, columns)
        calls.append((list(prompts), list(completions), {k: v.tolist() for k, v in result.per_term.items()}))
        return result

    monkeypatch.setattr(module_mod, "compute_rewards", spy)
    return calls


def fragment(tmp_path, name: str, **init_args) -> str:
    """The rewards fragment ``configs/rewards/<name>`` with some ``init_args`` replaced, as a file to give."""
    config = yaml.safe_load((ROOT / "configs" / "rewards" / name).read_text())
    config["model"]["rewards"][0]["fn"]["init_args"].update(init_args)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_trains_with_a_reward_model(tmp_path, rm_folder, scored):
    run_cli(
        tmp_path,
        *arithmetic_args(batch_size=2, group_size=4, max_new_tokens=3),
        "--trainer.max_steps=2",
        config=fragment(tmp_path, "reward_model.yaml", path=str(rm_folder), label_index=1, dtype="float32"),
    )
    assert len(scored) == 2
    for prompts, completions, terms in scored:  # the text the policy continued, then its completion
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        assert terms["reward_model"] == pytest.approx(direct_scores(rm_folder, texts, 1), abs=1e-4)
    rows = train_rows(tmp_path)
    assert sorted(rows) == [0, 1] and all(r["train/reward_errors"] == 0 for r in rows.values())


def test_cli_trains_with_a_judge(tmp_path, server, scored):
    run_cli(
        tmp_path,
        *arithmetic_args(batch_size=2, group_size=2, max_new_tokens=3),
        "--trainer.max_steps=2",
        config=fragment(
            tmp_path,
            "llm_judge.yaml",
            base_url=server.url,
            request_timeout=5.0,
            template="Q: {prompt}\nA: {completion}\nR: {answer}",
            cache_file=str(tmp_path / "judge.jsonl"),
        ),
    )
    assert len(scored) == 2 and server.posts >= 1
    assert len((tmp_path / "judge.jsonl").read_text().splitlines()) == server.posts  # one line per reply
    for _, completions, terms in scored:
        assert terms["llm_judge"] == pytest.approx(rule(completions))
    rows = train_rows(tmp_path)
    assert sorted(rows) == [0, 1] and all(r["train/reward_errors"] == 0 for r in rows.values())
