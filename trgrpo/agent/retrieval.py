"""A BM25 search tool over local passages (``bm25s``), as a ``ToolEnvironment`` for multi-turn rollouts.

Two sources of passages:

- ``corpus``: a user's jsonl or parquet file of passages, one per row, with a ``contents`` column
  (Search-R1's wiki dumps: ``"Title"\\ntext``) or a ``text`` column (and an optional ``title``).  The index is
  built once per corpus content: cached in memory and on disk under ``cache_dir``, keyed by the file's
  SHA-256, so a changed file gets a new index and an unchanged one is never re-indexed;
- no ``corpus``: each task row's ``documents`` (a list of passages), indexed per distinct document set (the
  G completions of a prompt share it), for tasks that generate their own small fact base.

The model calls ``search(query)`` and reads the top ``top_k`` passages, formatted as in Search-R1
(``Doc 1(Title: ...) text``).  Needs the ``agent`` extra: ``pip install -e ".[agent]"``.

    model:
      sampling:
        agent:
          environment:
            class_path: trgrpo.agent.retrieval.SearchEnvironment
            init_args: {corpus: /data/wiki18.jsonl, top_k: 3}
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path

from trgrpo.agent.tools import ToolCall, ToolEnvironment

log = logging.getLogger(__name__)

SEARCH_SCHEMA = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the knowledge base and return the most relevant passages.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "what to look up"}},
            "required": ["query"],
        },
    },
}

_INDEXES: OrderedDict[str, tuple] = OrderedDict()  # key -> (bm25s.BM25, passages); shared by every episode
_MAX_ROW_INDEXES = 256
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> content hash


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (the index cache key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


CORPUS_KEY = "model.sampling.agent.environment.init_args.corpus"


def check_corpus(path: str | Path, key: str = CORPUS_KEY) -> None:
    """Cheap start-up check of a corpus file: it exists and has a ``contents`` or ``text`` column (read from
    the parquet schema or the first jsonl row only); a ``ValueError`` naming ``key`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{key}: corpus file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
    else:
        with path.open() as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            raise ValueError(f"{key}: corpus {str(path)!r} has no passages")
        try:
            columns = list(json.loads(first))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(
                f"{key}: corpus {str(path)!r} is not jsonl (one JSON object a line): {exc}"
            ) from exc
    if "contents" not in columns and "text" not in columns:
        raise ValueError(
            f"{key}: corpus {str(path)!r} needs a 'contents' or a 'text' column, has {sorted(columns)}"
        )


def read_passages(path: str | Path, key: str = CORPUS_KEY) -> list[str]:
    """Passages of a jsonl / parquet corpus as ``"Title"\\ntext`` strings
    (``contents``, or ``title`` + ``text``)."""
    check_corpus(path, key)
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{key}: corpus {str(path)!r} has no passages")
    if "contents" in rows[0]:
        return [str(r["contents"]) for r in rows]
    return [f'"{r["title"]}"\n{r["text"]}' if r.get("title") else str(r["text"]) for r in rows]


def build_index(passages: list[str]):
    """A ``bm25s.BM25`` index of ``passages`` (English stop words removed)."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    return retriever


def format_passages(passages: list[str]) -> str:
    """Search-R1's layout: ``Doc i(Title: t) text`` per passage,
    the title from a ``"Title"\\n`` first line."""
    out = []
    for i, p in enumerate(passages, 1):
        title, _, text = p.partition("\n")
        out.append(f"Doc {i}(Title: {title.strip(chr(34))}) {text}" if text else f"Doc {i} {title}")
    return "\n".join(out)


class SearchEnvironment(ToolEnvironment):
    """BM25 search over a corpus file, or over each row's ``documents`` when ``corpus`` is empty.

    Parsing a recipe reads nothing; ``check`` (run when fit / validate starts, before the model loads) makes
    sure the corpus file exists and has the columns; it is read and indexed at the first episode.

    Args:
        corpus: jsonl or parquet file of passages (``contents``, or ``text`` and optional ``title``); empty =
            the task row's ``documents``.
        top_k: passages returned per query.
        cache_dir: where the index of a corpus file is saved (keyed by the file's content hash).
    """

    def __init__(
        self, corpus: str | None = None, top_k: int = 3, cache_dir: str = ".cache/trgrpo/bm25"
    ) -> None:
        if top_k < 1:
            raise ValueError(f"model.sampling.agent.environment.init_args.top_k must be >= 1, got {top_k}")
        self.corpus, self.top_k, self.cache_dir = corpus, top_k, cache_dir
        self.key: str | None = None

    def tools(self) -> list[dict]:
        return [SEARCH_SCHEMA]

    def check(self) -> None:
        if self.corpus is not None:
            check_corpus(self.corpus)

    def reset(self, row: dict, seed: int) -> None:
        if self.corpus is not None:
            self.key = self._file_index()
            return
        documents = row.get("documents")
        if not documents:
            raise ValueError("SearchEnvironment without a corpus needs a 'documents' column in the task rows")
        self.key = self._row_index([str(d) for d in documents])

    def _file_index(self) -> str:
        path = Path(self.corpus)
        if not path.is_file():
            raise ValueError(
                f"model.sampling.agent.environment.init_args.corpus: {self.corpus!r} does not exist"
            )
        stat = path.stat()  # hash the content once per file version, not once per episode
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _DIGESTS:
            _DIGESTS[memo] = file_digest(path)
        key = "file:" + _DIGESTS[memo]
        if key not in _INDEXES:
            import bm25s

            folder = Path(self.cache_dir) / key[5:21]
            passages = read_passages(self.corpus)
            if (folder / "params.index.json").exists():
                retriever = bm25s.BM25.load(str(folder))
            else:
                log.info(
                    "building the BM25 index of %s (%d passages) in %s", self.corpus, len(passages), folder
                )
                retriever = build_index(passages)
                retriever.save(str(folder))
            _INDEXES[key] = (retriever, passages)
        return key

    def _row_index(self, documents: list[str]) -> str:
        key = "rows:" + hashlib.sha256("\x00".join(documents).encode()).hexdigest()
        if key not in _INDEXES:
            _INDEXES[key] = (build_index(documents), documents)
            while len(_INDEXES) > _MAX_ROW_INDEXES:
                _INDEXES.popitem(last=False)
        return key

    def search(self, query: str) -> str:
        """The top ``top_k`` passages for ``query``, formatted for the model."""
        import bm25s

        retriever, passages = _INDEXES[self.key]
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.ids or not tokens.ids[0]:
            return "No results: the query has no searchable words."
        k = min(self.top_k, len(passages))
        docs, _ = retriever.retrieve(tokens, k=k, show_progress=False)
        return format_passages([passages[int(i)] for i in docs[0]])

    def step(self, call: ToolCall) -> str:
        return self.search(str(call.arguments["query"]))


__all__ = [
    "SearchEnvironment",
    "build_index",
    "check_corpus",
    "file_digest",
    "format_passages",
    "read_passages",
]
