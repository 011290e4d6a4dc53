"""Noise text: long, irrelevant English prose in which the tasks hide their facts.

A source gives a `NoiseText`, a deduplicated tuple of sentences in a deterministic order,
with what a data card needs (where the text comes from, its licence, a hash):

- `pydoc` (the default, offline, nothing to download): the prose of the documentation
  topics that CPython bundles (`pydoc_data.topics`), code and grammar left out.
- `quality`: the QuALITY articles the paper used, from the SCROLLS copy on the Hugging
  Face hub (dataset `tau/scrolls`, file `quality.zip`).
- `pg19`: Project Gutenberg books of PG-19 (the later BABILong benchmark's noise): the
  file list from the hub dataset `deepmind/pg19`, the books from DeepMind's bucket.
- a path: a `.txt` file, or a folder whose `.txt` files are read (recursively).

The hub sources are downloaded once into the Hugging Face cache and work offline after
that. They use `huggingface_hub` (already a dependency) rather than `datasets`: both hub
datasets are defined by loading scripts, which `datasets` no longer runs (4.0 and later).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from rmt.utils import default, exists

VALID_SOURCES = "'pydoc', 'quality', 'pg19', or a path to a .txt file or a folder of .txt files"

# A sentence worth keeping: long enough to be prose, mostly words (not code or numbers).
MIN_WORDS = 6
MIN_LETTER_RATIO = 0.8
# Paragraphs of the pydoc topics with fewer letters than this among their visible
# characters are code, tables or grammar that escaped the line rules.
MIN_PARAGRAPH_LETTER_RATIO = 0.7
# Indented blocks of the pydoc topics with fewer plain words than this among their
# whitespace-separated tokens are code ("lst = []", "if x < y: print(x)").
MIN_INDENTED_WORD_FRACTION = 0.6

QUALITY_REPO = "tau/scrolls"
QUALITY_FILE = "quality.zip"
QUALITY_SPLITS = ("train", "validation", "test")
QUALITY_LICENSE = "CC BY 4.0 (QuALITY, Pang et al. 2022; https://nyu-mll.github.io/quality/)"

PG19_REPO = "deepmind/pg19"
PG19_SPLIT = "train"
PG19_BOOKS_URL = "https://storage.googleapis.com/deepmind-gutenberg/"
# Books are large (~400 KB each): ten already give tens of thousands of sentences.
PG19_DEFAULT_BOOKS = 10
PG19_LICENSE = (
    "Public domain in the USA (Project Gutenberg books published before 1919); "
    "PG-19 packaging: Apache License 2.0 (https://github.com/google-deepmind/pg19)"
)

PYDOC_LICENSE = "Python Software Foundation License Version 2 (CPython documentation)"
LOCAL_LICENSE = "as provided by the user (local files)"


class NoiseSourceError(ValueError):
    """A noise source that cannot be read; the message says why and what to do instead."""


@dataclass(frozen=True, kw_only=True)
class NoiseText:
    sentences: tuple[str, ...]  # deduplicated, in a deterministic order, one line each
    source: str  # "pydoc", "quality", "pg19", or the local path as given
    description: str  # where the text comes from, for the data card
    license: str  # licence of the text, for the data card

    def __post_init__(self) -> None:
        # A tuple even when built from a list, so that the noise cannot change after hashing.
        object.__setattr__(self, "sentences", tuple(self.sentences))

    @property
    def sha256(self) -> str:
        """Identifies the noise exactly: the same hash means the same sentences in the same order."""
        return hashlib.sha256("\n".join(self.sentences).encode("utf-8")).hexdigest()

    @property
    def num_characters(self) -> int:
        return sum(len(sentence) for sentence in self.sentences)


# ----------------------------------------------------------------------------- sentences

# Words whose final period does not end a sentence.
ABBREVIATIONS = frozenset(
    {"e.g.", "i.e.", "etc.", "vs.", "cf.", "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr."}
)
# A possible sentence end: . ! or ? (with any closing quotes or brackets), then whitespace,
# then an uppercase letter, possibly after an opening quote or bracket.
_SENTENCE_END = re.compile(r"""[.!?]["'”’)\]]*(?=\s+["'“‘(\[]?[A-Z])""")
_OPENING = "\"'“‘(["
_ENDS_WITH_PUNCTUATION = re.compile(r"""[.!?]["'”’)\]]*$""")


def _is_abbreviation(word: str) -> bool:
    """`word` ends with a period that belongs to it: `Mr.`, `(i.e.`, or an initial such as
    `J.` (but not `I.`, which ends sentences far more often than it abbreviates a name)."""
    word = word.lstrip(_OPENING)
    is_initial = len(word) == 2 and word[0].isupper() and word[0] != "I" and word[1] == "."
    return word.lower() in ABBREVIATIONS or is_initial


def split_sentences(text: str) -> list[str]:
    """English prose -> sentences, whitespace inside each one collapsed to single spaces.

    Splits after `.`, `!` or `?` (and any closing quotes) that are followed by whitespace and
    an uppercase letter or an opening quote, except after common abbreviations (`e.g.`,
    `Mr.`, `etc.`, ...) and initials (`J. Smith`). Good enough for noise, not for linguistics.
    """
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        # The word that carries the punctuation, e.g. "Dr." or "house.".
        last_word = text[start : match.start() + 1].rsplit(" ", 1)[-1]
        if text[match.start()] == "." and _is_abbreviation(last_word):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [sentence for sentence in sentences if sentence]


def _letter_ratio(text: str) -> float:
    visible = [character for character in text if not character.isspace()]
    return sum(character.isalpha() for character in visible) / max(len(visible), 1)


def is_prose_sentence(sentence: str) -> bool:
    """A real sentence: at least MIN_WORDS words, starts with an uppercase letter, ends with
    . ! or ? (closing quotes allowed), and is mostly letters (not code, numbers or a table)."""
    return (
        len(sentence.split()) >= MIN_WORDS
        and sentence[0].isupper()
        and bool(_ENDS_WITH_PUNCTUATION.search(sentence))
        and _letter_ratio(sentence) >= MIN_LETTER_RATIO
    )


def _paragraphs(text: str) -> Iterator[str]:
    """Blocks of text separated by blank lines, each joined into one line."""
    for block in re.split(r"\n[ \t]*\n", text):
        joined = " ".join(block.split())
        if joined:
            yield joined


def _prose_sentences(paragraphs: Iterable[str]) -> Iterator[str]:
    for paragraph in paragraphs:
        yield from (sentence for sentence in split_sentences(paragraph) if is_prose_sentence(sentence))


def _deduplicated(sentences: Iterable[str]) -> tuple[str, ...]:
    # dict keeps the first occurrence of each sentence, in order.
    return tuple(dict.fromkeys(sentences))


def _check_max_documents(max_documents: int | None) -> None:
    valid = isinstance(max_documents, int) and not isinstance(max_documents, bool) and max_documents >= 1
    if exists(max_documents) and not valid:
        raise NoiseSourceError(f"max_documents={max_documents!r}: must be at least 1, or None for every document")


def _noise(sentences: Iterable[str], *, source: str, description: str, license: str, where: str) -> NoiseText:
    sentences = _deduplicated(sentences)
    if not sentences:
        raise NoiseSourceError(
            f"No usable sentences in {where}: noise needs English prose (sentences of at least {MIN_WORDS} words "
            f"that start with an uppercase letter and end with . ! or ?). Give other text, or use the source 'pydoc'."
        )
    return NoiseText(sentences=sentences, source=source, description=description, license=license)


# ----------------------------------------------------------------------------- pydoc

_UNDERLINE = re.compile(r"[*=\-]{3,}")
# A list item or footnote: "* text", "- text", "3. text", "(2) text", "[1] text".
_LIST_MARKER = re.compile(r"([*\-+•]|\d+\.|\(\d+\)|\[\d+\])\s+")
_FOOTNOTE_MARK = re.compile(r" \[\d+\](?=[\s.,;:]|$)")
# A plain word, possibly quoted, bracketed, emphasized or followed by punctuation:
# "word", "(like", "it’s,", "*iterable*".
_PLAIN_WORD = re.compile(r"""["'“‘(*]*[A-Za-z][a-z’']*[)"'”’*]*[,.;:!?]?[)"'”’]*""")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _pydoc_blocks(topic: str) -> Iterator[list[str]]:
    """Runs of lines of one pydoc topic (reStructuredText rendered as plain text), split at
    blank lines, headings (a line underlined by a line of *, = or -, both dropped) and
    tables (lines starting with + or |, dropped). Lines keep their indentation."""
    lines = topic.splitlines()
    block: list[str] = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        following = lines[index + 1].strip() if index + 1 < len(lines) else ""
        is_heading_or_table = (
            _UNDERLINE.fullmatch(stripped) or _UNDERLINE.fullmatch(following) or stripped[:1] in ("+", "|")
        )
        if stripped and not is_heading_or_table:
            block.append(line)
            continue
        if block:
            yield block
        block = []
    if block:
        yield block


def _without_term(block: list[str]) -> list[str]:
    """A definition-list entry ('"__module__"' over its indented description) without its
    term line: the term is a name, not prose. Other blocks are returned unchanged."""
    first = block[0].strip()
    is_term = (
        len(block) > 1
        and _indent(block[1]) > _indent(block[0])
        and not _LIST_MARKER.match(first)
        and not first.endswith((":", ".", ","))
    )
    return block[1:] if is_term else block


def _word_fraction(text: str) -> float:
    tokens = text.split()
    return sum(bool(_PLAIN_WORD.fullmatch(token)) for token in tokens) / max(len(tokens), 1)


def _is_code(block: list[str]) -> bool:
    """Code examples, grammar productions, doctests and other non-prose blocks.

    The topics indent both code and prose (descriptions of methods, list items), so the
    indentation alone does not tell them apart: an indented block is code when few of its
    tokens are plain words ("lst = []", "if x < y: print(x)").
    """
    text = "\n".join(block)
    if "::=" in text or ">>>" in text:
        return True
    if block[0][0].isspace() and _word_fraction(text) < MIN_INDENTED_WORD_FRACTION:
        return True
    for line, following in zip(block, block[1:]):
        # A compound statement ("try:", "class A:") over its more indented body.
        body = _indent(following) > _indent(line) and not _LIST_MARKER.match(following.strip())
        if line.rstrip().endswith(":") and body:
            return True
    return _letter_ratio(text) < MIN_PARAGRAPH_LETTER_RATIO


def _block_paragraphs(block: list[str]) -> Iterator[str]:
    """The block's lines joined into paragraphs; each list item is a paragraph of its own,
    without its marker."""
    paragraph: list[str] = []
    for line in block:
        stripped = line.strip()
        marker = _LIST_MARKER.match(stripped)
        if marker:
            if paragraph:
                yield " ".join(paragraph)
            paragraph, stripped = [], stripped[marker.end() :]
        paragraph.append(stripped)
    if paragraph:
        yield " ".join(paragraph)


def _pydoc_paragraphs(topic: str) -> Iterator[str]:
    """The prose paragraphs of one pydoc topic, without footnote marks (" [1]")."""
    for block in _pydoc_blocks(topic):
        block = _without_term(block)
        if not _is_code(block):
            yield from (_FOOTNOTE_MARK.sub("", paragraph) for paragraph in _block_paragraphs(block))


def _load_pydoc(max_documents: int | None) -> NoiseText:
    from pydoc_data.topics import topics

    # Sorted keys: the same order on every run of the same Python build.
    names = sorted(topics)[: default(max_documents, len(topics))]
    paragraphs = (paragraph for name in names for paragraph in _pydoc_paragraphs(topics[name]))
    version = ".".join(str(part) for part in sys.version_info[:3])
    # The topics text changes between Python releases, so the version is part of the provenance.
    description = (
        f"Prose of the documentation topics bundled with CPython {version} (pydoc_data.topics, "
        f"{len(names)} of {len(topics)} topics in sorted order; code examples, grammar, tables and headings removed)"
    )
    return _noise(
        _prose_sentences(paragraphs), source="pydoc", description=description, license=PYDOC_LICENSE,
        where=f"the pydoc topics of Python {version}",
    )


# ----------------------------------------------------------------------------- local files


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # Sorted by relative path, so that the order does not depend on how the files were written.
    files = sorted(
        (file for file in path.rglob("*.txt") if file.is_file()), key=lambda file: file.relative_to(path).as_posix()
    )
    if not files:
        raise NoiseSourceError(
            f"No .txt files in the folder {str(path)!r} (searched recursively): put the noise text in .txt files "
            f"(UTF-8) there, or use one of the sources {VALID_SOURCES}."
        )
    return files


def _load_local(source: str, max_documents: int | None) -> NoiseText:
    path = Path(source)
    files = _local_files(path)[: default(max_documents, None)]
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise NoiseSourceError(
                f"{str(file)!r} is not UTF-8 text ({error.reason} at byte {error.start}): convert it to UTF-8, "
                "or remove it from the noise folder"
            ) from error
    what = f"{len(files)} file" + ("" if len(files) == 1 else "s")
    names = ", ".join(file.name for file in files[:5]) + (", ..." if len(files) > 5 else "")
    description = f"Local text {source!r} ({what}: {names})"
    return _noise(
        _prose_sentences(paragraph for text in texts for paragraph in _paragraphs(text)),
        source=source, description=description, license=LOCAL_LICENSE, where=f"{source!r} ({what})",
    )


# ----------------------------------------------------------------------------- hub sources


def _unreachable(source: str, what: str, cause: BaseException) -> NoiseSourceError:
    from huggingface_hub import constants

    offline = " (HF_HUB_OFFLINE=1 is set)" if constants.is_offline_mode() else ""
    return NoiseSourceError(
        f"The noise source {source!r} needs {what}, which could not be reached{offline} and is not in the local "
        f"cache ({type(cause).__name__}: {cause}). Run once with network access (HF_HUB_OFFLINE unset) to cache it, "
        f"or use the offline default source 'pydoc', or a path to local .txt files."
    )


def _hub_file(source: str, repo: str, filename: str) -> Path:
    """A file of a hub dataset, from the Hugging Face cache or downloaded into it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as error:
        # Not cached and no hub (offline, no network), or the hub refused (repository gone, 5xx).
        what = f"the Hugging Face hub (file {filename!r} of the dataset {repo!r})"
        raise _unreachable(source, what, error) from error


def _hub_revision(path: Path) -> str:
    """The commit a cached hub file comes from: its folder in the cache is named after it."""
    return path.parent.name if path.parent.parent.name == "snapshots" else "unknown"


def _quality_article(scrolls_input: str) -> str | None:
    """The article of a SCROLLS QuALITY `input`: question, blank line, options (A) to (D),
    blank line, article. None when the input does not have that layout."""
    options = scrolls_input.find("\n\n")
    last_option = scrolls_input.find("(D)", max(options, 0))
    article = scrolls_input.find("\n\n", max(last_option, 0))
    if min(options, last_option, article) < 0:
        return None
    return scrolls_input[article:].strip() or None


def _quality_articles(archive: Path) -> list[str]:
    """The distinct articles of SCROLLS' quality.zip, in split order then file order.
    Several questions share one article, so each article is kept once."""
    with zipfile.ZipFile(archive) as zipped:
        members = {Path(name).stem: name for name in zipped.namelist() if name.endswith(".jsonl")}
        if not any(split in members for split in QUALITY_SPLITS):
            raise NoiseSourceError(
                f"{str(archive)!r} has none of {[f'quality/{s}.jsonl' for s in QUALITY_SPLITS]} (it has "
                f"{sorted(zipped.namelist())[:10]}): the SCROLLS layout changed, use the source 'pydoc' or local files"
            )
        articles: dict[str, None] = {}
        for split in QUALITY_SPLITS:
            if split not in members:
                continue
            with zipped.open(members[split]) as lines:
                for line in lines:
                    if line.strip():
                        article = _quality_article(json.loads(line)["input"])
                        if exists(article):
                            articles.setdefault(article)
    return list(articles)


def _load_quality(max_documents: int | None) -> NoiseText:
    archive = _hub_file("quality", QUALITY_REPO, QUALITY_FILE)
    articles = _quality_articles(archive)
    used = articles[: default(max_documents, len(articles))]
    description = (
        f"Articles of QuALITY (Pang et al., 2022) as packaged by SCROLLS: {QUALITY_FILE} of the Hugging Face "
        f"dataset {QUALITY_REPO} (revision {_hub_revision(archive)}), {len(used)} of {len(articles)} distinct "
        f"articles of the splits {', '.join(QUALITY_SPLITS)} in file order"
    )
    return _noise(
        _prose_sentences(paragraph for article in used for paragraph in _paragraphs(article)),
        source="quality", description=description, license=QUALITY_LICENSE, where=f"the QuALITY articles ({len(used)})",
    )


def pg19_cache_dir() -> Path:
    """Where PG-19 books are kept once downloaded (they are not on the hub, so not in its cache)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "rmt" / "pg19"


def _pg19_book(name: str) -> str:
    """The text of one PG-19 book (`train/10.txt`), from the cache or downloaded into it."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    cached = pg19_cache_dir() / name
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    url = PG19_BOOKS_URL + name
    if constants.is_offline_mode():
        raise _unreachable("pg19", f"the book {url}", ConnectionError("offline mode is enabled"))
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise _unreachable("pg19", f"the book {url}", error) from error
    cached.parent.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed: an interrupted download never leaves a truncated book.
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, cached)
    return text


def _load_pg19(max_documents: int | None) -> NoiseText:
    listing = _hub_file("pg19", PG19_REPO, f"data/{PG19_SPLIT}_files.txt")
    names = sorted(line.strip() for line in listing.read_text().splitlines() if line.strip())
    used = names[: default(max_documents, PG19_DEFAULT_BOOKS)]
    description = (
        f"Project Gutenberg books of PG-19 (Rae et al., 2019): the first {len(used)} of the {len(names)} books of "
        f"the {PG19_SPLIT} split by file name ({used[0] if used else '-'} ...), listed by the Hugging Face dataset "
        f"{PG19_REPO} (revision {_hub_revision(listing)}), texts from {PG19_BOOKS_URL}"
    )
    return _noise(
        _prose_sentences(paragraph for name in used for paragraph in _paragraphs(_pg19_book(name))),
        source="pg19", description=description, license=PG19_LICENSE, where=f"the PG-19 books {used[:3]}",
    )


# ----------------------------------------------------------------------------- entry point

_NAMED_SOURCES = {"pydoc": _load_pydoc, "quality": _load_quality, "pg19": _load_pg19}
SOURCES = tuple(_NAMED_SOURCES)


def load_noise(source: str | os.PathLike = "pydoc", *, max_documents: int | None = None) -> NoiseText:
    """The noise sentences of `source`: "pydoc" (offline default), "quality", "pg19", or a
    path to a .txt file or a folder of .txt files. A source name wins over a file of the
    same name in the working directory (write "./pydoc" for that file).

    max_documents: read only the first documents (pydoc topics, QuALITY articles, PG-19
    books, local files, each in their deterministic order). None: every one, except for
    pg19, whose books are large: PG19_DEFAULT_BOOKS of them.
    """
    _check_max_documents(max_documents)
    source = os.fspath(source)
    if source in _NAMED_SOURCES:
        return _NAMED_SOURCES[source](max_documents)
    if not source.strip():
        raise NoiseSourceError(f"Empty noise source: use {VALID_SOURCES}.")
    path = Path(source)
    if path.is_dir() or path.is_file():
        return _load_local(source, max_documents)
    looks_like_path = os.sep in source or "/" in source or path.suffix != ""
    problem = f"The noise path {source!r} does not exist" if looks_like_path else f"Unknown noise source {source!r}"
    raise NoiseSourceError(f"{problem}: use {VALID_SOURCES}.")
