"""The embedded character-level tokenizer used by the demo, the CPU configs and the tests.

One token per character (ASCII printable, newline, tab) plus a few tags that reasoning prompts use
(``<think>``, ``</think>``, ``<answer>``, ``</answer>``) and the specials ``<pad>``, ``<bos>``, ``<eos>``,
``<unk>``.  It is built with the ``tokenizers`` library and saved as an ordinary Hugging Face tokenizer
folder, so it is loaded through the same ``AutoTokenizer.from_pretrained`` path as any hub tokenizer.
A minimal chat template is included so chat-formatted prompts work offline.

    python -c "from trgrpo.policy.chartokenizer import save_char_tokenizer; save_char_tokenizer('char_tok')"
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARACTERS = sorted(set(string.printable) - set("\r\x0b\x0c"))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character tokenizer (vocabulary of about 110 tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tok.add_tokens(TAG_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_char_tokenizer(path: str | Path) -> Path:
    """Write the character tokenizer to ``path`` (a folder) and return it."""
    path = Path(path)
    build_char_tokenizer().save_pretrained(path)
    return path
