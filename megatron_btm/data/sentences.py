"""Offline sentence splitting. Never downloads anything.

Which splitter (`make_splitter`):
1. `punkt-pretrained`: NLTK's English punkt model, *if its data is already installed*
   (`nltk.data.find("tokenizers/punkt_tab/english/")`; looked up, never downloaded).
2. `punkt-trained` (the usual case here): punkt's unsupervised trainer (`PunktTrainer`) learns
   abbreviations, collocations and sentence starters from the corpus text itself; we add a fixed
   list of common English abbreviations (ABBREVIATIONS) because a few MB of text do not teach
   it all of them (on 300 KB of novels it still split after "Mr.").
3. `regex` (the documented fallback when nltk is not importable): split after . ! or ? (plus
   closing quotes/brackets) followed by whitespace and an upper-case letter, digit or quote,
   except after an abbreviation in ABBREVIATIONS or a single-letter initial.

Sentences returned by `split` cover the text exactly (their concatenation is the input): the
whitespace between sentences stays attached to the sentence before it, so the tokens of all
sentences together encode the whole document.
"""
from __future__ import annotations

import re
from typing import Iterable

# Lower-case, without the final period (punkt's convention for abbrev_types).
ABBREVIATIONS = frozenset("""
mr mrs ms messrs dr prof sr jr st mt rev hon gen col lt capt sgt cpl maj adm gov pres
e.g i.e cf vs etc al approx dept est fig figs vol vols ch chap sec pp ed eds trans
inc ltd co corp bros jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k a.m p.m
""".split())

_REGEX_BOUNDARY = re.compile(r"""[.!?]+["'”’)\]]*(\s+)(?=["'“‘(\[]?[A-Z0-9])""")
_LAST_WORD = re.compile(r"""([A-Za-z][A-Za-z.]*)[.!?]+["'”’)\]]*$""")


def punkt_pretrained_available() -> bool:
    """Whether NLTK's English punkt data is installed locally (no download is attempted)."""
    try:
        import nltk
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except (ImportError, LookupError):
        return False


class SentenceSplitter:
    """Picklable sentence splitter; `kind` is one of SPLITTER_KINDS."""

    def __init__(self, kind: str, punkt=None):
        if kind not in SPLITTER_KINDS:
            raise ValueError(f"sentence splitter {kind!r}: unknown; valid: {', '.join(SPLITTER_KINDS)}")
        self.kind, self._punkt = kind, punkt

    def split(self, text: str) -> list[str]:
        if self._punkt is not None:
            starts = [s for s, _ in self._punkt.span_tokenize(text)]
        else:
            starts = _regex_starts(text)
        starts = [0] + [s for s in starts if s > 0]
        ends = starts[1:] + [len(text)]
        return [text[a:b] for a, b in zip(starts, ends) if b > a]


def _regex_starts(text: str) -> list[int]:
    starts = []
    for m in _REGEX_BOUNDARY.finditer(text):
        w = _LAST_WORD.search(text, 0, m.start(1))
        word = w.group(1).lower().rstrip(".") if w else ""
        if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue
        starts.append(m.end(1))
    return starts


def _trained_punkt(sample_texts: Iterable[str]):
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    for text in sample_texts:
        trainer.train(text, finalize=False)
    trainer.finalize_training()
    params = trainer.get_params()
    params.abbrev_types.update(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def make_splitter(kind: str = "auto", sample_texts: Iterable[str] = ()) -> SentenceSplitter:
    """A splitter of `kind` ("auto" = the best available offline, in the order above).

    `sample_texts` trains the punkt-trained splitter (a few MB of the domain's own text).
    """
    if kind == "auto":
        try:
            import nltk  # noqa: F401
        except ImportError:
            return SentenceSplitter("regex")
        kind = "punkt-pretrained" if punkt_pretrained_available() else "punkt-trained"
    if kind == "punkt-pretrained":
        if not punkt_pretrained_available():
            raise ValueError("sentence splitter 'punkt-pretrained': NLTK punkt data is not "
                             "installed (it is never downloaded); use 'punkt-trained' or 'regex'")
        from nltk.tokenize import PunktTokenizer
        tok = PunktTokenizer("english")
        tok._params.abbrev_types.update(ABBREVIATIONS)
        return SentenceSplitter(kind, tok)
    if kind == "punkt-trained":
        return SentenceSplitter(kind, _trained_punkt(sample_texts))
    return SentenceSplitter(kind)  # "regex", or an unknown kind → error listing valid ones


SPLITTER_KINDS = ("punkt-pretrained", "punkt-trained", "regex")
