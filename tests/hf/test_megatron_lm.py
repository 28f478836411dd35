"""A Megatron-LM --save folder (tracker file + iter_NNNNNNN/, torch_dist) imports as a checkpoint
and seeds a forest; it is built here from one of ours in Megatron-LM's layout (common.pt with
args / iteration / checkpoint_version, optimizer tensors beside the model's, unfused norm names)."""
import argparse
import enum

import pytest
import torch
from hf_helpers import hf_logits, megatron_logits, megatron_model, save_hf_model, tokens

from megatron_btm.averaging.torch_dist import TorchDistReader, TorchDistWriter
from megatron_btm.hf.importer import import_hf
from megatron_btm.hf.megatron_lm import import_megatron_lm


class AttnBackend(enum.Enum):  # pickled by reference, as Megatron-LM's own enums in its args
    auto = 5


def megatron_lm_args(**overrides):
    """The Megatron-LM arguments of hf_helpers' llama (GQA, SwiGLU, RMSNorm, llama3 RoPE)."""
    args = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                group_query_attention=True, num_query_groups=2, kv_channels=16, seq_length=64,
                max_position_embeddings=64, position_embedding_type="rope", rotary_base=10000,
                rotary_percent=1.0, use_rope_scaling=True, rope_scaling_factor=8.0,
                normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True, add_bias_linear=False,
                add_qkv_bias=False, untie_embeddings_and_output_weights=True, padded_vocab_size=1000,
                make_vocab_size_divisible_by=128, params_dtype=torch.float32,
                attention_backend=AttnBackend.auto, ckpt_format="torch_dist", num_experts=None)
    return argparse.Namespace(**{**args, **overrides})


def write_megatron_lm(ours, root, *, iteration=20, args=None, prefix=""):
    """Our checkpoint's model tensors in Megatron-LM's layout, with Adam state and common.pt."""
    reader = TorchDistReader(ours)
    folder = root / f"iter_{iteration:07d}"
    writer = TorchDistWriter(folder)
    try:
        for key in reader.tensors():
            t = reader.read_tensor(key)
            name = key.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
            for stored in (prefix + name, f"optimizer.state.exp_avg.{name}"):
                writer.declare_tensor(stored, t.shape, t.dtype)
                writer.write_chunk(stored, (0,) * t.dim(), t if stored == prefix + name else t * 0 + 1)
        writer.finish(common={"args": args or megatron_lm_args(), "checkpoint_version": 3.0,
                              "iteration": iteration, "opt_param_scheduler": {"num_steps": 80},
                              "num_floating_point_operations_so_far": 1.5e12})
    finally:
        reader.close()
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


@pytest.fixture(scope="module")
def ours(tmp_path_factory, hf_tokenizer_files):
    import shutil
    tmp = tmp_path_factory.mktemp("mlm")
    model = save_hf_model("llama", tmp / "hf")
    for f in hf_tokenizer_files.iterdir():
        shutil.copy(f, tmp / "hf" / f.name)
    return import_hf(tmp / "hf", tmp / "ours", seq_length=64), model


def test_megatron_lm_folder_imports_the_same_model(ours, tmp_path, gloo_world):
    from megatron_btm.megatron.checkpoint import read_meta, resolve_checkpoint
    ckpt, hf_model = ours
    mlm = write_megatron_lm(ckpt / "iter_0000000", tmp_path / "mlm", prefix="model.")
    out = import_megatron_lm(mlm, tmp_path / "out")
    meta = read_meta(resolve_checkpoint(out))
    theirs = read_meta(resolve_checkpoint(ckpt))["model_config"]
    assert {k: v for k, v in meta["model_config"].items() if k != "arch"} == \
        {k: v for k, v in theirs.items() if k != "arch"}
    assert meta["imported_from"]["iteration"] == 20 and meta["imported_from"]["checkpoint_version"] == 3.0
    a, b = TorchDistReader(ckpt / "iter_0000000"), TorchDistReader(out / "iter_0000000")
    assert sorted(a.tensors()) == sorted(b.tensors())  # the optimizer's tensors are dropped
    for key in a.tensors():
        assert torch.equal(a.read_tensor(key), b.read_tensor(key)), key
    model, _ = megatron_model(out)
    ids = tokens()
    torch.testing.assert_close(megatron_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_megatron_lm_folder_and_imported_checkpoint_seed_a_forest(ours, tmp_path):
    from megatron_btm.forest import Forest
    from megatron_btm.megatron.checkpoint import read_meta
    from megatron_btm.stages.merge import merge_seed
    ckpt, _ = ours
    mlm = write_megatron_lm(ckpt / "iter_0000000", tmp_path / "mlm")
    forest = merge_seed(tmp_path / "forest", mlm)
    seed = forest.checkpoint_path(forest.seed().id)  # the checkpoint folder itself, as branch reads it
    assert (seed / "metadata.json").is_file()
    assert read_meta(seed)["imported_from"]["format"] == "megatron-lm torch_dist"
    assert merge_seed(tmp_path / "forest", mlm).root == forest.root  # idempotent
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merge-")]
    with pytest.raises(FileExistsError, match="another seed"):
        merge_seed(tmp_path / "forest", ckpt)
    unfinished = tmp_path / "run"  # a run folder with checkpoints but no stage.json is not merged
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "run.json").write_text("{}")
    (unfinished / "checkpoints" / "latest").write_text("iter_0000002\n")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        merge_seed(tmp_path / "forest3", unfinished)
    imported = merge_seed(tmp_path / "forest2", ckpt)  # a checkpoint root (latest + iter_*)
    assert read_meta(imported.checkpoint_path(imported.seed().id))["kind"] == "import"


def test_bad_megatron_lm_folders_are_refused(ours, tmp_path, capsys):
    from megatron_btm.cli import main
    ckpt, _ = ours
    mlm = write_megatron_lm(ckpt / "iter_0000000", tmp_path / "mlm")
    assert main(["import-hf", str(mlm), "--output", str(tmp_path / "cli"), "--seq-length", "32"]) == 2
    assert "--seq-length: a Megatron-LM checkpoint's args fix it" in capsys.readouterr().err
    assert main(["import-hf", str(mlm), "--output", str(tmp_path / "cli")]) == 0
    assert "imported Megatron-LM iteration 20 as model.arch=llama" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latest_checkpointed_iteration.txt").write_text("best\n")
    with pytest.raises(ValueError, match="expected an iteration number or 'release'"):
        import_megatron_lm(bad, tmp_path / "o")
    (bad / "latest_checkpointed_iteration.txt").write_text("release")
    (bad / "release" / "mp_rank_00").mkdir(parents=True)
    with pytest.raises(ValueError, match="legacy torch format"):
        import_megatron_lm(bad, tmp_path / "o")
    moe = write_megatron_lm(ckpt / "iter_0000000", tmp_path / "moe", args=megatron_lm_args(num_experts=8))
    with pytest.raises(ValueError, match="num_experts=8 are not supported"):
        import_megatron_lm(moe, tmp_path / "o")
    wide = write_megatron_lm(ckpt / "iter_0000000", tmp_path / "wide",
                             args=megatron_lm_args(ffn_hidden_size=256))
    with pytest.raises(ValueError, match="has shape .* but .*args imply"):
        import_megatron_lm(wide, tmp_path / "o")
    assert not (tmp_path / "o").exists()
