"""Teacher vs student on the student's temperature-1 samples, before any OPD
(README, "OPD + outcome reward"): for the first P level-3 OPD prompts of an
assets dir (the quickstart's organisms) x 4 samples, the share of right
samples and of groups with reward variance, the sampled-token reward
log p - log q (token mean) and the per-token reverse KL on right / wrong
samples, how often the teacher's argmax is the sampled token, and where a
wrong sample first leaves the reference completion: the teacher's
probability of the reference token and of the student's token there.

  python experiments/quickstart_grpo_start_stats.py WORKDIR/assets [P=64]
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from opd_jax import evaluation, sampling
from opd_jax.models import from_hf

A = sys.argv[1]
P = int(sys.argv[2]) if len(sys.argv) > 2 else 64
S = 4
tok = AutoTokenizer.from_pretrained(os.path.join(A, "tokenizer"))
st = from_hf(os.path.join(A, "student_sft/export_hf"))
te = from_hf(os.path.join(A, "teacher_sft/export_hf"))
rows = [json.loads(l) for l in open(os.path.join(A, "opd_prompts.jsonl"))][:P]
ids, pm = evaluation.encode_prompts(tok, [r["prompt"] for r in rows], max_prompt_len=8)
cfg = evaluation.sampling_config(
  tok, st.cfg, max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0, num_samples=S
)
out = sampling.sample(st, jnp.asarray(ids), jnp.asarray(pm), jax.random.PRNGKey(0), cfg)
fid, fm, fpos = sampling.concat_prompt_completion(out)
lp = lambda m: jax.nn.log_softmax(m(fid, attention_mask=fm, positions=fpos).astype(jnp.float32), -1)
Ls, Lt = np.asarray(lp(st)), np.asarray(lp(te))
tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
N = tokens.shape[1]
Pw = ids.shape[1]
ls = Ls[:, Pw - 1 : Pw - 1 + N]
lt = Lt[:, Pw - 1 : Pw - 1 + N]
texts = evaluation.decode_completions(tok, tokens, mask, cfg.eos_ids)
stats = {
  k: []
  for k in ["ok", "k1", "rkl", "agree", "dev_gold_q", "dev_stud_q", "dev_pos", "post_agree", "tlen"]
}
for i, t in enumerate(texts):
  g = rows[i // S]
  gold = g["completion"]
  ok = t.strip().endswith("ans=" + g["answer"])
  m = mask[i].astype(bool)
  n = m.sum()
  y = tokens[i, :n]
  lq, lpp = lt[i, np.arange(n), y], ls[i, np.arange(n), y]
  p = np.exp(ls[i, :n])
  rkl = (p * (ls[i, :n] - lt[i, :n])).sum(-1)
  agree = lt[i, :n].argmax(-1) == y
  stats["ok"].append(ok)
  stats["k1"].append((lpp - lq).mean())
  stats["rkl"].append(rkl.mean())
  stats["agree"].append(agree.mean())
  stats["tlen"].append(n)
  gold_ids = tok(gold, add_special_tokens=False)["input_ids"]
  d = next((j for j in range(min(n, len(gold_ids))) if y[j] != gold_ids[j]), None)
  if d is not None and not ok:
    stats["dev_pos"].append(d)
    stats["dev_gold_q"].append(np.exp(lt[i, d, gold_ids[d]]))
    stats["dev_stud_q"].append(np.exp(lt[i, d, y[d]]))
    stats["post_agree"].append(agree[d + 1 :].mean() if n > d + 1 else np.nan)
ok = np.array(stats["ok"])
f = lambda k, sel=None: np.nanmean(np.array(stats[k])[sel] if sel is not None else stats[k])
var = np.mean([0 < ok[j : j + S].sum() < S for j in range(0, len(ok), S)])
print(f"{A}: samples {len(ok)} correct {ok.mean():.3f}; groups w/ variance {var:.2f}")
print(f"  k1 (log p - log q, token mean)  right {f('k1', ok):.3f} wrong {f('k1', ~ok):.3f}")
print(f"  reverse KL per token           right {f('rkl', ok):.3f} wrong {f('rkl', ~ok):.3f}")
print(f"  teacher argmax == sample token right {f('agree', ok):.3f} wrong {f('agree', ~ok):.3f}")
print(
  f"  wrong rows: first deviation at token {f('dev_pos'):.1f}; teacher q(gold) there "
  f"{f('dev_gold_q'):.3f}, q(student's token) {f('dev_stud_q'):.3f}; "
  f"agree after it {f('post_agree'):.3f}"
)
