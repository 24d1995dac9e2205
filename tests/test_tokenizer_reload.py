"""A folder holding the tiny model and its character tokenizer (an export, a saved run) loads back with the
same tokenizer: transformers maps a qwen2 config.json to Qwen2's BPE tokenizer, which would drop spaces."""

from __future__ import annotations

from trgrpo.policy import PolicyConfig, load_model, load_tokenizer

TEXT = "What is 3 + 4? Reply with 7.\n<answer>7</answer>"


def test_a_saved_tiny_model_folder_reloads_the_character_tokenizer(tmp_path):
    tok = load_tokenizer(PolicyConfig())
    load_model(PolicyConfig(), tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    # transformers 5 alone loads Qwen2Tokenizer from this folder ("Whatis3+4?..."); the rule undoes that
    again = load_tokenizer(PolicyConfig(name_or_path=str(tmp_path)))
    assert again(TEXT).input_ids == tok(TEXT).input_ids
    assert again.decode(again(TEXT).input_ids) == TEXT
    assert again.chat_template == tok.chat_template and again.eos_token_id == tok.eos_token_id
