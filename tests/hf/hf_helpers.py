"""Tiny random Hugging Face models of every supported family, made locally (nothing downloaded),
and Megatron's logits for an imported checkpoint."""
import torch

VOCAB, SEQ = 1000, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=64)
# one per family; each exercises a field of its own (tying, GQA, head_dim != hidden/heads, RoPE
# scaling, QKV bias, QK norm)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(COMMON, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(COMMON, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
}


def make_hf_model(family: str, seed: int = 0):
    """A random model with wide weights (logits depend strongly on the input) in fp32."""
    import transformers
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:  # norms: around 1, not exactly 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def save_hf_model(family: str, folder, seed: int = 0, **save_kwargs):
    model = make_hf_model(family, seed)
    model.save_pretrained(folder, **save_kwargs)
    return model


def tokens(n: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def hf_logits(model, ids) -> torch.Tensor:
    return model(ids).logits.float()


def megatron_model(ckpt, *, tp: int = 1, pp: int = 1):
    """This rank's GPTModel (eval) with the checkpoint's weights at the current TP/PP layout."""
    from megatron_btm.megatron.checkpoint import load_weights, read_meta, resolve_checkpoint
    from megatron_btm.megatron.model import GPTConfig, build_model
    from megatron_btm.megatron.parallel import ParallelConfig, setup_model_parallel
    cfg = GPTConfig.from_dict(read_meta(resolve_checkpoint(ckpt))["model_config"])
    setup_model_parallel(ParallelConfig(tp=tp, pp=pp))
    model = build_model(cfg, tp=tp, pp=pp)
    load_weights([model], ckpt)
    return model.eval(), cfg


@torch.no_grad()
def megatron_logits(model, ids) -> torch.Tensor:
    b, s = ids.shape
    return model(ids, torch.arange(s).expand(b, s), None)


def llama_style_tokenizer(texts, vocab_size: int):
    """A byte-level BPE with Llama's special tokens `<s>`/`</s>` and no `<|endoftext|>`, as a
    transformers fast tokenizer (bos <s>, eos </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny_llama(folder, texts, *, vocab_size: int = 512, seq: int = 64, wide: bool = True):
    """A random 2-layer Llama (GQA) with a Llama-style tokenizer trained on `texts`, saved as a
    Hugging Face folder; returns (model, fast tokenizer)."""
    import transformers
    fast = llama_style_tokenizer(texts, vocab_size)
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=seq,
        tie_word_embeddings=False, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    if wide:  # logits depend strongly on the input: greedy paths have no near-ties
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name
                        else 0.15 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return model, fast
