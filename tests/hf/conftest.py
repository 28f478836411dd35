import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # hf_helpers.py


@pytest.fixture(scope="session")
def gloo_world():
    """A world-1 gloo group (Megatron's model building and checkpoint loading need one)."""
    import tempfile

    from megatron_btm.megatron.parallel import init_distributed
    tmp = tempfile.mkdtemp()
    init_distributed(init_method=f"file://{tmp}/pg", rank=0, world_size=1)


@pytest.fixture(scope="session")
def hf_tokenizer_files(tmp_path_factory):
    """HF tokenizer files (tokenizer.json + tokenizer_config.json) of a small local BPE."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from megatron_btm.data.tokenizer import train_bpe
    d = tmp_path_factory.mktemp("hf-tok")
    lines = ['{"text": "the quick brown fox %d jumps over the lazy dog"}\n' % i for i in range(100)]
    (d / "text.jsonl").write_text("".join(lines))
    train_bpe([d / "text.jsonl"], 300, d / "bpe.json")
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(d / "bpe.json")),
                                   eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out = d / "files"
    fast.save_pretrained(out)
    return out
