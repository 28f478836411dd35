"""Evaluation blocks: stride, padding, limits, layouts; real preprocessed files."""
import pytest

from megatron_btm.inference.blocks import cut_blocks, make_blocks, num_scored_tokens, read_eval_blocks
from megatron_btm.inference.scoring import IGNORE


def test_stream_blocks_score_every_token_once():
    docs = [list(range(1, 8)), list(range(10, 16))]  # 13 ids
    blocks = make_blocks(docs, 4)
    stream = docs[0] + docs[1]
    assert blocks.shape == (3, 5)
    assert blocks[0].tolist() == stream[0:5] and blocks[1].tolist() == stream[4:9]
    assert blocks[2].tolist() == stream[8:13]
    # targets: every id after the first exactly once
    targets = [t for t in blocks[:, 1:].reshape(-1).tolist() if t != IGNORE]
    assert targets == stream[1:] and num_scored_tokens(blocks) == 12
    padded = make_blocks([list(range(1, 8))], 4)  # 7 ids: blocks [1..5], [5,6,7,pad,pad]
    assert padded[1].tolist() == [5, 6, 7, IGNORE, IGNORE]


def test_document_layout_and_max_blocks():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    blocks = make_blocks(docs, 3, layout="document")
    assert blocks.tolist() == [[1, 2, 3, IGNORE], [5, 6, 7, 8], [8, 9, 10, IGNORE]]
    assert make_blocks(iter(docs), 3, layout="document", max_blocks=2).shape == (2, 4)
    big = [list(range(i * 100, i * 100 + 50)) for i in range(100)]
    limited = make_blocks(iter(big), 8, max_blocks=3)
    assert limited.tolist() == make_blocks(big, 8)[:3].tolist()
    assert cut_blocks([7], 4) == [] and make_blocks([], 4).shape == (0, 5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout='bogus'.*stream"):
        make_blocks([[1, 2]], 4, layout="bogus")
    with pytest.raises(ValueError, match="max_blocks=0"):
        make_blocks([[1, 2]], 4, max_blocks=0)


def test_read_eval_blocks_from_preprocessed_data(world):
    from megatron_btm.data.datasets import read_documents
    blocks = read_eval_blocks(world.data, "dom0", "test", 16)
    stream = [t for d in read_documents(world.data, "dom0", "test") for t in d]
    assert num_scored_tokens(blocks) == len(stream) - 1
    assert blocks[0].tolist() == stream[:17]
    with pytest.raises(ValueError, match="token id .* vocab_size is 10"):
        read_eval_blocks(world.data, "dom0", "test", 16, vocab_size=10)
    with pytest.raises(FileNotFoundError, match="dom9/valid.bin"):
        read_eval_blocks(world.data, "dom9", "valid", 16)
