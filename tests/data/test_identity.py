"""data/identity: the one tokenizer check every command (and export-hf) makes."""
import json

import pytest

from megatron_btm.data import identity
from megatron_btm.errors import TokenizerError


def _ckpt(path, sha):
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"tokenizer_sha256": sha}))
    return path


def test_same_or_unknown_passes_and_a_mismatch_names_both(tmp_path):
    a, b, old = _ckpt(tmp_path / "a", "a" * 64), _ckpt(tmp_path / "b", "b" * 64), tmp_path / "old"
    old.mkdir()
    assert identity.check_checkpoints([("a", a), ("old", old)], ("x", "a" * 64)) == "a" * 64
    with pytest.raises(TokenizerError, match=rf"a \({a}/meta.json\).*aaaa.*b \({b}/meta.json\).*bbbb"):
        identity.check_checkpoints([("a", a), ("b", b)])


def test_check_export_compares_the_tokenizer_file(tmp_path, tokenizer_path):
    sha = identity.tokenizer_of(tokenizer_path)
    assert identity.check_export(_ckpt(tmp_path / "same", sha), tokenizer_path) == sha
    with pytest.raises(TokenizerError, match=rf"--tokenizer {tokenizer_path}"):
        identity.check_export(_ckpt(tmp_path / "other", "c" * 64), tokenizer_path)
