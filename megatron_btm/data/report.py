"""What preprocessing produced: documents, tokens and skipped lines per domain and split."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SplitStats:
    source: str
    documents: int = 0
    sequences: int = 0      # == documents unless sentences were split
    tokens: int = 0         # written to .bin, eod included
    text_bytes: int = 0     # UTF-8 bytes of the JSON lines that became documents
    skipped: Counter = field(default_factory=Counter)   # reason -> lines
    bad_examples: list[dict] = field(default_factory=list)  # first bad lines: {"line", "reason"}
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "documents": self.documents, "sequences": self.sequences,
                "tokens": self.tokens, "text_bytes": self.text_bytes,
                "skipped": dict(sorted(self.skipped.items())),
                "skipped_lines": sum(self.skipped.values()), "bad_examples": self.bad_examples,
                "seconds": self.seconds}


@dataclass
class Report:
    tokenizer: dict[str, Any]
    config: dict[str, Any]
    splits: dict[str, dict[str, SplitStats]] = field(default_factory=dict)  # domain -> split ->
    sentence_splitter: str | None = None
    seconds: float = 0.0

    def add(self, domain: str, split: str, *, source: str) -> SplitStats:
        stats = SplitStats(source=source)
        self.splits.setdefault(domain, {})[split] = stats
        return stats

    def totals(self) -> dict[str, int]:
        all_stats = [s for d in self.splits.values() for s in d.values()]
        return {"documents": sum(s.documents for s in all_stats),
                "tokens": sum(s.tokens for s in all_stats),
                "skipped_lines": sum(sum(s.skipped.values()) for s in all_stats)}

    def to_dict(self) -> dict[str, Any]:
        return {"format": "megatron-btm/preprocess-report/1", "tokenizer": self.tokenizer,
                "sentence_splitter": self.sentence_splitter, "seconds": self.seconds,
                "totals": self.totals(), "config": self.config,
                "domains": {d: {s: st.to_dict() for s, st in splits.items()}
                            for d, splits in self.splits.items()}}

    def table(self) -> str:
        """A fixed-width table: one row per domain/split, then the totals."""
        head = f"{'domain':<16} {'split':<8} {'documents':>10} {'tokens':>13} {'skipped':>8}  reasons"
        rows = [head, "-" * len(head)]
        for d, splits in self.splits.items():
            for s, st in splits.items():
                reasons = ", ".join(f"{k}={v}" for k, v in sorted(st.skipped.items()))
                rows.append(f"{d:<16} {s:<8} {st.documents:>10,} {st.tokens:>13,} "
                            f"{sum(st.skipped.values()):>8,}  {reasons}")
        t = self.totals()
        rows.append("-" * len(head))
        rows.append(f"{'total':<16} {'':<8} {t['documents']:>10,} {t['tokens']:>13,} "
                    f"{t['skipped_lines']:>8,}")
        rows.append(f"tokenizer: vocab_size={self.tokenizer['vocab_size']} eod={self.tokenizer['eod']}"
                    f" ({self.tokenizer['source']}); {self.seconds:.1f} s")
        return "\n".join(rows)
