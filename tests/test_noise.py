"""Noise text (rmt.data.noise): the pydoc prose, the sentence splitter, local files, and the
hub sources read from a cache laid out as Hugging Face lays it out (no network anywhere)."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from rmt.data import noise
from rmt.data.noise import NoiseSourceError, NoiseText, load_noise, split_sentences

PROSE = (
    "The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp and "
    "watched the ships pass far out at sea.\n\nIn winter the storms were long and cold. "
    "Nobody came to visit the little island for many months."
)


@pytest.fixture(scope="module")
def pydoc_noise() -> NoiseText:
    return load_noise("pydoc")


# ----------------------------------------------------------------------------- pydoc


def test_pydoc_is_thousands_of_prose_sentences(pydoc_noise):
    sentences = pydoc_noise.sentences
    # ~1,900 sentences and ~220,000 characters on Python 3.11; the topics vary a little by release.
    assert len(sentences) >= 1000
    assert pydoc_noise.num_characters == sum(map(len, sentences)) > 100_000
    for sentence in sentences:
        assert "::=" not in sentence and ">>>" not in sentence, sentence
        assert sentence[0].isupper(), sentence
        assert re.search(r"[.!?][\"'”’)\]]*$", sentence), sentence
        assert len(sentence.split()) >= noise.MIN_WORDS, sentence
        assert sentence == " ".join(sentence.split()), "whitespace must be normalized (one sentence per line)"


def test_pydoc_keeps_prose_and_drops_code_and_headings(pydoc_noise):
    # Sentences found in the topics of Python 3.10 to 3.13.
    text = "\n".join(pydoc_noise.sentences)
    # Prose of the "assert" topic; not its heading, its grammar or its code example.
    assert "The current code generator emits no code for an assert statement" in text
    assert 'The "assert" statement' not in text
    assert "assert_stmt" not in text and "raise AssertionError" not in text
    # Indented prose is kept: method descriptions, the body of a definition ("**PEP 3129**"
    # over "The proposal that added class decorators."), the second line of a footnote.
    assert any(sentence.startswith("Called to implement") for sentence in pydoc_noise.sentences)
    assert "The proposal that added class decorators." in pydoc_noise.sentences
    assert "That new exception causes the old one to be lost." in pydoc_noise.sentences
    # Indented code is not, even when it holds words ("hit_except = True" in the "with" topic).
    assert "hit_except" not in text and "TARGET = value" not in text


# A topic in the format of pydoc_data.topics, with one of each thing to keep or drop.
TOPIC = """The "demo" statement
********************

The demo statement shows how the rules of the topics work.

   demo_stmt ::= "demo" expression

   >>> Demo. It Works Here.

   try:
       Nothing Happens Here At All.
   finally:
       Something Else Happens Here.

   result = compute(value)
   print(result)

x.__demo__(a, b=0) -> int | None

+------------------------------+
| A table cell with words.     |
+------------------------------+

Another Section Heading Here Today
==================================

  **PEP 3129** - Class Decorators
     The proposal that added class decorators.

* A bullet item that spans
  two lines of the topic.

[1] A footnote that spans
    two lines as well [2].
"""


def test_pydoc_paragraph_rules():
    blocks = [" ".join(block) for block in noise._pydoc_blocks(TOPIC)]
    assert not any("demo\" statement" in block or "***" in block for block in blocks)  # heading, underline
    assert not any("Section Heading" in block or "===" in block for block in blocks)
    assert not any("table cell" in block or "+---" in block for block in blocks)
    assert list(noise._pydoc_paragraphs(TOPIC)) == [
        "The demo statement shows how the rules of the topics work.",
        "The proposal that added class decorators.",
        "A bullet item that spans two lines of the topic.",
        "A footnote that spans two lines as well.",
    ]


def test_pydoc_is_deterministic_and_deduplicated(pydoc_noise):
    again = load_noise("pydoc")
    assert again == pydoc_noise
    assert again.sha256 == pydoc_noise.sha256
    assert len(set(pydoc_noise.sentences)) == len(pydoc_noise.sentences)
    expected = hashlib.sha256("\n".join(pydoc_noise.sentences).encode("utf-8")).hexdigest()
    assert pydoc_noise.sha256 == expected


def test_pydoc_card_fields(pydoc_noise):
    assert pydoc_noise.source == "pydoc"
    assert f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}" in pydoc_noise.description
    assert pydoc_noise.license == "Python Software Foundation License Version 2 (CPython documentation)"


def test_max_documents_reads_the_first_topics_only(pydoc_noise):
    few = load_noise("pydoc", max_documents=3)
    assert 0 < len(few.sentences) < len(pydoc_noise.sentences) / 5
    assert few.sentences == pydoc_noise.sentences[: len(few.sentences)]
    assert "3 of" in few.description
    for wrong in (0, -1, 1.5, True):
        with pytest.raises(NoiseSourceError, match="max_documents"):
            load_noise("pydoc", max_documents=wrong)


def test_noise_text_hash_changes_with_order_and_sentences_are_a_tuple():
    a = NoiseText(sentences=["One two three four five six.", "Seven eight nine ten eleven twelve."],
                  source="x", description="d", license="l")
    b = NoiseText(sentences=tuple(reversed(a.sentences)), source="x", description="d", license="l")
    assert isinstance(a.sentences, tuple)
    assert a.sha256 != b.sha256
    assert a.num_characters == b.num_characters == 28 + 35


# ----------------------------------------------------------------------------- split_sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It rained. The river rose.", ["It rained.", "The river rose."]),
        ("Did it rain? Yes! The river rose.", ["Did it rain?", "Yes!", "The river rose."]),
        ("Mr. Smith met Dr. Jones. They talked.", ["Mr. Smith met Dr. Jones.", "They talked."]),
        ("Bring fruit, e.g. Apples, pears, etc. Then cook them.", ["Bring fruit, e.g. Apples, pears, etc. Then cook them."]),
        ("We read J. R. Tolkien. It was long.", ["We read J. R. Tolkien.", "It was long."]),
        ("A  lot   of\n\tspace.\n\nNew   line here.", ["A lot of space.", "New line here."]),
        ('He said "Stop." She stopped.', ['He said "Stop."', "She stopped."]),
        ('It ended. "Run," he said.', ["It ended.", '"Run," he said.']),
        ("Version 3.11 is here. It works.", ["Version 3.11 is here.", "It works."]),
        ("lowercase after. a period does not split", ["lowercase after. a period does not split"]),
        ("", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


# ----------------------------------------------------------------------------- local files


def test_local_file(tmp_path):
    path = tmp_path / "story.txt"
    dropped = [
        "Too short.",
        "this one starts in lowercase and is dropped as well.",
        "The totals were 1,234 and 5,678 and 91,011 in 2024.",  # mostly digits
        "This one has no final punctuation at all so it goes",
    ]
    path.write_text(PROSE + "\n\n" + "\n\n".join(dropped) + "\n", encoding="utf-8")
    loaded = load_noise(str(path))
    assert loaded.sentences == (
        "The lighthouse keeper climbed the stairs every evening at dusk.",
        "He lit the lamp and watched the ships pass far out at sea.",
        "In winter the storms were long and cold.",
        "Nobody came to visit the little island for many months.",
    )
    assert loaded.source == str(path)
    assert "1 file" in loaded.description and str(path) in loaded.description
    assert loaded.license == "as provided by the user (local files)"


def _write(path: Path, sentence: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{sentence}\n", encoding="utf-8")


def test_local_folder_is_recursive_and_sorted_whatever_the_creation_order(tmp_path):
    files = {
        "zebra.txt": "Zebra is the last file of the whole folder.",
        "a/b.txt": "Bravo sits inside the nested folder named a.",
        "a/deeper/c.txt": "Charlie sits two folders deep in the tree.",
        "m.txt": "Mike is a file at the top of the folder.",
    }
    first, second = tmp_path / "first", tmp_path / "second"
    for name in files:
        _write(first / name, files[name])
    for name in reversed(list(files)):
        _write(second / name, files[name])
    (first / "notes.md").write_text("Markdown files are not read by the folder source at all.\n")

    by_path = [files[name] for name in sorted(files)]  # a/b.txt, a/deeper/c.txt, m.txt, zebra.txt
    loaded = load_noise(first)
    assert list(loaded.sentences) == by_path
    assert load_noise(second).sentences == loaded.sentences
    assert "4 files" in loaded.description
    assert load_noise(first, max_documents=2).sentences == tuple(by_path[:2])


def test_local_duplicates_are_kept_once_in_first_order(tmp_path):
    _write(tmp_path / "1.txt", "The same sentence appears in both files here. Only the first file has this one.")
    _write(tmp_path / "2.txt", "The same sentence appears in both files here.")
    assert load_noise(tmp_path).sentences == (
        "The same sentence appears in both files here.",
        "Only the first file has this one.",
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing" / "noise.txt", "does not exist"),
        (lambda tmp: tmp / "missing_folder", "does not exist"),
        (lambda tmp: "wikipedia", "Unknown noise source 'wikipedia'"),
        (lambda tmp: "", "Empty noise source"),
    ],
)
def test_unknown_source_or_missing_path(tmp_path, make, message):
    with pytest.raises(NoiseSourceError, match=message) as error:
        load_noise(make(tmp_path))
    for valid in ("'pydoc'", "'quality'", "'pg19'", "a path to a .txt file"):
        assert valid in str(error.value)


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "readme.md").write_text("A markdown file is not noise text for this loader.\n")
    with pytest.raises(NoiseSourceError, match=r"No \.txt files in the folder .*'pydoc'"):
        load_noise(tmp_path)


def test_text_without_usable_sentences(tmp_path):
    path = tmp_path / "code.txt"
    path.write_text("x = 1\nprint(x)\n\nshort one.\n\nno capital letter at the start of this line.\n")
    with pytest.raises(NoiseSourceError, match=r"No usable sentences in .*code\.txt.*'pydoc'"):
        load_noise(path)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\xe9 au lait is served every morning at the station.".encode("latin-1"))
    with pytest.raises(NoiseSourceError, match="not UTF-8"):
        load_noise(path)


# ----------------------------------------------------------------------------- hub sources


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache, whatever the machine's own cache holds."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted in offline mode")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path / "hub"


def _cache_hub_file(hub: Path, repo: str, filename: str, content: bytes, commit: str = "c0ffee" * 6 + "c0ff") -> None:
    """Lay a file out as huggingface_hub caches a dataset file: refs/main -> snapshots/<commit>/."""
    folder = hub / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    target = folder / "snapshots" / commit / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)


@pytest.mark.parametrize("source", ["quality", "pg19"])
def test_hub_sources_offline_and_not_cached(empty_hub, source):
    started = time.monotonic()
    with pytest.raises(NoiseSourceError) as error:
        load_noise(source)
    assert time.monotonic() - started < 5, "offline must fail at once, without trying the network"
    message = str(error.value)
    assert repr(source) in message and "Hugging Face hub" in message and "HF_HUB_OFFLINE" in message
    assert "'pydoc'" in message and "local .txt files" in message


def _scrolls_row(question: str, article: str) -> dict:
    options = "\n".join(f" ({letter}) Option {letter} of the question" for letter in "ABCD")
    return {"id": question[:5], "pid": question[:7], "input": f"{question}\n\n{options}\n\n\n{article}", "output": "A"}


def _quality_zip(path: Path) -> Path:
    first = "Mercury was hot and the spaceport was loud all day.\n\nThe pilots waited for the evening launch window."
    second = "The old library kept its doors open until midnight.\n\nReaders came from every corner of the city."
    rows = {
        # Two questions on the first article: the article must be kept once.
        "train": [_scrolls_row("Why did the pilots wait?", first), _scrolls_row("Where was the spaceport?", first)],
        "validation": [_scrolls_row("When did the library close?", second)],
        "test": [_scrolls_row("Who came to read at the library?", second)],
    }
    with zipfile.ZipFile(path, "w") as archive:
        for split, split_rows in rows.items():
            archive.writestr(f"quality/{split}.jsonl", "".join(json.dumps(row) + "\n" for row in split_rows))
    return path


def test_quality_reads_the_articles_from_the_cached_scrolls_zip(empty_hub, tmp_path):
    _cache_hub_file(empty_hub, "tau/scrolls", "quality.zip", _quality_zip(tmp_path / "quality.zip").read_bytes())
    loaded = load_noise("quality")
    assert loaded.sentences == (
        "Mercury was hot and the spaceport was loud all day.",
        "The pilots waited for the evening launch window.",
        "The old library kept its doors open until midnight.",
        "Readers came from every corner of the city.",
    )
    assert "2 of 2 distinct articles" in loaded.description and "c0ffee" in loaded.description
    assert "tau/scrolls" in loaded.description
    assert loaded.license.startswith("CC BY 4.0")
    assert load_noise("quality", max_documents=1).sentences == loaded.sentences[:2]


def test_quality_with_an_unexpected_archive(empty_hub, tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("something/else.csv", "a,b\n")
    _cache_hub_file(empty_hub, "tau/scrolls", "quality.zip", (tmp_path / "other.zip").read_bytes())
    with pytest.raises(NoiseSourceError, match="SCROLLS layout changed"):
        load_noise("quality")


def _pg19_cache(hub: Path, home: Path, books: dict[str, str]) -> None:
    listing = "".join(f"{name}\n" for name in books)
    _cache_hub_file(hub, "deepmind/pg19", "data/train_files.txt", listing.encode())
    for name, text in books.items():
        if text:
            _write(home / "rmt" / "pg19" / name, text)


def test_pg19_reads_only_the_first_books_by_name(empty_hub, tmp_path):
    books = {
        "train/300.txt": "",  # Not cached: reading it offline would fail the test.
        "train/10.txt": "The first book tells of a long voyage across the sea.",
        "train/200.txt": "The second book tells of a quiet village in the hills.",
    }
    _pg19_cache(empty_hub, tmp_path, books)
    loaded = load_noise("pg19", max_documents=2)  # sorted by name: train/10.txt, train/200.txt
    assert loaded.sentences == (books["train/10.txt"], books["train/200.txt"])
    assert "first 2 of the 3 books" in loaded.description
    assert "public domain" in loaded.license.lower() and "Apache" in loaded.license
    with pytest.raises(NoiseSourceError, match=r"train/300\.txt.*HF_HUB_OFFLINE.*'pydoc'"):
        load_noise("pg19")  # the default reads 10 books, so also the missing one


def test_pg19_book_download_is_cached(tmp_path, monkeypatch):
    """A book is fetched once over HTTP (here a server on this machine), then read from the cache."""
    served = tmp_path / "served" / "train"
    served.mkdir(parents=True)
    (served / "10.txt").write_text("The downloaded book begins on a winter morning.", encoding="utf-8")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served.parent), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # straight to the local server, whatever proxy is set
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(noise, "PG19_BOOKS_URL", f"http://127.0.0.1:{server.server_port}/")
    try:
        assert noise._pg19_book("train/10.txt") == "The downloaded book begins on a winter morning."
        with pytest.raises(NoiseSourceError, match="train/11.txt"):
            noise._pg19_book("train/11.txt")  # 404
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "home" / "rmt" / "pg19" / "train" / "10.txt"
    assert cached.read_text(encoding="utf-8") == "The downloaded book begins on a winter morning."
    assert not list(cached.parent.glob(".*partial"))
    assert noise._pg19_book("train/10.txt") == "The downloaded book begins on a winter morning."
