"""SmolLM2 SST-2 seed 0: source (T=1 build) vs selection at L/4 vs distilled at L/8, 200 test items."""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_deepthink import tasks
from vllm_deepthink.format import DeepThinkAdapter
from vllm_deepthink.tasks import scoring, calibration
from vllm_deepthink.tasks.datasets import open_task
from vllm_deepthink.producers.compress import compress_adapter, DistillSettings
from vllm_deepthink.producers.compress.queries import task_queries, task_choices

MODEL = "/work/wt/compress/models/smollm2-135m"
SRC = "/tmp/cmp_measure/src"
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(MODEL)
task = open_task("/work/shared/data/sst2")
src = DeepThinkAdapter.from_pretrained(SRC)
L = src.prefix_len
queries, info = task_queries(task, 256, 0, src.config.task["demo_indices"])
choices = task_choices(task)
rows = tasks.eval_rows(task, limit=200, seed=0)
items = scoring.items_from_rows(task, rows)
labels = [i.label for i in items]
out = {"L": L, "n_test": len(items), "queries": len(queries)}

def score(adapter):
    t = time.perf_counter()
    s = scoring.score_items_hf(model, tok, items, past_key_values=list(zip(adapter.keys, adapter.values)))
    return s, time.perf_counter() - t

def report(name, adapter, seconds=None):
    s, st = score(adapter)
    preds = scoring.predictions(s)
    r = {"prefix_len": adapter.prefix_len, "acc": scoring.accuracy(s, labels)["acc"],
         "build_seconds": seconds, "score_seconds": round(st, 1)}
    if name != "source":
        r["agreement_with_source"] = sum(a == b for a, b in zip(preds, out["source"]["preds"])) / len(preds)
        r["dev_record"] = adapter.config.compression["dev"]
    r["preds"] = preds
    out[name] = r
    print(name, {k: v for k, v in r.items() if k != "preds"}, flush=True)
    json.dump(out, open("/tmp/cmp_measure/result.json", "w"), indent=1)

report("source", src)
t = time.perf_counter()
sel = compress_adapter(src, model, tok, queries, prefix_len=round(L / 4), choices=choices, queries_info=info)
report("selection_L/4", sel, round(time.perf_counter() - t, 1))
t = time.perf_counter()
sel8 = compress_adapter(src, model, tok, queries, prefix_len=round(L / 8), choices=choices, queries_info=info)
report("selection_L/8", sel8, round(time.perf_counter() - t, 1))
t = time.perf_counter()
dist = compress_adapter(src, model, tok, queries, prefix_len=round(L / 8), choices=choices, queries_info=info,
                        distill=DistillSettings(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 60,
                                                         eval_every=10, patience=3),
                        on_step=lambda e: print(e, flush=True) if "dev_kl" in e else None)
dist.save_pretrained("/tmp/cmp_measure/distilled-L8")
report("distilled_L/8", dist, round(time.perf_counter() - t, 1))
