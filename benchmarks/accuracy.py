"""Accuracy of KCache settings against full attention, with the decode-time attention of the engine.

    python benchmarks/accuracy_data.py                       # once: fetch the text and QA data
    python benchmarks/accuracy.py                            # default model on CPU (float32)
    python benchmarks/accuracy.py --model PATH --device cuda --dtype bfloat16

The engine prefills a prompt densely and attends sparsely only in decode steps, so every metric is
taken on decode steps: a prompt is prefilled once (dense, shared by all settings) and then each
setting decodes after it through `kcache_dist.kcache.teacher_forced` (a block of known tokens run
as decode steps in one forward; `tests/test_accuracy_small.py` checks it against the engine).

Metrics, per setting, against full attention (mode "full") on the same prompts:
- perplexity of natural text (4 public-domain books) over decode positions that end at contexts of
  1K, 2K, 4K and 8K tokens (pooled, and per context length);
- top-1 agreement: how often the setting's argmax equals full attention's at those positions
  (pooled, and per context length);
- continuation exact match: the share of greedy continuations (16 tokens, started after a dense
  prompt of natural text) that equal full attention's token for token (pooled, and per context);
- passkey retrieval: a 5-digit key hidden at several depths of natural-text filler, prompts of
  1K, 2K, 4K and 8K tokens, answer decoded greedily;
- qa_wikidata exact match: a fixed sample of BIG-bench questions after a many-shot prompt.
Cost: V bytes fetched from host memory per generated token = sparse layers x KV heads x
min(top_n, far positions) x head_dim x dtype bytes, at each context length.

The sweep is a top_n ladder plus one knob at a time around a base point, plus context-scaled
budgets (`--only`, `--extra`, `--scaled` pick other sets). A setting is within the bound when no
metric loses more than 1% relative to full (perplexity per context length; the greedy-token
metrics pooled); the cheapest such setting (fewest V bytes summed over the context lengths) is
reported. Writes benchmarks/results/accuracy_<model>.json and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kcache_dist.config import KCacheConfig  # noqa: E402
from kcache_dist.kcache.teacher_forced import (  # noqa: E402
    ScaledTopN, TeacherForcedLM, far_rows_per_token, load_model)

import accuracy_data  # noqa: E402

FULL = KCacheConfig(mode="full")
DEFAULTS = KCacheConfig(mode="kcache")  # the library's defaults
QA_MIN_CAPACITY = 2048  # tokens: the 100-shot qa_wikidata prompt is ~1.7K
RELATIVE_BOUND = 0.01  # a setting is "within the bound" when every metric is within 1% of full's


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a KCacheConfig, optionally with a context-scaled top_n."""

    name: str
    kcache: KCacheConfig
    budget: Optional[ScaledTopN] = None
    family: str = "ladder"  # ladder | sink | window | dense | reduce | renorm | scaled | full | combo

    def to_json(self) -> dict:
        kc = dataclasses.asdict(self.kcache)
        return {"name": self.name, "family": self.family, "kcache": kc,
                "scaled_top_n": dataclasses.asdict(self.budget) if self.budget else None}

    def far_rows_per_token(self, seq_len: int, num_layers: int, num_kv_heads: int) -> int:
        return far_rows_per_token(seq_len, num_layers, num_kv_heads, self.kcache, self.budget)


def kc(**changes) -> KCacheConfig:
    return dataclasses.replace(DEFAULTS, **changes)


def sweep_settings(base_top_n: int, ladder: list[int], scaled: list[ScaledTopN]) -> list[Setting]:
    """full; the top_n ladder at the other defaults; each other knob changed alone around
    (defaults with top_n=base_top_n); context-scaled budgets at the other defaults."""
    settings = [Setting("full", FULL, family="full")]
    settings += [Setting(f"top_n={n}", kc(top_n=n)) for n in ladder]
    base = kc(top_n=base_top_n)
    one_at_a_time = [
        ("sink", "sink_tokens", [0, 16]),
        ("window", "recent_window", [32, 512]),
        ("dense", "dense_layers", [0, 4, 8]),
        ("reduce", "group_reduce", ["sum"]),
        ("renorm", "renormalize", [False]),
    ]
    for family, knob, values in one_at_a_time:
        for value in values:
            settings.append(Setting(f"top_n={base_top_n},{knob}={value}", dataclasses.replace(base, **{knob: value}),
                                    family=family))
    settings += [Setting(budget.label, kc(), budget, family="scaled") for budget in scaled]
    return settings


# ---------------------------------------------------------------------------------------------
# Per-setting tallies
# ---------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """Raw counts of one setting over all tasks, turned into metrics by `metrics()`."""

    nll_by_context: dict[int, float] = field(default_factory=dict)
    tokens_by_context: dict[int, int] = field(default_factory=dict)
    top1_agree_by_context: dict[int, int] = field(default_factory=dict)
    continuations_equal_by_context: dict[int, int] = field(default_factory=dict)
    continuations_by_context: dict[int, int] = field(default_factory=dict)
    passkey_correct: dict[int, int] = field(default_factory=dict)
    passkey_total: dict[int, int] = field(default_factory=dict)
    qa_correct: int = 0
    qa_same_as_full: int = 0
    qa_total: int = 0
    seconds: float = 0.0

    def add_block(self, context: int, nll: float, tokens: int, agree: int) -> None:
        self.nll_by_context[context] = self.nll_by_context.get(context, 0.0) + nll
        self.tokens_by_context[context] = self.tokens_by_context.get(context, 0) + tokens
        self.top1_agree_by_context[context] = self.top1_agree_by_context.get(context, 0) + agree

    def add_continuation(self, context: int, same: bool) -> None:
        self.continuations_equal_by_context[context] = self.continuations_equal_by_context.get(context, 0) + same
        self.continuations_by_context[context] = self.continuations_by_context.get(context, 0) + 1

    def metrics(self) -> dict:
        nll, tokens = sum(self.nll_by_context.values()), sum(self.tokens_by_context.values())
        passkey_c, passkey_t = sum(self.passkey_correct.values()), sum(self.passkey_total.values())
        agree = sum(self.top1_agree_by_context.values())
        cont_equal = sum(self.continuations_equal_by_context.values())
        cont_total = sum(self.continuations_by_context.values())
        return {
            "perplexity": math.exp(nll / tokens) if tokens else None,
            "perplexity_by_context": {str(c): math.exp(self.nll_by_context[c] / self.tokens_by_context[c])
                                      for c in sorted(self.nll_by_context)},
            "top1_agreement": agree / tokens if tokens else None,
            "top1_agreement_by_context": {str(c): self.top1_agree_by_context[c] / self.tokens_by_context[c]
                                          for c in sorted(self.tokens_by_context)},
            "continuation_exact_match": cont_equal / cont_total if cont_total else None,
            "continuation_exact_match_by_context": {
                str(c): self.continuations_equal_by_context[c] / self.continuations_by_context[c]
                for c in sorted(self.continuations_by_context)},
            "passkey_accuracy": passkey_c / passkey_t if passkey_t else None,
            "passkey_accuracy_by_length": {str(n): self.passkey_correct[n] / self.passkey_total[n]
                                           for n in sorted(self.passkey_total)},
            "qa_exact_match": self.qa_correct / self.qa_total if self.qa_total else None,
            "qa_same_answer_as_full": self.qa_same_as_full / self.qa_total if self.qa_total else None,
            "counts": {"decode_positions": tokens, "continuations": cont_total,
                       "passkey_prompts": passkey_t, "qa_questions": self.qa_total},
            "seconds": round(self.seconds, 2),
        }


@contextlib.contextmanager
def timed(tally: Tally):
    """Adds the wall time of the block to tally.seconds."""
    start = time.perf_counter()
    try:
        yield
    finally:
        tally.seconds += time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

def clean_text(text: str) -> str:
    """Join wrapped lines into paragraphs and drop the Bible's verse numbers."""
    lines = [re.sub(r"^\s*\d+\s+", "", line).strip() for line in text.splitlines()]
    paragraphs, current = [], []
    for line in lines:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def long_text_task(lm: TeacherForcedLM, docs: list[list[int]], settings: list[Setting], tallies: dict[str, Tally],
                   contexts: list[int], block_tokens: int, continuation_starts: int, continuation_tokens: int,
                   log) -> None:
    """Perplexity, top-1 agreement and continuation exact match on natural text.

    Per document (>= max(contexts) tokens): one dense prefill of the whole prefix, then for each
    context C, largest first, a decode block at positions [C-1-block_tokens, C-1) predicting the next
    token (the block's last step sees a context of C-1 tokens), and `continuation_starts` greedy
    continuations starting after dense prompts that end 0, 64, ... tokens before the block. Blocks
    run largest context first, so what a setting's decode overwrites is never needed again.
    """
    for d, doc in enumerate(docs):
        top = max(contexts)
        t0 = time.perf_counter()
        lm.truncate(0)
        hidden = lm.prefill(doc[:top - 1])  # final hidden states of the dense prefix
        log(f"doc {d}: dense prefill of {top - 1} tokens in {time.perf_counter() - t0:.1f} s")
        for context in sorted(contexts, reverse=True):
            start = context - 1 - block_tokens
            inputs, targets = doc[start:context - 1], torch.tensor(doc[start + 1:context], device=lm.device)
            full_argmax = None
            for s in settings:  # full first
                with timed(tallies[s.name]):
                    lm.truncate(start)
                    logits = lm.decode(inputs, s.kcache, s.budget)
                    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                    argmax = logits.argmax(-1)
                    if full_argmax is None:
                        full_argmax = argmax
                    tallies[s.name].add_block(context, nll, len(inputs), int((argmax == full_argmax).sum()))
            for c in range(continuation_starts):
                prompt_end = start - 64 * c
                first = int(lm.logits(hidden[prompt_end - 1:prompt_end])[0].argmax())
                reference = None
                for s in settings:
                    with timed(tallies[s.name]):
                        lm.truncate(prompt_end)
                        if reference is None:  # full attention's continuation, step by step
                            reference = lm.greedy(first, continuation_tokens, s.kcache, s.budget)
                            same = True
                        else:
                            same = lm.reproduces(reference, s.kcache, s.budget)
                        tallies[s.name].add_continuation(context, same)
        log(f"doc {d}: done in {time.perf_counter() - t0:.1f} s; seconds per setting so far: "
            + ", ".join(f"{s.name} {tallies[s.name].seconds:.0f}" for s in settings))


PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n\n")
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. The pass key is {key}.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompts(tokenizer, filler: list[int], lengths: list[int], depths: list[float], answer_tokens: int,
                    seed: int) -> list[tuple[int, float, str, list[int]]]:
    """(length, depth, key, prompt ids): the needle after `depth` of the filler, the prompt
    `length - answer_tokens` tokens long. The same filler text in every prompt, so prompts share
    their dense prefix up to the earlier needle."""
    rng = random.Random(seed)
    intro, question = tokenizer.encode(PASSKEY_INTRO), tokenizer.encode(PASSKEY_QUESTION)
    prompts = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key))
            num_filler = length - answer_tokens - len(intro) - len(needle) - len(question)
            cut = int(depth * num_filler)
            prompts.append((length, depth, key, intro + filler[:cut] + needle + filler[cut:num_filler] + question))
    return prompts


def first_number(text: str) -> Optional[str]:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def passkey_task(lm: TeacherForcedLM, tokenizer, prompts, settings: list[Setting], tallies: dict[str, Tally],
                 answer_tokens: int, log) -> list[dict]:
    """Greedy answers after each prompt; correct when the first number in the answer is the key."""
    records = []
    for length, depth, key, ids in sorted(prompts, key=lambda p: p[3]):  # shared prefixes adjacent
        t0 = time.perf_counter()
        first = int(lm.logits(lm.prefill_shared(ids)[None])[0].argmax())
        reference, answers = None, {}
        for s in settings:
            with timed(tallies[s.name]):
                lm.truncate(len(ids))
                if reference is None:
                    reference = got = lm.greedy(first, answer_tokens, s.kcache, s.budget)
                else:
                    got = lm.greedy_like(reference, answer_tokens, s.kcache, s.budget)
                text = tokenizer.decode(got)
                correct = first_number(text) == key
                t = tallies[s.name]
                t.passkey_correct[length] = t.passkey_correct.get(length, 0) + int(correct)
                t.passkey_total[length] = t.passkey_total.get(length, 0) + 1
                answers[s.name] = text
        records.append({"length": length, "depth": depth, "key": key, "full_answer": answers["full"],
                        "correct_settings": sum(first_number(a) == key for a in answers.values())})
        log(f"passkey {length} @{depth:.1f}: full answered {answers['full']!r} (key {key}), "
            f"{time.perf_counter() - t0:.1f} s")
    lm.truncate(0)
    return records


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def qa_task(lm: TeacherForcedLM, tokenizer, examples: list[dict], settings: list[Setting], tallies: dict[str, Tally],
            num_questions: int, num_shots: int, answer_tokens: int, seed: int, log) -> dict:
    """qa_wikidata: a fixed many-shot prompt ("Q: ...\\nA: ...\\n\\n" x num_shots), then
    "Q: <question>\\n"; the model writes "A: <answer>" in decode steps (only "A" comes from the
    prefill); exact match of the normalized answer line with any target."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(examples)), num_shots + num_questions)
    shots, questions = [examples[i] for i in picked[:num_shots]], [examples[i] for i in picked[num_shots:]]

    def target_list(ex):
        return ex["target"] if isinstance(ex["target"], list) else [ex["target"]]

    prefix = "".join(f"Q: {ex['input']}\nA: {target_list(ex)[0]}\n\n" for ex in shots)
    newline = tokenizer.encode("\n")[-1]
    stop = (newline,) + tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    prefix_ids = tokenizer.encode(prefix)
    if len(prefix_ids) + 64 > lm.capacity:
        raise ValueError(f"the {num_shots}-shot QA prompt ({len(prefix_ids)} tokens) does not fit a "
                         f"{lm.capacity}-token sequence: lower --qa-shots")
    t0 = time.perf_counter()
    for q in questions:
        ids = prefix_ids + tokenizer.encode(f"Q: {q['input']}\n")
        first = int(lm.logits(lm.prefill_shared(ids)[None])[0].argmax())
        targets = {normalize_answer(t) for t in target_list(q)}
        reference, full_answer = None, None
        for s in settings:
            with timed(tallies[s.name]):
                lm.truncate(len(ids))
                if reference is None:
                    reference = got = lm.greedy(first, answer_tokens, s.kcache, s.budget, stop)
                else:
                    got = lm.greedy_like(reference, answer_tokens, s.kcache, s.budget, stop)
                line = tokenizer.decode(got).split("\n")[0]
                answer = normalize_answer(line.split(":", 1)[1] if ":" in line else line)
                if full_answer is None:
                    full_answer = answer
                t = tallies[s.name]
                t.qa_correct += int(answer in targets)
                t.qa_same_as_full += int(answer == full_answer)
                t.qa_total += 1
    lm.truncate(0)
    log(f"qa: {num_questions} questions after a {len(prefix_ids)}-token prompt in {time.perf_counter() - t0:.1f} s")
    return {"num_shots": num_shots, "prompt_tokens": len(prefix_ids), "num_questions": num_questions}


# ---------------------------------------------------------------------------------------------
# Summary: relative to full, cost, the cheapest setting within the bound
# ---------------------------------------------------------------------------------------------

def relative_to_full(metrics: dict, full: dict) -> dict:
    """Each metric's relative change against full attention (perplexity: increase; the others:
    loss), and the worst of them."""
    rel = {}
    for c, ppl in metrics["perplexity_by_context"].items():
        rel[f"perplexity@{c}"] = ppl / full["perplexity_by_context"][c] - 1
    rel["perplexity"] = metrics["perplexity"] / full["perplexity"] - 1
    for key in ("top1_agreement", "continuation_exact_match", "passkey_accuracy", "qa_exact_match"):
        if metrics[key] is not None and full[key]:
            rel[key] = 1 - metrics[key] / full[key]
    rel["worst"] = max(rel.values())
    return rel


def cost(setting: Setting, contexts: list[int], num_layers: int, num_kv_heads: int, head_dim: int,
         dtype_bytes: int) -> dict:
    """V bytes read from host memory per generated token at each context length."""
    return {str(c): setting.far_rows_per_token(c, num_layers, num_kv_heads) * head_dim * dtype_bytes
            for c in contexts}


def recommend(results: list[dict], bound: float) -> Optional[dict]:
    """The setting with the fewest V bytes per token (summed over the context lengths) whose every
    metric is within `bound` of full attention's."""
    within = [r for r in results if r["setting"]["name"] != "full" and r["relative_to_full"]["worst"] <= bound]
    return min(within, key=lambda r: sum(r["v_bytes_per_token"].values()), default=None)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def plot(results: list[dict], contexts: list[int], path_prefix: str, bound: float, title: str) -> list[str]:
    """Two PNGs: perplexity increase vs V bytes per token at each context length; every metric's
    relative loss vs V bytes per token at the longest context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"ladder": "o-", "sink": "s", "window": "^", "dense": "D", "reduce": "v", "renorm": "P",
               "scaled": "*", "combo": "X"}
    rows = [r for r in results if r["setting"]["family"] != "full"]

    def scatter(ax, x_of, y_of):
        for family, style in markers.items():
            pts = [(x_of(r), y_of(r), r["setting"]["name"]) for r in rows if r["setting"]["family"] == family]
            if not pts:
                continue
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, style, label=family, markersize=6 if family != "scaled" else 10)
            if family == "ladder":
                for x, y, name in pts:
                    ax.annotate(name.split("=")[1], (x, y), fontsize=7, xytext=(2, 3), textcoords="offset points")
        ax.axhline(100 * bound, color="red", lw=0.8, ls="--")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)

    paths = []
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, c in zip(axes, contexts):
        scatter(ax, lambda r: max(r["v_bytes_per_token"][str(c)], 1) / 1024,
                lambda r: 100 * r["relative_to_full"][f"perplexity@{c}"])
        ax.set_title(f"context {c} tokens")
        ax.set_xlabel("V KiB fetched per generated token")
    axes[0].set_ylabel("perplexity increase vs full (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: perplexity vs V bytes fetched (red: {100 * bound:g}% bound)")
    fig.tight_layout()
    paths.append(f"{path_prefix}_perplexity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    top = str(max(contexts))
    keys = [("top1_agreement", "top-1 disagreement with full (%)"),
            ("continuation_exact_match", "continuations differing from full (%)"),
            ("passkey_accuracy", "passkey accuracy loss vs full (%)"),
            ("qa_exact_match", "qa_wikidata EM loss vs full (%)")]
    keys = [(key, label) for key, label in keys if any(key in r["relative_to_full"] for r in rows)]
    if not keys:
        return paths
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    axes = axes[0]
    for ax, (key, label) in zip(axes, keys):
        scatter(ax, lambda r: max(r["v_bytes_per_token"][top], 1) / 1024,
                lambda r, key=key: 100 * r["relative_to_full"].get(key, float("nan")))
        ax.set_ylabel(label)
        ax.set_xlabel(f"V KiB per generated token at {top} tokens")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: generation metrics vs V bytes fetched (red: {100 * bound:g}% bound)")
    fig.tight_layout()
    paths.append(f"{path_prefix}_metrics.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="KCache accuracy sweep against full attention")
    p.add_argument("--model", default=None, help="local HF checkpoint directory (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="context lengths (tokens)")
    p.add_argument("--block-tokens", type=int, default=128, help="decode positions per (document, context)")
    p.add_argument("--docs", default="alice29.txt,lcet10.txt,plrabn12.txt,bible_kjv.txt",
                   help="perplexity texts (names from accuracy_data)")
    p.add_argument("--continuation-starts", type=int, default=2, help="greedy continuations per (document, context)")
    p.add_argument("--continuation-tokens", type=int, default=16)
    p.add_argument("--passkey-depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--qa-questions", type=int, default=150)
    p.add_argument("--qa-shots", type=int, default=100)
    p.add_argument("--ladder", default="16,32,64,128,256,512,1024,2048,4096", help="top_n values at the other defaults")
    p.add_argument("--base-top-n", type=int, default=256, help="top_n of the one-knob-at-a-time variations")
    p.add_argument("--scaled", default="0.125:256:8192;0.25:256:8192;0.5:256:8192",
                   help="context-scaled budgets 'fraction:floor:cap;...' (top_n = clamp(fraction * L, floor, cap))")
    p.add_argument("--extra", default="", help="extra settings: ';'-separated 'key=value,...' KCacheConfig fields")
    p.add_argument("--only", default="", help="comma-separated setting names to keep (plus full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/accuracy_<model>.json)")
    return p.parse_args(argv)


def parse_extra(spec: str) -> list[Setting]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        changes = {}
        for kv in item.split(","):
            key, value = kv.split("=")
            field_type = type(getattr(DEFAULTS, key))
            changes[key] = value == "true" if field_type is bool else field_type(value)
        out.append(Setting(item, kc(**changes), family="combo"))
    return out


def model_choice(model: Optional[str], device: str, dtype: Optional[str]) -> tuple[str, str, torch.device, torch.dtype]:
    """(checkpoint directory, short name, device, dtype) of --model / --device / --dtype: the
    embedded SmolLM2 when no model is given; float32 on CPU and bfloat16 elsewhere by default."""
    if model is None:
        from kcache_dist.default_model import default_model_dir
        model_dir, model_name = default_model_dir(), "smollm2-135m"
    else:
        model_dir, model_name = model, os.path.basename(os.path.normpath(model)).lower()
    where = torch.device(device)
    return model_dir, model_name, where, getattr(torch, dtype or ("float32" if where.type == "cpu" else "bfloat16"))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - wall0:7.1f}s cpu {time.process_time() - cpu0:7.1f}s] {msg}", flush=True)

    from transformers import AutoTokenizer
    model_dir, model_name, device, dtype = model_choice(args.model, args.device, args.dtype)
    contexts = [int(c) for c in args.contexts.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    capacity = max(contexts + [QA_MIN_CAPACITY if args.qa_questions else 0])
    model = load_model(model_dir, device, dtype, capacity)
    lm = TeacherForcedLM(model, capacity=capacity)
    attn = model.model.layers[0].self_attn
    num_layers, num_kv_heads, head_dim = lm.num_layers, attn.num_kv_heads, attn.attn.head_dim

    scaled = [ScaledTopN(float(f), int(lo), int(hi)) for f, lo, hi in
              (item.split(":") for item in args.scaled.split(";") if item)]
    settings = sweep_settings(args.base_top_n, [int(n) for n in args.ladder.split(",") if n], scaled)
    settings += parse_extra(args.extra)
    if args.only:
        keep = set(args.only.split(";"))
        settings = [s for s in settings if s.name == "full" or s.name in keep]
    tallies = {s.name: Tally() for s in settings}
    log(f"model {model_dir} ({num_layers} layers, {num_kv_heads} KV heads, head_dim {head_dim}, {dtype}), "
        f"{len(settings)} settings, {args.threads} threads")

    data = accuracy_data.ensure_data()
    named = {p.name: p for p in data["books"]} | {"bible_kjv.txt": data["bible"]}
    top = max(contexts)
    docs = []
    for name in args.docs.split(","):
        ids = tokenizer.encode(clean_text(open(named[name], encoding="utf-8").read()))
        if len(ids) < top:
            raise ValueError(f"{name} has {len(ids)} tokens, fewer than the longest context {top}")
        docs.append(ids[:top])
    phases = {}
    t = time.process_time()
    long_text_task(lm, docs, settings, tallies, contexts, args.block_tokens, args.continuation_starts,
                   args.continuation_tokens, log)
    phases["long_text_cpu_s"] = time.process_time() - t

    t = time.process_time()
    filler = tokenizer.encode(clean_text(open(named["asyoulik.txt"], encoding="utf-8").read()))
    answer_tokens = 8
    prompts = passkey_prompts(tokenizer, filler, contexts, [float(d) for d in args.passkey_depths.split(",") if d],
                              answer_tokens, args.seed)
    passkey_records = passkey_task(lm, tokenizer, prompts, settings, tallies, answer_tokens, log)
    phases["passkey_cpu_s"] = time.process_time() - t

    t = time.process_time()
    qa_info = {}
    if args.qa_questions:
        qa_info = qa_task(lm, tokenizer, accuracy_data.load_qa_examples(), settings, tallies, args.qa_questions,
                          args.qa_shots, 12, args.seed, log)
    phases["qa_cpu_s"] = time.process_time() - t

    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    full_metrics = tallies["full"].metrics()
    results = []
    for s in settings:
        m = tallies[s.name].metrics()
        results.append({"setting": s.to_json(), "metrics": m, "relative_to_full": relative_to_full(m, full_metrics),
                        "v_bytes_per_token": cost(s, contexts, num_layers, num_kv_heads, head_dim, dtype_bytes)})
    best = recommend(results, RELATIVE_BOUND)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"accuracy_{model_name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    summary = {
        "model": model_name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": args.threads, "args": vars(args), "contexts": contexts, "bound": RELATIVE_BOUND,
        "v_bytes_formula": "sparse layers x KV heads x min(top_n, far) x head_dim x dtype bytes",
        "qa": qa_info, "passkey": passkey_records,
        "recommended": best["setting"] if best else None,
        "cpu_seconds": round(time.process_time() - cpu0, 1), "wall_seconds": round(time.perf_counter() - wall0, 1),
        "phase_cpu_seconds": {k: round(v, 1) for k, v in phases.items()},
        "results": results,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    try:
        pngs = plot(results, contexts, out.removesuffix(".json"), RELATIVE_BOUND, model_name)
    except ImportError:
        pngs = ["no plots: matplotlib is not installed (pip install matplotlib)"]
    log(f"wrote {out} and {', '.join(pngs)}")
    print_table(results, contexts)
    print("recommended (cheapest within the bound):", best["setting"]["name"] if best else "none")


def print_table(results: list[dict], contexts: list[int]) -> None:
    """A Markdown table: settings vs metrics vs V bytes per token."""
    ctx_cols = " | ".join(f"ppl@{c // 1024}K" for c in contexts)
    print(f"| setting | {ctx_cols} | top-1 agree | cont. EM | passkey | QA EM | V KiB/token @"
          f"{', '.join(f'{c // 1024}K' for c in contexts)} | worst rel. |")
    print("|" + " --- |" * (len(contexts) + 7))
    for r in results:
        m, rel = r["metrics"], r["relative_to_full"]
        ppl = " | ".join(f"{m['perplexity_by_context'][str(c)]:.3f}" for c in contexts)
        kib = ", ".join(f"{r['v_bytes_per_token'][str(c)] / 1024:.0f}" for c in contexts)
        fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        print(f"| {r['setting']['name']} | {ppl} | {fmt(m['top1_agreement'])} | {fmt(m['continuation_exact_match'])} | "
              f"{fmt(m['passkey_accuracy'])} | {fmt(m['qa_exact_match'])} | {kib} | {100 * rel['worst']:+.2f}% |")


if __name__ == "__main__":
    main()
