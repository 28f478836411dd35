"""Every kind of bad input: a clear error naming the file and line, or (with skip_bad_lines)
skipped and counted; a failed run leaves no complete-looking output."""
import json

import pytest

from megatron_btm.data.jsonl import BadLineError
from megatron_btm.data.preprocess import PreprocessConfig, preprocess

from data_helpers import read_indexed, reference_encode

GOOD = [f"Document number {i}. It has a few words, and ends here." for i in range(6)]
BAD_LINES = {  # reason -> (raw line, words the message must contain)
    "malformed_json": (b'{"text": "unterminated', "malformed JSON"),
    "not_utf8": (b'{"text": "caf\xe9 au lait"}', "not valid UTF-8 (byte 0xe9"),
    "missing_text": (b'{"body": "no text key here"}', 'no "text" key (keys: body)'),
    "text_not_string": (b'{"text": 42}', '"text" must be a string, got int'),
    "not_an_object": (b'["text", "a list"]', "expected a JSON object"),
}


def write_corpus(root, lines_by_split, domain="dom"):
    (root / domain).mkdir(parents=True, exist_ok=True)
    for split, lines in lines_by_split.items():
        (root / domain / f"{split}.jsonl").write_bytes(b"".join(l + b"\n" for l in lines))
    return root


def good(i):
    return json.dumps({"text": GOOD[i]}).encode()


def run(tmp_path, tokenizer_path, **kw):
    cfg = dict(corpus_dir=str(tmp_path / "corpus"), output_dir=str(tmp_path / "out"),
               tokenizer=tokenizer_path and str(tokenizer_path), progress=False, workers=1,
               splits=("train",))
    cfg.update(kw)
    return preprocess(PreprocessConfig(**cfg))


def assert_no_complete_output(tmp_path):
    assert not (tmp_path / "out").exists()
    finals = [p for p in tmp_path.rglob("*") if p.suffix in (".bin", ".idx") or p.name == "report.json"]
    assert finals == []  # not even under a temporary name: a failed run cleans up


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_line_names_file_and_line(reason, tmp_path, tokenizer_path):
    raw, words = BAD_LINES[reason]
    write_corpus(tmp_path / "corpus", {"train": [good(0), good(1), raw, good(2), good(3)]})
    path = tmp_path / "corpus" / "dom" / "train.jsonl"
    with pytest.raises(BadLineError) as e:
        run(tmp_path, tokenizer_path)
    assert f"{path}: line 3: " in str(e.value) and words in str(e.value)
    assert (e.value.lineno, e.value.reason) == (3, reason)
    assert_no_complete_output(tmp_path)


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_skip_bad_lines_skips_and_counts(reason, tmp_path, tokenizer_path):
    raw, _ = BAD_LINES[reason]
    write_corpus(tmp_path / "corpus", {"train": [good(0), raw, good(1), b"", good(2)]})
    report = run(tmp_path, tokenizer_path, skip_bad_lines=True)
    st = report.splits["dom"]["train"]
    assert st.documents == 3
    assert dict(st.skipped) == {reason: 1, "blank_line": 1}
    assert st.bad_examples == [{"line": 2, "reason": reason}]
    assert read_indexed(tmp_path / "out" / "dom" / "train") == reference_encode(tokenizer_path, GOOD[:3])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["domains"]["dom"]["train"]
    assert saved["skipped"] == {reason: 1, "blank_line": 1} and saved["skipped_lines"] == 2


def test_first_bad_line_in_file_order_is_reported_with_workers(tmp_path, tokenizer_path):
    # Two workers, chunks of 2 lines: lines 7 and 10 are bad, in different chunks.
    lines = [good(i % 6) for i in range(12)]
    lines[6] = BAD_LINES["missing_text"][0]
    lines[9] = BAD_LINES["malformed_json"][0]
    write_corpus(tmp_path / "corpus", {"train": lines})
    with pytest.raises(BadLineError, match=r"train\.jsonl: line 7: no \"text\" key"):
        run(tmp_path, tokenizer_path, workers=2, chunk_lines=2)
    assert_no_complete_output(tmp_path)


def test_failure_in_a_later_split_removes_the_earlier_complete_ones(tmp_path, tokenizer_path):
    write_corpus(tmp_path / "corpus", {"train": [good(0), good(1)],
                                       "valid": [good(2), BAD_LINES["not_utf8"][0]]})
    with pytest.raises(BadLineError, match=r"valid\.jsonl: line 2: not valid UTF-8"):
        run(tmp_path, tokenizer_path, splits=("train", "valid"))
    assert_no_complete_output(tmp_path)


def test_empty_text_is_skipped_not_an_error(tmp_path, tokenizer_path):
    write_corpus(tmp_path / "corpus", {"train": [good(0), b'{"text": "   "}', good(1)]})
    st = run(tmp_path, tokenizer_path).splits["dom"]["train"]
    assert st.documents == 2 and dict(st.skipped) == {"empty_text": 1}


def test_empty_file(tmp_path, tokenizer_path):
    write_corpus(tmp_path / "corpus", {"train": [good(0)]})
    empty = tmp_path / "corpus" / "dom" / "valid.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(BadLineError, match=f"{empty}: line 1: empty file"):
        run(tmp_path, tokenizer_path, splits=("train", "valid"))
    assert_no_complete_output(tmp_path)
    report = run(tmp_path, tokenizer_path, splits=("train", "valid"), skip_bad_lines=True)
    assert report.splits["dom"]["valid"].documents == 0
    assert dict(report.splits["dom"]["valid"].skipped) == {"empty_file": 1}
    # no .bin/.idx for a split without documents (Megatron cannot mmap an empty file)
    assert sorted(p.name for p in (tmp_path / "out" / "dom").iterdir()) == ["train.bin", "train.idx"]


def test_missing_domain_folder_lists_the_present_ones(tmp_path, tokenizer_path):
    write_corpus(tmp_path / "corpus", {"train": [good(0)]})
    with pytest.raises(FileNotFoundError) as e:
        run(tmp_path, tokenizer_path, domains=["dom", "nosuch"])
    assert f"{tmp_path / 'corpus' / 'nosuch'}: domain folder not found" in str(e.value)
    assert "domains in" in str(e.value) and "dom" in str(e.value)
    assert_no_complete_output(tmp_path)


def test_unknown_split_names_the_missing_file(tmp_path, tokenizer_path):
    write_corpus(tmp_path / "corpus", {"train": [good(0)]})
    with pytest.raises(FileNotFoundError) as e:
        run(tmp_path, tokenizer_path, splits=("train", "dev"))
    assert f"{tmp_path / 'corpus' / 'dom' / 'dev.jsonl'}: file not found" in str(e.value)
    assert "train.jsonl" in str(e.value)  # what is there instead
    assert_no_complete_output(tmp_path)


def test_missing_corpus_dir(tmp_path, tokenizer_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'corpus'}: corpus folder not found"):
        run(tmp_path, tokenizer_path)


def test_bad_line_during_tokenizer_training_names_file_and_line(tmp_path):
    write_corpus(tmp_path / "corpus", {"train": [good(0), good(1), BAD_LINES["text_not_string"][0]]})
    with pytest.raises(BadLineError, match=r"train\.jsonl: line 3: \"text\" must be a string"):
        run(tmp_path, None, vocab_size=300)
    assert_no_complete_output(tmp_path)


def test_byte_order_mark_and_crlf_are_accepted(tmp_path, tokenizer_path):
    write_corpus(tmp_path / "corpus", {"train": [b"\xef\xbb\xbf" + good(0) + b"\r", good(1) + b"\r"]})
    report = run(tmp_path, tokenizer_path)
    assert report.splits["dom"]["train"].documents == 2
    assert read_indexed(tmp_path / "out" / "dom" / "train") == reference_encode(tokenizer_path, GOOD[:2])
