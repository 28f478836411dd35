"""The demo's default corpus: real text every installation of this project already has.

Harvested at run time from the Python environment (never downloaded, never committed), as
domains defined by provenance, like the BTM paper's:

    python_stdlib   .py files of the Python standard library (sysconfig "stdlib" path)
    cpp_headers     C/C++ headers shipped inside the torch package (torch/include)
    licenses        LICENSE/COPYING/NOTICE files of installed distributions (*.dist-info)
    package_docs    long descriptions: the bodies of installed distributions' METADATA files

One document per file; a file over MAX_DOC_BYTES is cut at line boundaries into several
documents. Deterministic for a given environment: sorted paths, shuffled with a fixed seed, exact
duplicates dropped (licences repeat a lot). Splits are disjoint *by file* (90/5/5), so the pieces
of one file never straddle train and test.
"""
from __future__ import annotations

import hashlib
import importlib.util
import random
import site
import sysconfig
import warnings
from pathlib import Path
from typing import Callable

from megatron_btm.data._perms import apply_umask
from megatron_btm.utils.io import atomic_dir, atomic_write_json

MAX_DOC_BYTES = 64 * 1024
MIN_DOC_CHARS = 200            # shorter files are too small to be useful documents
SPLIT_FRACTIONS = {"valid": 0.05, "test": 0.05}  # the rest is train
MIN_DOMAINS = 4
MANIFEST = "harvest.json"


def _site_packages() -> list[Path]:
    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # some embedded interpreters lack it
        pass
    return sorted(Path(p) for p in paths if Path(p).is_dir())


def _python_stdlib() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _cpp_headers() -> list[Path]:
    spec = importlib.util.find_spec("torch")  # locate without importing torch
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]) / "include"
    return sorted(p for p in root.rglob("*") if p.suffix in (".h", ".hpp", ".cuh") and p.is_file())


def _licenses() -> list[Path]:
    out = set()
    for sp in _site_packages():
        for info in sp.glob("*.dist-info"):
            for p in info.rglob("*"):
                name = p.name.upper()
                if p.is_file() and (name.startswith(("LICEN", "COPYING", "NOTICE"))
                                    or "licenses" in p.relative_to(info).parts[:-1]):
                    out.add(p)
    return sorted(out)


def _package_docs() -> list[Path]:
    return sorted(p for sp in _site_packages() for p in sp.glob("*.dist-info/METADATA"))


def _metadata_body(text: str) -> str:
    """The long description: what follows the header block of a METADATA file."""
    _, sep, body = text.partition("\n\n")
    return body if sep else ""


# domain -> (list source files, file text -> document text)
SOURCES: dict[str, tuple[Callable[[], list[Path]], Callable[[str], str]]] = {
    "python_stdlib": (_python_stdlib, lambda t: t),
    "cpp_headers": (_cpp_headers, lambda t: t),
    "licenses": (_licenses, lambda t: t),
    "package_docs": (_package_docs, _metadata_body),
}


def split_document(text: str, max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """Cut text at line boundaries into pieces of at most max_bytes UTF-8 bytes (a single
    longer line is cut by characters)."""
    pieces, cur, cur_bytes = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        while n > max_bytes:  # pathological single line
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
            if cur:
                pieces.append("".join(cur))
                cur, cur_bytes = [], 0
            pieces.append(head)
            line = line[len(head):]
            n = len(line.encode("utf-8"))
        if cur_bytes + n > max_bytes and cur:
            pieces.append("".join(cur))
            cur, cur_bytes = [], 0
        cur.append(line)
        cur_bytes += n
    if cur:
        pieces.append("".join(cur))
    return [p for p in pieces if p.strip()]


def harvest_domain(domain: str, *, max_bytes: int, seed: int,
                   seen: set[str] | None = None) -> dict[str, list[str]] | None:
    """{split: documents} for one domain, or None (with a warning) when its source is missing.

    `seen` (sha256 of documents already taken, shared across domains) keeps every document
    unique, so no text is in two splits or two domains.
    """
    list_files, extract = SOURCES[domain]
    files = list_files()
    random.Random(f"{seed}:{domain}").shuffle(files)
    seen = set() if seen is None else seen
    groups, total = [], 0   # groups: the documents of one file
    for path in files:
        try:
            text = extract(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: not text for this corpus
        text = text.replace("\x00", "")
        if len(text.strip()) < MIN_DOC_CHARS:
            continue
        docs = []
        for doc in split_document(text):
            digest = hashlib.sha256(doc.encode("utf-8")).hexdigest()
            if digest not in seen:
                seen.add(digest)
                docs.append(doc)
        if not docs:
            continue
        groups.append(docs)
        total += sum(len(d.encode("utf-8")) for d in docs)
        if total >= max_bytes and len(groups) >= 3:  # one file at least per split, cap or not
            break
    if len(groups) < 3:
        warnings.warn(f"embedded corpus: skipping domain {domain!r}: found {len(groups)} usable "
                      f"files (need >= 3: one each for train/valid/test)", stacklevel=2)
        return None
    n_valid = max(1, round(SPLIT_FRACTIONS["valid"] * len(groups)))
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * len(groups)))
    cut = {"valid": groups[:n_valid], "test": groups[n_valid:n_valid + n_test],
           "train": groups[n_valid + n_test:]}
    return {s: [d for g in gs for d in g] for s, gs in cut.items()}


def harvest_default_corpus(output_dir: str, *, max_bytes_per_domain: int = 2_000_000,
                           seed: int = 0, domains: list[str] | None = None) -> list[str]:
    """Write `<output_dir>/<domain>/{train,valid,test}.jsonl` (+ harvest.json); return the domains.

    The whole folder is written atomically. An existing output_dir is replaced only if it is a
    previous harvest (holds harvest.json) or empty.
    """
    import json

    if max_bytes_per_domain < 1:
        raise ValueError(f"max_bytes_per_domain={max_bytes_per_domain}: must be >= 1")
    names = list(SOURCES) if domains is None else list(domains)
    unknown = [d for d in names if d not in SOURCES]
    if unknown:
        raise ValueError(f"domains: unknown {unknown}; valid: {', '.join(SOURCES)}")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out}: exists and is not a harvested corpus (no {MANIFEST}); "
                              "refusing to replace it")
    harvested, seen = {}, set()
    for d in names:
        splits = harvest_domain(d, max_bytes=max_bytes_per_domain, seed=seed, seen=seen)
        if splits is not None:
            harvested[d] = splits
    if len(harvested) < MIN_DOMAINS:
        raise ValueError(f"embedded corpus: only {len(harvested)} domains could be harvested "
                         f"({', '.join(harvested) or 'none'}; need >= {MIN_DOMAINS}); sources: "
                         f"{', '.join(SOURCES)} (see megatron_btm/data/embedded.py)")
    manifest = {"format": "megatron-btm/embedded-corpus/1", "seed": seed,
                "max_bytes_per_domain": max_bytes_per_domain, "domains": {}}
    with atomic_dir(out, overwrite=True) as tmp:
        for d, splits in harvested.items():
            (tmp / d).mkdir()
            for s, docs in splits.items():
                lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs)
                (tmp / d / f"{s}.jsonl").write_text(lines, encoding="utf-8")
            manifest["domains"][d] = {s: {"documents": len(docs),
                                          "bytes": sum(len(t.encode("utf-8")) for t in docs)}
                                      for s, docs in splits.items()}
        atomic_write_json(tmp / MANIFEST, manifest)
        apply_umask(tmp)
    return list(harvested)
