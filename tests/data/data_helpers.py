"""Helpers for the data tests (a distinct module name: `conftest` is ambiguous across folders)."""
import json
from pathlib import Path

# lines taken from the head of each real split file (small: tests run on 2 shared cores)
SLICE = {"bible": {"train": 80, "valid": 20, "test": 20},
         "novels": {"train": 40, "valid": 10, "test": 10}}


def read_texts(path: Path) -> list[str]:
    """Reference reader: the "text" of every line with non-blank text (plain json, no project code)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                t = json.loads(line)["text"]
                if t.strip():
                    texts.append(t)
    return texts


def reference_encode(tokenizer_json: Path, texts: list[str]) -> list[list[int]]:
    """Each text encoded by the HF `tokenizers` library directly, + the end-of-document id."""
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(tokenizer_json))
    hf.encode_special_tokens = True
    eod = hf.token_to_id("<|endoftext|>")
    return [hf.encode(t, add_special_tokens=False).ids + [eod] for t in texts]


def read_indexed(prefix: str) -> list[list[int]]:
    """Documents of a .bin/.idx pair through Megatron's IndexedDataset (sequences joined)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(prefix), mmap=True)
    bounds = ds.document_indices
    return [[int(t) for j in range(bounds[i], bounds[i + 1]) for t in ds[j]]
            for i in range(len(bounds) - 1)]
