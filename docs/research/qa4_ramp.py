"""The ramp probe behind docs/research.md's eighth Reasoning search: a curriculum of task
forms where each new form is *ramped in* (its share of every batch rises linearly from
--start-share to 1 over --ramp steps, the rest drawn from the form before) instead of
switched or mixed from the start. The next form comes in once the newest one's training
accuracy over the last 100 steps reaches --switch-when. Validation: 1000 examples of the
whole task, by question kind. The project's own version of this is train.form_curriculum
(benchmarks/reasoning_search.py --recipes escape-forms-100k).

It reuses the plain-BERT probe's model, data and evaluation, ../shared/research/qa4_probe.py
(a research tool, not project code); run it from the project root:

  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python docs/research/qa4_ramp.py --ramp 1000 \
      --stages "23,middle,one,middle;23,any,one,middle;23,any,both,middle;23,any,both,any" --seed 0

A stage is "tokens,wording,qform,subject" as in qa4_probe.py, with ",anywhere" at the end for
facts at random token offsets among the noise (place_facts_anywhere).
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "shared" / "research"))
import qa4_probe as P
from rmt.data.generator import SPLITS, stable_int
from rmt.data.tasks.base import PLACES


def place_facts_anywhere(data, seed):
    """Facts at random token offsets in the noise instead of at noise-sentence starts: at a few
    tokens more than the facts and question, the generator's own placement keeps the facts side
    by side at the start (no sentence starts in so little noise); this moves them by a few tokens."""
    original = data.gen.layout

    def layout(split, index, num_tokens):
        placed = original(split, index, num_tokens)
        rng = np.random.default_rng([seed, SPLITS.index(split), index, num_tokens, stable_int("anywhere")])
        offsets = tuple(sorted(int(o) for o in rng.integers(0, placed.noise_length + 1, size=len(placed.fact_ids))))
        return dataclasses.replace(placed, noise_offsets=offsets)

    data.gen.layout = layout
    return data


def build_model(a, base, vocab_size):
    """--backbone: the probe's BERT; the same shape with rotary positions (Hugging Face's
    RoFormer), built from a config; or the pretrained MiniLM the package ships, whole."""
    from transformers import BertForSequenceClassification, RoFormerConfig, RoFormerForSequenceClassification

    if a.backbone == "bert":
        return P.build_model(argparse.Namespace(**base), vocab_size, len(PLACES))
    if a.backbone == "minilm":
        return BertForSequenceClassification.from_pretrained(P.resolve(P.MINILM), num_labels=len(PLACES),
                                                             hidden_dropout_prob=a.dropout,
                                                             attention_probs_dropout_prob=a.dropout)
    config = RoFormerConfig(vocab_size=vocab_size, embedding_size=a.hidden, hidden_size=a.hidden,
                            num_hidden_layers=a.layers, num_attention_heads=a.heads, intermediate_size=4 * a.hidden,
                            hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout,
                            num_labels=len(PLACES))
    return RoFormerForSequenceClassification(config)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stages", default="23,middle,one,middle;23,any,one,middle;23,any,both,middle;23,any,both,any")
    p.add_argument("--ramp", type=int, default=1000)
    p.add_argument("--start-share", type=float, default=0.1)
    p.add_argument("--switch-when", type=float, default=0.95)
    p.add_argument("--tokens", type=int, default=23)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--backbone", choices=["bert", "roformer", "minilm"], default="bert",
                   help="roformer: rotary positions, whose reading of a sentence does not depend on where it sits; "
                        "minilm: the pretrained MiniLM the package ships, whole (its own vocabulary and width)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=120)
    a = p.parse_args()
    torch.set_num_threads(1); torch.manual_seed(a.seed)
    print(vars(a), flush=True)
    # A pretrained backbone reads the tokenizer's own ids; the others get a compact vocabulary.
    base = dict(model="hf", layers=a.layers, hidden=a.hidden, heads=a.heads, dropout=a.dropout, prenorm=False,
                pos="abs", wording="any", qform="both", subject="any", tokens=a.tokens, seed=a.seed,
                compact=a.backbone != "minilm")
    full = P.Data(argparse.Namespace(**base))
    valid = full.batch("valid", range(1000))
    forms = []
    for item in a.stages.split(";"):
        n, wording, qform, subject, *placement = item.split(",")
        form = P.Data(argparse.Namespace(**{**base, "tokens": int(n), "wording": wording, "qform": qform, "subject": subject}))
        forms.append(place_facts_anywhere(form, a.seed) if placement == ["anywhere"] else form)
    model = build_model(a, base, full.vocab)
    decay = [q for q in model.parameters() if q.ndim >= 2]
    nodecay = [q for q in model.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": nodecay, "weight_decay": 0.0}], lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    stage, stage_start, new_hits, losses, hits = 0, 0, [], [], []
    start = time.time()
    for step in range(a.steps):
        since = step - stage_start
        share = 1.0 if stage == 0 else min(1.0, a.start_share + (1 - a.start_share) * since / max(1, a.ramp))
        n_new = int(round(share * 64))
        idx = np.arange(step * 64, (step + 1) * 64) + 10_000_000 * (a.seed + 1)
        parts = [forms[stage].batch("train", idx[:n_new])]
        if n_new < 64:
            parts.append(forms[stage - 1].batch("train", idx[n_new:]))
        # Forms of different lengths in one batch: right-padded, the padding masked out.
        width = max(x[0].shape[1] for x in parts)
        ids = torch.cat([F.pad(x[0], (0, width - x[0].shape[1])) for x in parts])
        mask = torch.cat([F.pad(torch.ones_like(x[0]), (0, width - x[0].shape[1])) for x in parts])
        labels = torch.cat([x[1] for x in parts])
        out = model(ids, attention_mask=mask).logits
        loss = F.cross_entropy(out, labels)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        ok = (out.argmax(-1) == labels).float()
        losses.append(loss.item()); hits.append(ok.mean().item()); new_hits.append(ok[:n_new].mean().item())
        if (stage + 1 < len(forms) and share >= 1.0 and since >= 100 and np.mean(new_hits[-100:]) >= a.switch_when):
            stage, stage_start, new_hits = stage + 1, step + 1, []
            print(f"stage {stage} ramping in at step {step + 1}: {a.stages.split(';')[stage]}", flush=True)
        if (step + 1) % a.eval_every == 0:
            acc, end, mid = P.evaluate(model, valid)
            m = (time.time() - start) / 60
            print(f"step {step + 1:5d} {m:6.2f} min stage {stage} share {share:.2f} loss {np.mean(losses[-a.eval_every:]):.3f} "
                  f"train acc {np.mean(hits[-a.eval_every:]):.3f} new-form acc {np.mean(new_hits[-100:]) if new_hits else 0:.3f}  "
                  f"valid {acc:.3f} end {end:.3f} middle {mid:.3f}", flush=True)
            if acc >= 0.99 or m > a.max_minutes:
                break


if __name__ == "__main__":
    main()
