"""Models the benches build locally (no hub), cached next to the tiny one.

    python bench/models.py NAME        # build (or find) and print its directory

tiny        the embedded model (trl_correct.tasks.tiny): Qwen2, 2 layers, hidden 128, vocab 1024, 0.66M parameters.
tiny-v152k  the tiny model with its vocab padded to Qwen2.5's 151,936 (placeholder tokens `<xN>`, new rows drawn
            around the old ones' mean by transformers' resize): same body, a 150x larger head, for vocab scaling.
qwen2-137m  Qwen2, 12 layers, hidden 1024 (16 heads of 64, 4 KV heads), MLP 2816, vocab 1024: 137M parameters,
            pre-trained like the tiny one (on the GPU when there is one): the >= 100M GPU parity row.
qwen2.5-0.5b  Qwen2.5-0.5B's published config (24 layers, hidden 896, 14 heads / 2 KV heads of 64, MLP 4864, vocab
            151,936, tied embeddings, QKV bias): 494M parameters, random init, saved in bf16 like the published one.
qwen3-0.6b  Qwen3-0.6B's published config (28 layers, hidden 1024, 16 heads / 8 KV heads of 128, MLP 3072, q/k norm,
            vocab 151,936, tied): 596M parameters, random init, bf16.
qwen3-moe-0.4b  Qwen3-30B-A3B's published MoE config scaled down (64 experts, top-8, expert MLP 256, hidden 512, 8
            layers, 4 heads / 2 KV heads of 128, untied, vocab 151,936): 363M parameters, random init, bf16: the
            real-shaped mixture-of-experts bench model (bench/moe_gate.py --model qwen3-moe-0.4b).
qwen2-rand-2m  Qwen2, 2 layers, hidden 256 (4 heads / 2 KV heads of 64), MLP 704, the tiny vocab of 1,024, tied:
            1.7M parameters, random init peaked like the real shapes. Untrained, it does not learn to stop: its
            completions run to the token limit (the tiny model's end at EOS after a few dozen), so a step reaches
            1e5 scored tokens in seconds (bench/batch_scaling.py).

The real-shaped models are not trained (no hub, no time on 2 cores), so their logits would be nearly uniform over
151,936 tokens (entropy ~11.9 nats), which no trained model has and which hides how bf16 noise acts on a peaked
distribution. The final RMSNorm's gain is scaled so that the mean next-token entropy on the tiny prompts is
`TARGET_ENTROPY` nats at T=1 (found by bisection, recorded in `peaking.json`): the logits then have a trained model's
spread without changing anything else in the network. The tokenizer is the tiny one padded to 151,936 (`<xN>`).
"""

import json
import sys
from pathlib import Path

BIG_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=4, max_position_embeddings=1024)
QWEN_VOCAB = 151936
# Published configs (Qwen/Qwen2.5-0.5B and Qwen/Qwen3-0.6B config.json), the fields that shape the numerics.
REAL_SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        vocab_size=151936, use_sliding_window=False, hidden_act="silu")),
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        vocab_size=151936, use_sliding_window=False, hidden_act="silu", attention_bias=False)),
    # Qwen3-30B-A3B's published config (128 experts, top-8, expert MLP 768, hidden 2048, 48 layers) scaled to fit 2
    # cores and 24 GB: 64 experts, top-8 (normalised), expert MLP 256, hidden 512, 8 layers, 4 heads / 2 KV heads of
    # 128, q/k norm, untied head, vocab 151,936: 363M parameters (201M in experts), random init, bf16.
    "qwen3-moe-0.4b": ("Qwen3MoeConfig", dict(
        hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, vocab_size=151936, use_sliding_window=False, hidden_act="silu",
        attention_bias=False, router_aux_loss_coef=0.001, output_router_logits=False)),
    "qwen2-rand-2m": ("Qwen2Config", dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        vocab_size=1024, use_sliding_window=False, hidden_act="silu")),
}
# Mean next-token entropy (nats, T=1) the real-shaped models are peaked to: trained 0.5B-7B instruct models sit at
# roughly 0.3-2 nats per token on their own samples; 1.5 keeps sampling varied (a flatter model samples rarer tokens,
# where the two sides' logprobs differ most).
TARGET_ENTROPY = 1.5
NAMES = ("tiny", "tiny-v152k", "qwen2-137m", *REAL_SHAPES)


def model_dir(name: str) -> Path:
    from trl_correct.tasks.tiny import TINY_VERSION, _build, cache_root, tiny_model_dir

    if name == "tiny":
        return tiny_model_dir()
    if name not in NAMES:
        raise SystemExit(f"model={name!r} is invalid: use one of {', '.join(NAMES)}")
    out = cache_root() / f"{name}-{TINY_VERSION}"
    if (out / "done").exists():
        return out
    if name == "tiny-v152k":
        _padded_copy(tiny_model_dir(), out, QWEN_VOCAB)
    elif name in REAL_SHAPES:
        _real_shape(name, out)
    else:
        import torch

        _build(out, shape=BIG_SHAPE, device="cuda" if torch.cuda.is_available() else "cpu")
    return out


def _padded_tokenizer(src: Path, out: Path, vocab: int) -> None:
    """The tiny model's tokenizer with placeholder tokens `<xN>` up to `vocab` (ASCII: decodes as itself)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    spec = json.loads(tok.to_str())
    n = tok.get_vocab_size()
    spec["model"]["vocab"].update({f"<x{i}>": i for i in range(n, vocab)})  # ASCII decodes as itself
    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=eos,
                            pad_token=eos).save_pretrained(out)


def _padded_copy(src: Path, out: Path, vocab: int) -> None:
    import shutil

    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    _padded_tokenizer(src, out, vocab)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="float32")
    model.resize_token_embeddings(vocab)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(src / "prompts.jsonl", out / "prompts.jsonl")
    (out / "done").write_text("ok\n")


def _real_shape(name: str, out: Path) -> None:
    """Random-init model of a published config, final norm gain scaled to TARGET_ENTROPY, saved in bf16."""
    import shutil

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from trl_correct.tasks.tiny import SEED, tiny_model_dir

    out.mkdir(parents=True, exist_ok=True)
    src = tiny_model_dir()
    cls, fields = REAL_SHAPES[name]
    _padded_tokenizer(src, out, fields["vocab_size"])
    config = getattr(transformers, cls)(bos_token_id=0, eos_token_id=0, pad_token_id=0, **fields)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in (src / "prompts.jsonl").read_text().splitlines()[:16]]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state[batch["attention_mask"].bool()]  # [N, H], before the head
        head = model.lm_head.weight

        def entropy(scale: float) -> float:
            lp = torch.log_softmax((hidden * scale) @ head.T, dim=-1)
            return float(-(lp.exp() * lp).sum(-1).mean())

        lo, hi = 1.0, 1.0
        while entropy(hi) > TARGET_ENTROPY:
            lo, hi = hi, hi * 2
        for _ in range(30):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if entropy(mid) > TARGET_ENTROPY else (lo, mid)
        scale = hi
        peaking = {"norm_gain": scale, "entropy_nats": entropy(scale), "entropy_before": entropy(1.0)}
        model.model.norm.weight.mul_(scale)  # logits = head(norm(h)): the gain scales them, nothing else changes
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    shutil.copy(src / "prompts.jsonl", out / "prompts.jsonl")
    (out / "peaking.json").write_text(json.dumps({**peaking, "config": cls, **fields}) + "\n")
    (out / "done").write_text("ok\n")


if __name__ == "__main__":
    print(model_dir(sys.argv[1] if len(sys.argv) > 1 else "tiny"))
