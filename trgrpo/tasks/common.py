"""Helpers several tasks share: prompt templates, the question key of the train / held-out check, and the
check of a local data file before the ``datasets`` loader reads it."""

from __future__ import annotations

from pathlib import Path

# files the loader decodes as UTF-8 text (parquet is binary)
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


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


def check_data_file(path: str | Path, key: str) -> None:
    """Refuse a local data file that is empty or (jsonl, json, csv) not UTF-8, naming ``key``, the file and
    the line: the ``datasets`` loader reports the first as a bare ``StopIteration`` and the second as a
    ``UnicodeDecodeError`` with neither.  Hub ids, folders and patterns are left to the loader."""
    path = Path(path)
    if not path.is_file():
        return
    blank = True
    if path.suffix.lower() in TEXT_SUFFIXES:
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{key}: {str(path)!r} line {number} is not UTF-8 text ({err.reason} at byte "
                        f"{err.start} of the line); save the file as UTF-8"
                    ) from None
                blank = blank and not text.strip()
    else:
        blank = path.stat().st_size == 0
    if blank:
        raise ValueError(f"{key}: {str(path)!r} is empty (no rows to train or evaluate on)")
