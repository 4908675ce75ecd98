"""The precision floor without an engine: a model's HF forward in fp32 against float64 on 8 x 32 tokens it samples
itself (T = 0.9, log-softmax in each dtype), and the fp32 forward batched vs one sequence at a time. What vLLM's fp32
gap is compared with in docs/BENCHMARKS.md ("Sensitivity inside the noise").

    .venv/bin/python bench/precision_floor.py tiny tiny-v152k qwen2.5-0.5b
"""
import sys, torch, json, time
sys.path.insert(0, "bench")
from models import model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer
for name in sys.argv[1:]:
    d = model_dir(name)
    tok = AutoTokenizer.from_pretrained(d)
    m32 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompts = [json.loads(l)["prompt"] for l in open(d/"prompts.jsonl").read().splitlines()[:8]]
    torch.manual_seed(0)
    b = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = m32.generate(**b, do_sample=True, temperature=0.9, max_new_tokens=32, top_k=0, top_p=1.0)
        attn = (out != -1).long(); attn[:, :b["input_ids"].shape[1]] = b["attention_mask"]
        P = b["input_ids"].shape[1]
        def lp(m, dt, batch=True):
            logits = m(input_ids=out, attention_mask=attn).logits[:, P-1:-1].to(dt) / 0.9
            return torch.log_softmax(logits, -1).gather(-1, out[:, P:, None])[..., 0].double()
        t0=time.time(); a = lp(m32, torch.float32); 
        m64 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
        t1=time.time(); c = lp(m64, torch.float64); t2=time.time()
        one = torch.cat([lp(m32, torch.float32)[i:i+1] for i in range(out.shape[0])])  # same batch
        one = torch.cat([ (lambda i: (m32(input_ids=out[i:i+1], attention_mask=attn[i:i+1]).logits[:, P-1:-1]/0.9).log_softmax(-1).gather(-1, out[i:i+1, P:, None])[...,0].double())(i) for i in range(out.shape[0])])
    r = (a-c).flatten(); s = (a-one).flatten()
    print(name, "fp32 vs fp64 mean|d|=%.3g p99=%.3g max=%.3g signed mean=%.3g ; fp32 self (batch vs 1) mean=%.3g max=%.3g ; fp32 %.1fs fp64 %.1fs" % (r.abs().mean(), r.abs().quantile(.99), r.abs().max(), r.mean(), s.abs().mean(), s.abs().max(), t1-t0, t2-t1))
