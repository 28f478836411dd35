"""export-hf writes the family back for an imported-then-trained expert and for an average."""
import shutil

import torch
from hf_helpers import VOCAB, hf_logits, make_hf_model, megatron_logits, megatron_model, save_hf_model, tokens

from megatron_btm.export import export_checkpoint
from megatron_btm.hf.importer import import_hf


def _load(folder):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.float().eval()


def test_average_of_imported_models_exports_as_the_family(tmp_path, hf_tokenizer_files):
    from megatron_btm.averaging.apply import average_checkpoints
    ckpts = []
    for seed in (0, 1):
        folder = tmp_path / f"hf{seed}"
        save_hf_model("qwen3", folder, seed=seed)
        for f in hf_tokenizer_files.iterdir():
            shutil.copy(f, folder / f.name)
        ckpts.append(import_hf(folder, tmp_path / f"ckpt{seed}") / "iter_0000000")
    average_checkpoints(ckpts, [0.25, 0.75], tmp_path / "avg", progress=False)
    out = export_checkpoint(tmp_path / "avg", tokenizer=ckpts[0].parent, output=tmp_path / "out")
    # averaging commutes with the (linear) key mapping: the HF average is the reference
    ref = make_hf_model("qwen3", 0)
    other = make_hf_model("qwen3", 1).state_dict()
    ref.load_state_dict({k: 0.25 * v + 0.75 * other[k] for k, v in ref.state_dict().items()})
    got = _load(out)
    assert type(got).__name__ == "Qwen3ForCausalLM"
    torch.testing.assert_close(hf_logits(got, tokens()), hf_logits(ref, tokens()), atol=1e-4, rtol=0)


def test_imported_then_trained_llama_exports_and_matches_megatron(gloo_world, tmp_path, hf_tokenizer_files):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))
    import mp_workers

    from megatron_btm.megatron.checkpoint import read_meta, resolve_checkpoint
    from megatron_btm.training.loop import train
    folder = tmp_path / "hf"
    original = save_hf_model("llama", folder)
    for f in hf_tokenizer_files.iterdir():
        shutil.copy(f, folder / f.name)
    ckpt = import_hf(folder, tmp_path / "ckpt")
    model_cfg = read_meta(resolve_checkpoint(ckpt))["model_config"]
    cfg = mp_workers.make_cfg(model=model_cfg, steps=2, optim={"lr": 1e-2, "warmup_steps": 0,
                                                               "decay_style": "constant"})
    data = mp_workers.SyntheticDataset(32, model_cfg["seq_length"] // 4, VOCAB, seed=3)
    r = train(cfg, train_dataset=data, valid_datasets=None, output_dir=tmp_path / "run",
              init_from=ckpt, resume="none")
    megatron, _ = megatron_model(r.checkpoint)
    want = megatron_logits(megatron, tokens())
    out = export_checkpoint(r.checkpoint, tokenizer=ckpt, output=tmp_path / "out")
    got = _load(out)
    assert type(got).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(hf_logits(got, tokens()), want, atol=1e-4, rtol=0)
    assert (want - hf_logits(original, tokens())).abs().max() > 1e-2  # training changed the model
