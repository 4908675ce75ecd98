"""Cost of scoring under the engine's full sampler transform: the trainer's logprob pass with TRL 1.16's fused
temperature-only head vs trl-correct's processed head (head.py), at vocab 151,936 on this CPU.

    python bench/sampler_speed.py [--layers 24] [--batch 2] [--prompt 64] [--completion 192] [--repeats 3]
                                  [--logit_std 4.0]

Model: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, vocab 151,936), random init, fp32, fp32
head. Batch: `--batch` sequences of prompt + completion tokens, completions drawn so penalties see repeats. Each
repeat runs every variant once, interleaved: a no-grad pass (TRL's old-policy logprobs) and a forward + backward pass
(the loss). `--logit_std` sets the spread of the head's logits: a trained model's are peaked (top-p keeps few
tokens, found among the top 1024 candidates); a random init's are flat (0.6), where top-p keeps most of the vocabulary
and the head falls back to vLLM's full sort. Prints one markdown table (min / median / max seconds and the ratio of medians to the baseline); append
it to docs/BENCHMARKS.md with the command.
"""

import argparse
import platform
import statistics
import time

import torch
import transformers
import trl
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.utils import add_fused_lm_head

from trl_correct.adapters.head import add_processed_head, remove_processed_head
from trl_correct.core.sampler import SamplerSpec

VARIANTS = {
    "TRL fused head, temperature only (baseline)": None,
    "processed head: top_k=50, top_p=0.95": SamplerSpec(temperature=0.9, top_k=50, top_p=0.95),
    "processed head: top_p=0.95": SamplerSpec(temperature=0.9, top_p=0.95),
    "processed head: top_p=0.95, min_p=0.05": SamplerSpec(temperature=0.9, top_p=0.95, min_p=0.05),
    "processed head: repetition_penalty=1.1": SamplerSpec(temperature=0.9, repetition_penalty=1.1),
    "processed head: all (top_k, top_p, min_p, 3 penalties)": SamplerSpec(
        temperature=0.9, top_k=50, top_p=0.95, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.2,
        frequency_penalty=0.1),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--logit_std", type=float, default=4.0)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=a.layers,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # the final norm leaves unit-RMS hidden states: logit std = weight std * sqrt(hidden)
        model.lm_head.weight.normal_(0.0, a.logit_std / cfg.hidden_size ** 0.5)
    add_fused_lm_head(model, temperature=0.9, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    L = a.prompt + a.completion
    ids = torch.randint(0, 2000, (a.batch, L))  # a narrow id range: completions repeat tokens, penalties bite
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : a.prompt] = -100
    times = {(v, g): [] for v in VARIANTS for g in (False, True)}
    for _ in range(a.repeats):
        for name, spec in VARIANTS.items():
            if spec is not None:
                add_processed_head(model, spec, fp32_lm_head=True)
            for grad in (False, True):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                with torch.set_grad_enabled(grad):
                    out = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
                    if grad:
                        out.log_probs.sum().backward()
                times[(name, grad)].append(time.perf_counter() - t0)
            if spec is not None:
                remove_processed_head(model)
    base = {g: statistics.median(times[(next(iter(VARIANTS)), g)]) for g in (False, True)}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"{a.layers} layers, batch {a.batch} x ({a.prompt} + {a.completion}) tokens, logit std {a.logit_std}, "
          f"{a.repeats} repeats\n")
    print("| variant | pass | min s | median s | max s | vs baseline |")
    print("|---|---|---|---|---|---|")
    for (name, grad), ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {'forward + backward' if grad else 'no-grad forward'} | {min(ts):.2f} | {med:.2f} | "
              f"{max(ts):.2f} | {med / base[grad]:.3f}x |")


if __name__ == "__main__":
    main()
