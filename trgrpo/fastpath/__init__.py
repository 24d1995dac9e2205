"""Speed-ups that change no number: a reader of the RL step can skip this package.

Everything here computes what a plain Hugging Face call computes (tested token for token, or to float
rounding), only faster on the small models and large groups of GRPO:

- ``sampler.py``: the ``fast`` rollout engine: each distinct prompt prefilled once, a preallocated KV
  cache and a lean decode loop for Qwen2 / Qwen3 / Llama-style models; the same tokens as
  ``model.generate`` for the same seed (``tests/test_generation.py``); ``lora.py``: the LoRA layers'
  low-rank terms for its decode loop (``tests/test_lora_fast.py``).
- ``shared_prefix.py``: scoring forward passes in which each distinct prompt runs through the model once
  for all its G completions; the same logits and gradients as the plain forward
  (``tests/test_shared_prefix.py``).

The RL step reads as if these were ``model.generate`` and ``model(input_ids=[prompt; completion])``:
``trgrpo.rollout`` wraps the sampler as its ``fast`` engine, and scoring calls ``completion_logits`` where it
would call the model.  Pure torch and transformers, no Lightning import.
"""
