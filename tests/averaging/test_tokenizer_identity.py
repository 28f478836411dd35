"""average refuses checkpoints of different tokenizers and records the common one."""
import json

import pytest
from averaging_helpers import tiny_state, write_checkpoint

from megatron_btm.averaging.apply import average_checkpoints
from megatron_btm.errors import TokenizerError


def _with_tokenizer(path, seed, sha):
    ckpt = write_checkpoint(path, tiny_state(seed))
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps(dict(meta, tokenizer_sha256=sha)))
    return ckpt


def test_average_of_two_tokenizers_is_refused_naming_both(tmp_path):
    a = _with_tokenizer(tmp_path / "a", 1, "a" * 64)
    b = _with_tokenizer(tmp_path / "b", 2, "b" * 64)
    with pytest.raises(TokenizerError, match=rf"{a}/meta.json.*aaaa.*{b}/meta.json.*bbbb"):
        average_checkpoints([a, b], [0.5, 0.5], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_average_records_the_common_tokenizer(tmp_path):
    a = _with_tokenizer(tmp_path / "a", 1, "a" * 64)
    b = _with_tokenizer(tmp_path / "b", 2, "a" * 64)
    average_checkpoints([a, b], [0.5, 0.5], tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["tokenizer_sha256"] == "a" * 64
