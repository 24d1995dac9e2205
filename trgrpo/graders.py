"""Model-graded rewards: a reward model from a local folder, and an LLM judge over an OpenAI-compatible API.

Both are callable classes: ``model.rewards[].fn`` takes a ``class_path`` / ``init_args`` pair, and the CLI
builds the instance with the config's other objects, so ``__init__`` checks the settings before the policy
loads (a bad setting stops the run naming ``model.rewards[].fn.init_args.<key>``)::

    model:
      rewards:
        - fn: {class_path: trgrpo.graders.RewardModelReward, init_args: {path: /models/rm, dtype: bfloat16}}
        - fn: {class_path: trgrpo.graders.JudgeReward, init_args: {base_url: "http://gpu2:8000/v1", model: j}}
          timeout: 600

``RewardModelReward`` scores ``prompt + completion`` with an ``AutoModelForSequenceClassification`` loaded
once, at its first call, on the trainer's device.  ``JudgeReward`` asks a chat completions endpoint to grade
each completion against a rubric and reads a score out of the reply; a sample whose request keeps failing,
or whose reply holds no score, fails alone (``trgrpo.rewards.SampleFailures``: it scores the spec's
``failure_score`` and counts in ``train/reward_errors``), never the run.  Only the standard library talks to
the endpoint.  Fragments with every setting explained: ``configs/rewards/``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

from trgrpo.rewards import SampleFailures

log = logging.getLogger(__name__)

KEY = "model.rewards[].fn.init_args"
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")


def check_device(device: str) -> None:
    """A device name torch understands, on hardware this machine has."""
    import torch

    try:
        where = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{KEY}.device: {device!r} is not a device name ({exc})") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{KEY}.device: {device!r}, but CUDA is not available on this machine")


def _read_config(path: Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{KEY}.path: {str(path)!r} has no config.json; a reward model folder needs one")
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{KEY}.path: {config} cannot be read as JSON: {exc}") from exc


def _has_chat_template(path: Path) -> bool:
    """Whether the tokenizer files of a folder carry a chat template (read without loading the tokenizer)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def as_messages(raw_prompt) -> list[dict] | None:
    """A task row's prompt as chat messages: a message list as is (also the text the data module makes of
    one), plain text as one user turn; None when it is neither."""
    if isinstance(raw_prompt, str) and raw_prompt.lstrip().startswith("[{"):
        try:
            raw_prompt = ast.literal_eval(raw_prompt)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    if isinstance(raw_prompt, list) and all(isinstance(m, dict) and "content" in m for m in raw_prompt):
        return [dict(m) for m in raw_prompt]
    if isinstance(raw_prompt, str):
        return [{"role": "user", "content": raw_prompt}]
    return None


class RewardModelReward:
    """The score a sequence-classification reward model gives ``prompt + completion``.

    Args:
        path: local folder holding the model (its ``config.json`` must declare a
            ``...ForSequenceClassification`` architecture) and its tokenizer.
        label_index: which output logit is the score (a single-label regression head has only 0).
        batch_size: completions per forward pass.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the dtype saved in the folder).
        device: where the reward model runs; empty = the trainer's (``cuda:LOCAL_RANK`` with CUDA, else
            ``cpu``).
        max_length: longest input in tokens; longer ones lose their beginning (the completion is kept).
        chat_template: format the input with the reward model's chat template: empty = when the tokenizer
            has one and the prompt is chat-like (the task's prompt is a message list, or the policy saw it
            through its own chat template, ``data.chat_template``); ``false`` = never; ``true`` = always.
        scale: the reward is ``scale * logit + shift``.
        shift: see ``scale``.
    """

    def __init__(
        self,
        path: str,
        label_index: int = 0,
        batch_size: int = 8,
        dtype: str = "float32",
        device: str | None = None,
        max_length: int = 2048,
        chat_template: bool | None = None,
        scale: float = 1.0,
        shift: float = 0.0,
    ) -> None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ValueError(f"{KEY}.path: the reward model folder {path!r} does not exist")
        config = _read_config(folder)
        archs = config.get("architectures") or []
        if not any(str(a).endswith("ForSequenceClassification") for a in archs):
            raise ValueError(
                f"{KEY}.path: {folder / 'config.json'} declares architectures={archs!r}; a reward model "
                "needs a ...ForSequenceClassification architecture (a causal LM is not a reward model)"
            )
        labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
        if not 0 <= label_index < labels:
            raise ValueError(
                f"{KEY}.label_index: {label_index} is not a label of the model's {labels} outputs"
            )
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"{KEY}.batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{KEY}.dtype: {dtype!r} is not one of {list(DTYPE_NAMES)}")
        if chat_template and not _has_chat_template(folder):
            raise ValueError(
                f"{KEY}.chat_template: true, but the tokenizer in {str(folder)!r} has no chat template"
            )
        if not (math.isfinite(scale) and math.isfinite(shift)):
            raise ValueError(f"{KEY}.scale and shift must be finite, got {scale}, {shift}")
        if device:
            check_device(device)
        self.path, self.label_index, self.batch_size, self.dtype = str(folder), label_index, batch_size, dtype
        self.device, self.max_length, self.chat_template = device, max_length, chat_template
        self.scale, self.shift = scale, shift
        # the metric name (train/rewards/reward_model) unless the spec names it
        self.__name__ = "reward_model"
        self._lock = threading.Lock()
        self._model = self._tokenizer = None

    def __getstate__(self) -> dict:  # a spawned process loads its own copy
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_model", "_tokenizer")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _model=None, _tokenizer=None)

    def load(self):
        """(model, tokenizer), loaded at the first call and kept (a call that waits for a load in progress
        shares it)."""
        with self._lock:
            if self._model is None:
                import torch
                from transformers import AutoModelForSequenceClassification, AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self.path)
                if tok.pad_token is None:
                    if tok.eos_token is None:
                        raise ValueError(
                            f"{KEY}.path: the tokenizer in {self.path!r} has no pad or EOS token"
                        )
                    tok.pad_token = tok.eos_token
                tok.truncation_side = "left"
                dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
                model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=dtype)
                if model.config.pad_token_id is None:  # it finds each text's last token by the pad id
                    model.config.pad_token_id = tok.pad_token_id
                own = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
                model.to(self.device or own).eval().requires_grad_(False)  # the trainer's device by default
                self._tokenizer, self._model = tok, model
                log.info("reward model %s loaded on %s (%s)", self.path, model.device, model.dtype)
        return self._model, self._tokenizer

    def inputs(
        self, prompts: Sequence[str], completions: Sequence[str], raw_prompt=None
    ) -> list[tuple[str, bool]]:
        """(text, templated) the reward model reads for each completion (see ``chat_template``): through its
        chat template, the task's prompt as messages plus the completion as the assistant's turn (the
        template writes the special tokens); otherwise the prompt exactly as the policy continued it, followed
        by the completion (the tokenizer adds its special tokens)."""
        _, tok = self.load()
        has_template = bool(getattr(tok, "chat_template", None))
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            raw = raw_prompt[i] if raw_prompt is not None else prompt
            chat_like = not isinstance(raw, str) or raw.lstrip().startswith("[{") or raw != prompt
            messages = as_messages(raw)
            use = has_template and messages is not None and self.chat_template is not False
            if use and (self.chat_template or chat_like):
                turns = [*messages, {"role": "assistant", "content": completion}]
                out.append((tok.apply_chat_template(turns, tokenize=False), True))
            else:
                out.append((prompt + completion, False))
        return out

    def texts(self, prompts: Sequence[str], completions: Sequence[str], raw_prompt=None) -> list[str]:
        return [text for text, _ in self.inputs(prompts, completions, raw_prompt)]

    def score_texts(self, texts: Sequence[str], templated: Sequence[bool] | None = None) -> list[float]:
        """``scale * logit[label_index] + shift`` of each text, ``batch_size`` at a time, without gradient;
        a ``templated`` text gets no special tokens from the tokenizer (its template wrote them)."""
        import torch

        model, tok = self.load()
        templated = templated or [False] * len(texts)
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                encoded = [
                    tok(text, add_special_tokens=not done, truncation=True, max_length=self.max_length)
                    for text, done in zip(
                        texts[start : start + self.batch_size], templated[start:], strict=False
                    )
                ]
                batch = tok.pad(encoded, return_tensors="pt").to(model.device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                values = logits.float()[:, self.label_index] * self.scale + self.shift
                scores.extend(values.cpu().tolist())
        return scores

    def __call__(self, prompts, completions, raw_prompt=None, **_columns) -> list[float]:
        inputs = self.inputs(prompts, completions, raw_prompt)
        return self.score_texts([text for text, _ in inputs], [done for _, done in inputs])


# --------------------------------------------------------------------------- LLM judge

DEFAULT_TEMPLATE = (
    "You grade an answer to a task.\n\nTask:\n{prompt}\n\nReference answer (may be empty):\n{answer}\n\n"
    "Answer to grade:\n{completion}\n\nJudge correctness first, then clarity. Reply with one short "
    "sentence of reasoning, then a last line of the form 'Score: N' with N an integer from 0 to 10."
)
DEFAULT_SCORE_PATTERN = r"score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)"
PLACEHOLDER = re.compile(r"\{(prompt|completion|answer)\}")
RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class JudgeError(Exception):
    """One request failed for good (after its retries), or its reply held no score."""


class JudgeReward:
    """A score in [0, 1] from an LLM judge behind an OpenAI-compatible chat completions endpoint.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1`` (requests go to
            ``<base_url>/chat/completions``).
        model: the judge's model name on that server.
        template: the rubric sent as the user message; ``{prompt}`` (the task's prompt as the row gives it),
            ``{completion}`` and ``{answer}`` (the row's ``answer`` column) are replaced, other braces kept.
        max_score: the judge scores from 0 to this; the reward is score / max_score.  A reply whose score is
            missing or outside [0, max_score] is a failed sample.
        score_pattern: regular expression whose first group is the score (case-insensitive; the last match
            counts); a reply that is only a number also counts.
        system_prompt: optional system message before the rubric.
        api_key_env: name of the environment variable holding the API key (empty = no key is sent).
        request_timeout: seconds one request may wait for the server.
        retries: further tries of a request that failed (network error, timeout, HTTP 408/429/5xx).
        backoff: seconds before the first retry, doubled for each next one (at most 30 s).
        concurrency: requests in flight at once.
        temperature: the judge's sampling temperature.
        max_tokens: longest reply.
        cache_file: JSON-lines file of replies already paid for, read at start-up and appended to (empty = the
            cache is in memory only).  Keyed by the full request (URL and body), never by the API key.
        check_endpoint: at start-up, ask ``<base_url>/models`` (5 s at most) and stop the run if nothing
            answers or the server does not list ``model``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        template: str = DEFAULT_TEMPLATE,
        max_score: float = 10.0,
        score_pattern: str = DEFAULT_SCORE_PATTERN,
        system_prompt: str | None = None,
        api_key_env: str | None = None,
        request_timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 256,
        cache_file: str | None = None,
        check_endpoint: bool = True,
    ) -> None:
        if not re.match(r"https?://[^/\s]+", base_url or ""):
            raise ValueError(
                f"{KEY}.base_url: {base_url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)"
            )
        if "{completion}" not in template:
            raise ValueError(f"{KEY}.template: the rubric has no {{completion}} placeholder")
        if not (math.isfinite(max_score) and max_score > 0):
            raise ValueError(f"{KEY}.max_score must be a positive number, got {max_score}")
        try:
            pattern = re.compile(score_pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"{KEY}.score_pattern: {exc}") from exc
        if pattern.groups < 1:
            raise ValueError(f"{KEY}.score_pattern needs a group that captures the score: {score_pattern!r}")
        if request_timeout <= 0 or retries < 0 or backoff < 0 or concurrency < 1 or max_tokens < 1:
            raise ValueError(
                f"{KEY}: request_timeout > 0, retries >= 0, backoff >= 0, concurrency >= 1 and max_tokens "
                f">= 1 needed, got {request_timeout}, {retries}, {backoff}, {concurrency}, {max_tokens}"
            )
        if api_key_env and not os.environ.get(api_key_env):
            raise ValueError(f"{KEY}.api_key_env: the environment variable {api_key_env!r} is not set")
        self.base_url, self.model, self.template = base_url.rstrip("/"), model, template
        self.max_score, self.score_pattern, self.system_prompt = max_score, score_pattern, system_prompt
        self.api_key_env, self.cache_file = api_key_env, cache_file
        self.request_timeout, self.retries, self.backoff = request_timeout, retries, backoff
        self.concurrency, self.temperature, self.max_tokens = concurrency, temperature, max_tokens
        self.__name__ = "llm_judge"  # the metric name (train/rewards/llm_judge) unless the spec names it
        self._pattern = pattern
        self._lock = threading.Lock()
        self.cache: dict[str, str] = self._read_cache() if cache_file else {}
        self.requests = 0  # requests sent (retries included): what the cache saved shows here
        if "{answer}" in template:  # the task must give the column: trgrpo.rewards.check_rewards checks it
            import inspect

            params = inspect.signature(self.__call__).parameters
            answer = inspect.Parameter("answer", inspect.Parameter.KEYWORD_ONLY)
            self.__signature__ = inspect.Signature(
                [params["prompts"], params["completions"], answer, params["columns"]]
            )
        if check_endpoint:
            self.check_endpoint()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    # ------------------------------------------------------------------ the endpoint

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        return headers

    def check_endpoint(self) -> None:
        """Ask ``<base_url>/models``: nothing answering, or a model list without ``model``, stops the run."""
        url = f"{self.base_url}/models"
        try:
            request = urllib.request.Request(url, headers=self._headers())
            with urllib.request.urlopen(request, timeout=min(5.0, self.request_timeout)) as response:
                listing = json.loads(response.read() or b"{}")
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts and bad JSON
            raise ValueError(
                f"{KEY}.base_url: no OpenAI-compatible endpoint answered at {url} ({exc}); start the server "
                "(e.g. `vllm serve MODEL --port 8000`) or set check_endpoint: false"
            ) from None
        served = [m.get("id") for m in listing.get("data") or [] if isinstance(m, dict)]
        if served and self.model not in served:
            raise ValueError(
                f"{KEY}.model: {self.model!r} is not served at {self.base_url}; it serves {served}"
            )

    def request_body(self, prompt: str, completion: str, answer="") -> dict:
        values = {
            "prompt": str(prompt),
            "completion": str(completion),
            "answer": "" if answer is None else str(answer),
        }
        content = PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": content})
        return {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def cache_key(self, body: dict) -> str:
        text = json.dumps({"url": f"{self.base_url}/chat/completions", "body": body}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _post(self, body: dict) -> str:
        """The reply's text for one request, retried with backoff; raises JudgeError when it keeps failing."""
        url, data = f"{self.base_url}/chat/completions", json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            with self._lock:
                self.requests += 1
            try:
                request = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
                with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                    reply = json.loads(response.read())
                return str(reply["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code} {exc.reason}"
                if exc.code not in RETRY_STATUS:
                    raise JudgeError(f"{url} refused the request: {why}") from None
            except (OSError, HTTPException, ValueError, LookupError, TypeError) as exc:
                why = f"{type(exc).__name__}: {exc}"  # network errors, timeouts, a reply that is not JSON
            if attempt < self.retries:
                delay = min(30.0, self.backoff * 2**attempt)
                time.sleep(delay + random.uniform(0, delay / 10))
        raise JudgeError(f"{url} failed {self.retries + 1} times; last: {why}")

    # ------------------------------------------------------------------ scores

    def parse_score(self, reply: str) -> float:
        """The judge's score scaled to [0, 1]; raises JudgeError when the reply holds none in range."""
        found = self._pattern.findall(reply)
        text = found[-1] if found else reply.strip()
        text = text[0] if isinstance(text, tuple) else text
        try:
            score = float(text)
        except ValueError:
            raise JudgeError(f"the judge's reply holds no score: {reply[:200]!r}") from None
        if not 0 <= score <= self.max_score:
            raise JudgeError(f"the judge's score {score} is outside [0, {self.max_score}]: {reply[:200]!r}")
        return score / self.max_score

    def score_one(self, body: dict) -> float:
        key = self.cache_key(body)
        reply = self.cache.get(key)
        if reply is not None:
            return self.parse_score(reply)
        reply = self._post(body)
        score = self.parse_score(reply)  # a reply without a score is not kept: a new try may give one
        self._remember(key, reply)
        return score

    def __call__(self, prompts, completions, raw_prompt=None, answer=None, **columns) -> list[float | None]:
        task_prompts = raw_prompt if raw_prompt is not None else prompts
        answers = answer if answer is not None else [""] * len(completions)
        bodies = [
            self.request_body(p, c, a) for p, c, a in zip(task_prompts, completions, answers, strict=True)
        ]

        def attempt(body: dict) -> float | Exception:
            try:
                return self.score_one(body)
            except Exception as exc:  # noqa: BLE001 - this sample fails, the others are scored
                return exc

        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="trgrpo-judge") as pool:
            results = list(pool.map(attempt, bodies))
        failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        scores = [None if isinstance(r, Exception) else r for r in results]
        if failed:
            raise SampleFailures(scores, failed, str(results[failed[0]]))
        return scores

    # ------------------------------------------------------------------ the cache on disk

    def _read_cache(self) -> dict[str, str]:
        path = Path(self.cache_file).expanduser()
        if not path.parent.is_dir():
            raise ValueError(f"{KEY}.cache_file: the folder of {self.cache_file!r} does not exist")
        cache: dict[str, str] = {}
        if path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        cache[entry["key"]] = entry["reply"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a killed run
        return cache

    def _remember(self, key: str, reply: str) -> None:
        with self._lock:
            self.cache[key] = reply
            if self.cache_file:
                line = json.dumps({"key": key, "reply": reply}) + "\n"
                with open(Path(self.cache_file).expanduser(), "a", encoding="utf-8") as f:
                    f.write(line)
