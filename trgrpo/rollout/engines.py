"""The in-process rollout engines, ``fast`` and ``hf``, and the chooser that ``model.sampling.engine`` drives.

``fast`` (``trgrpo.fastpath.sampler``: one prefill per prompt shared by its G samples, a preallocated KV
cache bounded by ``model.sampling.fast_cache_gib``, a lean decode loop; Qwen2, Qwen3 and Llama-style
models, peft LoRA ones too) and ``hf`` (``model.generate`` on the G-times-repeated prompts; any causal LM)
give the same tokens for the same random state; ``fast`` falls back to ``hf`` for a model it does not
support, with a warning that says why.  ``vllm`` lives in ``trgrpo.rollout.vllm``.  With
``model.sampling.agent`` :func:`generate_rollout` runs multi-turn episodes (``trgrpo.agent.episodes``) on
the chosen engine's ``continue_contexts``.

A run builds its engine once (``make_engine``; ``GRPOModule.configure_model`` does) and hands it to every
rollout and held-out evaluation, so an engine with state (vLLM's, started on the first rollout) keeps it
for the whole run.  Called without an engine, ``generate_rollout`` makes one for that call alone.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from trgrpo.agent.episodes import run_episodes
from trgrpo.fastpath.sampler import fast_generation_refusal, sample_completions
from trgrpo.rollout.base import (
    Rollout,
    RolloutEngine,
    SamplingConfig,
    StopStrings,
    assemble_rollout,
    encode_prompts,
    group_runs,
    left_pad,
)
from trgrpo.rollout.vllm import VLLMEngine

log = logging.getLogger(__name__)


class HFEngine:
    """``model.generate`` on the G-times-repeated prompts: any causal LM."""

    gathers_own_weights = False  # generates with the policy itself: whole weights needed (ZeRO-3)

    def start(self, model, tokenizer, sampling, precision, local_rank) -> None:
        """Nothing to start: the policy samples itself."""

    def serving(self, model, tokenizer, sampling):
        return nullcontext()

    @staticmethod
    def generation_config(
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingConfig,
        greedy: bool,
        max_new_tokens: int,
        min_new_tokens: int | None = None,
    ) -> GenerationConfig:
        """The ``sampling`` settings as ``generate`` takes them (none of them with ``greedy``)."""
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )

    def generate(self, model, tokenizer, prompts, sampling, group_size, greedy) -> Rollout:
        enc = encode_prompts(model, tokenizer, prompts)
        ids = enc.input_ids.repeat_interleave(group_size, dim=0)  # [N, P]
        attn = enc.attention_mask.repeat_interleave(group_size, dim=0)
        gen_cfg = self.generation_config(
            tokenizer,
            sampling,
            greedy,
            sampling.max_new_tokens,
            min_new_tokens=sampling.max_new_tokens if sampling.ignore_eos else None,
        )
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen_cfg)
        return assemble_rollout(
            tokenizer, enc.input_ids, enc.attention_mask, out[:, ids.shape[1] :], group_size
        )

    def continue_contexts(self, model, tokenizer, contexts, sampling, max_new_tokens, stop, greedy):
        from transformers import StoppingCriteria, StoppingCriteriaList

        checker = StopStrings(tokenizer, stop)
        ids, attn = left_pad(contexts, tokenizer.pad_token_id, next(model.parameters()).device)
        width = ids.shape[1]

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return checker(input_ids[:, width:])

        gen_cfg = self.generation_config(tokenizer, sampling, greedy, max(max_new_tokens))
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            generation_config=gen_cfg,
            stopping_criteria=StoppingCriteriaList([_Stop()]),
        )[:, width:]
        return [
            checker.cut(row.tolist(), tokenizer.eos_token_id, budget)
            for row, budget in zip(out, max_new_tokens, strict=True)
        ]


class FastEngine:
    """``trgrpo.fastpath.sampler``: one prefill per prompt and a lean decode loop (Qwen2/Qwen3/Llama); the
    same tokens as :class:`HFEngine`, to which it falls back for other models."""

    gathers_own_weights = False  # generates with the policy itself: whole weights needed (ZeRO-3)
    start, serving = HFEngine.start, HFEngine.serving  # nothing to start or wake
    refused: str | None = None  # why the last model seen falls back to model.generate (logged once)

    def supports(self, model) -> bool:
        """Whether the fast sampler decodes ``model``; the first refusal is logged with its reason."""
        why = fast_generation_refusal(model)
        if why is not None and why != self.refused:
            log.warning("model.sampling.engine=fast: %s; sampling with model.generate (the hf engine)", why)
        self.refused = why
        return why is None

    def generate(self, model, tokenizer, prompts, sampling, group_size, greedy) -> Rollout:
        if not self.supports(model):
            return HFEngine().generate(model, tokenizer, prompts, sampling, group_size, greedy)
        enc = encode_prompts(model, tokenizer, prompts)
        completion = sample_completions(
            model,
            enc.input_ids,
            enc.attention_mask,
            group_size,
            sampling.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            greedy=greedy,
            ignore_eos=sampling.ignore_eos,
            cache_bytes=int(sampling.fast_cache_gib * 2**30),
        )  # [N, T]
        return assemble_rollout(tokenizer, enc.input_ids, enc.attention_mask, completion, group_size)

    def continue_contexts(self, model, tokenizer, contexts, sampling, max_new_tokens, stop, greedy):
        """Runs of identical contexts (the first turn) share one prefill; later turns prefill each context."""
        if not self.supports(model):
            return HFEngine().continue_contexts(
                model, tokenizer, contexts, sampling, max_new_tokens, stop, greedy
            )
        k = group_runs(contexts)
        checker = StopStrings(tokenizer, stop)
        ids, attn = left_pad(contexts[::k], tokenizer.pad_token_id, next(model.parameters()).device)
        out = sample_completions(
            model,
            ids,
            attn,
            k,
            max(max_new_tokens),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            greedy=greedy,
            stop=checker if stop else None,
            cache_bytes=int(sampling.fast_cache_gib * 2**30),
        )  # [N, t]
        return [
            checker.cut(row.tolist(), tokenizer.eos_token_id, budget)
            for row, budget in zip(out, max_new_tokens, strict=True)
        ]


ENGINES: dict[str, type[RolloutEngine]] = {"fast": FastEngine, "hf": HFEngine, "vllm": VLLMEngine}
"""``model.sampling.engine`` -> the engine class; every name of ``EngineName`` has one."""


def make_engine(sampling: SamplingConfig) -> RolloutEngine:
    """A new engine of the kind ``sampling.engine`` names (built once per run; vLLM starts on first use)."""
    return ENGINES[sampling.engine]()


@torch.no_grad()
def generate_rollout(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: SamplingConfig,
    group_size: int | None = None,
    greedy: bool = False,
    rows: list[dict] | None = None,
    engine: RolloutEngine | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt (or one greedy completion with ``greedy``).

    With ``sampling.agent`` the completions are multi-turn episodes with tool calls
    (``trgrpo.agent.episodes``); ``rows`` are then the prompts' task rows, handed to the tool environment
    (empty: ``{"prompt": p}``).
    ``engine`` is the run's engine; empty: a new one of ``sampling.engine`` for this call alone (a ``vllm``
    one then starts vLLM anew: pass the run's).
    """
    g = 1 if greedy else (group_size or sampling.group_size)
    engine = engine if engine is not None else make_engine(sampling)
    was_training = model.training
    model.eval()
    try:
        if sampling.agent is not None:
            return run_episodes(engine, model, tokenizer, prompts, sampling, g, greedy, rows)
        return engine.generate(model, tokenizer, prompts, sampling, g, greedy)
    finally:
        model.train(was_training)
