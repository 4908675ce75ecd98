"""Models the benches build locally (no hub), cached next to the tiny one.

    python bench/models.py NAME        # build (or find) and print its directory

tiny        the embedded model (trl_correct.tiny): Qwen2, 2 layers, hidden 128, vocab 1024, 0.66M parameters.
tiny-v152k  the tiny model with its vocab padded to Qwen2.5's 151,936 (placeholder tokens `<xN>`, new rows drawn
            around the old ones' mean by transformers' resize): same body, a 150x larger head, for vocab scaling.
qwen2-137m  Qwen2, 12 layers, hidden 1024 (16 heads of 64, 4 KV heads), MLP 2816, vocab 1024: 137M parameters,
            pre-trained like the tiny one (on the GPU when there is one): the >= 100M GPU parity row.
"""

import json
import sys
from pathlib import Path

BIG_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=4, max_position_embeddings=1024)
QWEN_VOCAB = 151936
NAMES = ("tiny", "tiny-v152k", "qwen2-137m")


def model_dir(name: str) -> Path:
    from trl_correct.tiny import TINY_VERSION, _build, cache_root, tiny_model_dir

    if name == "tiny":
        return tiny_model_dir()
    if name not in NAMES:
        raise SystemExit(f"model={name!r} is invalid: use one of {', '.join(NAMES)}")
    out = cache_root() / f"{name}-{TINY_VERSION}"
    if (out / "done").exists():
        return out
    if name == "tiny-v152k":
        _padded_copy(tiny_model_dir(), out, QWEN_VOCAB)
    else:
        import torch

        _build(out, shape=BIG_SHAPE, device="cuda" if torch.cuda.is_available() else "cpu")
    return out


def _padded_copy(src: Path, out: Path, vocab: int) -> None:
    import shutil

    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    spec = json.loads(tok.to_str())
    n = tok.get_vocab_size()
    spec["model"]["vocab"].update({f"<x{i}>": i for i in range(n, vocab)})  # ASCII decodes as itself
    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=eos,
                            pad_token=eos).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="float32")
    model.resize_token_embeddings(vocab)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(src / "prompts.jsonl", out / "prompts.jsonl")
    (out / "done").write_text("ok\n")


if __name__ == "__main__":
    print(model_dir(sys.argv[1] if len(sys.argv) > 1 else "tiny"))
