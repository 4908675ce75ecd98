"""The embedded default: a tiny Qwen2 model, a prompt set and a reward, built offline, deterministically, and cached.

Nothing comes from a model hub. The text is Python's own documentation (`pydoc_data.topics`, shipped with CPython);
a byte-level BPE tokenizer is trained on it, a small random-init Qwen2 is pre-trained on it for a few hundred steps
(about a minute on 2 CPU cores), and the result is saved as an ordinary HF model directory, so that vLLM and
transformers load it like any other checkpoint. The build is cached under `TRL_CORRECT_CACHE`
(default `~/.cache/trl-correct`), keyed by `TINY_VERSION`.

    python -m trl_correct.tiny          # build (or find) the model and print its directory
"""

import json
import os
import random
import re
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
            raise FileNotFoundError(f"{out} not built; run `python -m trl_correct.tiny`")
        _build(out)
    return out


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
    ids = []
    for p in paras:
        ids += tok.encode(p).ids + [0]
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(pretrain_steps):
        starts = torch.randint(0, len(data) - PRETRAIN_SEQ - 1, (PRETRAIN_BATCH,), generator=gen)
        batch = torch.stack([data[s:s + PRETRAIN_SEQ] for s in starts.tolist()]).to(device)
        lr = PRETRAIN_LR * min(1.0, (step + 1) / 50) * (1 - step / pretrain_steps)  # warmup, linear decay
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().cpu()
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    rng = random.Random(SEED)
    prompts = []
    for p in rng.sample(paras, 256):
        words = p.split()[:12]
        prompts.append({"prompt": " ".join(words)})
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (out / "pretrain.json").write_text(json.dumps({"final_loss": round(loss.item(), 4), "steps": pretrain_steps}))
    (out / "done").write_text("ok\n")


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
    print(tiny_model_dir())
