"""Helpers several tasks share: prompt templates and the question key of the train / held-out check."""

from __future__ import annotations


def check_prompt_template(template: str) -> None:
    """Reject a ``prompt_template`` (``data.task.init_args``) without the ``{question}`` placeholder."""
    if "{question}" not in template:
        raise ValueError(f"data.task.init_args.prompt_template must contain {{question}}, got {template!r}")


def fill_template(template: str, question: str) -> str:
    """``template`` with ``{question}`` replaced (plain replacement: LaTeX braces stay as they are)."""
    return template.replace("{question}", question)


def normalise(text: str) -> str:
    """Whitespace-insensitive key used to check that held-out questions are not training questions."""
    return " ".join(text.split())
