"""Pretraining recipe: tiny Llama teachers and student bases trained from scratch on the task data.

The run is seeded and resumable: a checkpoint (model, optimizer, RNG states, curriculum, log) is written
atomically every ``save_every`` steps to ``OUT/ckpt``; running the same command again resumes from it.
The final model is saved with ``save_pretrained`` (plus the word-level tokenizer) to ``OUT/final``.

Training sequences carry several queries per context (every box, or every question), each answer token
supervised; entity tracking uses a curriculum over the number of boxes, theory of mind one over story length and
question types, optionally with reverse follow-up questions and a warm start (see docs/PRETRAINING.md).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict

import torch

from fastcd.cli_args import PretrainArgs
from fastcd.errors import InputFileError, UsageError
from fastcd.io import atomic_target, write_json_atomic
from fastcd.metrics import accuracy_per_example
from fastcd.tasks import EntityTracking, TheoryOfMind, split_of
from fastcd.tokenizer import build_word_tokenizer


def _warm_start(cfg: PretrainArgs, tokenizer):
    """The model of ``cfg.init_from``, after checking that it has ``cfg``'s architecture and vocabulary."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(cfg.init_from, local_files_only=True)
    mc = model.config
    have = {"n_layers": mc.num_hidden_layers, "d_model": mc.hidden_size, "n_heads": mc.num_attention_heads,
            "n_kv_heads": mc.num_key_value_heads, "d_ff": mc.intermediate_size, "vocab": mc.vocab_size}
    want = {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads or cfg.n_heads, "d_ff": cfg.d_ff, "vocab": len(tokenizer)}
    diff = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
    if diff:
        raise UsageError(f"init_from: {cfg.init_from!r} differs from the requested model (have, want): {diff}")
    return model


def make_model(cfg: PretrainArgs, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(mc)


class SequenceMaker:
    """Training sequences with several supervised queries after one context."""

    def __init__(self, cfg: PretrainArgs, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        vocab = tokenizer.get_vocab()
        self.tom = TheoryOfMind()
        self.et = {n: EntityTracking(n_boxes=n) for n in range(cfg.min_boxes, cfg.max_boxes + 1)}
        if cfg.task == "entity-tracking":
            self.cue = (vocab["contains"], vocab["the"])
        else:
            self.cue = (vocab["Answer"], vocab[":"])

    def _et_text(self, rng: random.Random, level: int) -> tuple[str, int]:
        n = rng.randint(self.cfg.min_boxes, level)
        while True:
            ex = self.et[n].sample(rng)
            if split_of(ex.prompt) == "train":
                break
        m = ex.meta
        # Follow-up queries are drawn with replacement, so "answer the object not asked yet" (elimination)
        # is no shortcut: only the label-to-object binding answers them.
        k = n if self.cfg.queries <= 0 else self.cfg.queries
        text = ex.prompt + f" {ex.answer} ."
        for qi in [rng.randrange(n) for _ in range(k - 1)]:
            text += f" Box {m['labels'][qi]} contains the {m['objects'][qi]} ."
        return text, n

    def _tom_text(self, rng: random.Random, level: int = 3) -> tuple[str, int]:
        allowed = ("own", "observed", "unobserved")[: max(1, level)]
        while True:
            ex = self.tom.sample(rng)
            if split_of(ex.prompt) == "train" and ex.meta["question_type"] in allowed:
                break
        m = ex.meta
        if level == 0:
            # Short story: the binding sentences only, so that attention is spread over far fewer positions
            # while the container -> drink binding forms (the held-out prompts are always full stories).
            story = TheoryOfMind.binding_sentences(m["characters"], m["containers"], m["drinks"])
            ex = type(ex)(ex.task, story + ex.prompt[ex.prompt.index(" Question:"):], ex.answer, m)
        # Follow-up questions are drawn with replacement (as for entity tracking): asked once each, the second
        # own-container question is answered by elimination ("the other drink") without any binding.
        combos = [(c, k) for c in range(2) for k in range(2)
                  if TheoryOfMind.answer_for(c, k, tuple(m["sees"]), m["drinks"])[1] in allowed]
        k = 4 if self.cfg.queries <= 0 else self.cfg.queries
        text = ex.prompt + f" {ex.answer}"
        for c, kk in [rng.choice(combos) for _ in range(k - 1)]:
            if rng.random() < self.cfg.tom_reverse:
                asked = (f"What contains the {m['drinks'][kk]}?" if self.cfg.tom_reverse_form == "what"
                         else f"What does {m['characters'][c]} believe the {m['drinks'][kk]} contains?")
                text += f" Question: {asked} Answer: {m['containers'][kk]}"
                continue
            ans, _ = TheoryOfMind.answer_for(c, kk, tuple(m["sees"]), m["drinks"])
            text += (f" Question: What does {m['characters'][c]} believe the {m['containers'][kk]} contains?"
                     f" Answer: {ans}")
        return text, 0

    def batch(self, rng: random.Random, level: int):
        texts, sizes = [], []
        for _ in range(self.cfg.batch_size):
            t, n = self._et_text(rng, level) if self.cfg.task == "entity-tracking" else self._tom_text(rng, level)
            texts.append(t)
            sizes.append(n)
        enc = self.tok(texts, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        labels = torch.full_like(ids, -100)
        a, b = self.cue
        cue = (ids[:, :-2] == a) & (ids[:, 1:-1] == b)  # [batch, T-2]: token t is a, t+1 is b
        labels[:, 1:-1][cue] = ids[:, 2:][cue]  # predict the answer at the cue's second token
        return ids, enc["attention_mask"], labels, torch.tensor(sizes)


@torch.no_grad()
def evaluate(model, tokenizer, task, n: int, split: str = "val", batch_size: int = 256) -> dict:
    """Accuracy (argmax at the last position) on ``n`` held-out examples, split by question type for ToM."""
    examples = task.generate(n, seed=1234, split=split)
    model.eval()
    correct = accuracy_per_example(model, task.encode(examples, tokenizer), batch_size=batch_size)
    out = {"accuracy": sum(correct) / len(correct), "n": len(correct)}
    if isinstance(task, TheoryOfMind):
        for qt in ("own", "observed", "unobserved"):
            c = [ok for ok, ex in zip(correct, examples) if ex.meta["question_type"] == qt]
            out[f"accuracy_{qt}"] = sum(c) / max(1, len(c))
        # the "answer the true content" heuristic: right on own/observed, wrong on unobserved
        out["heuristic_accuracy"] = sum(ex.meta["question_type"] != "unobserved" for ex in examples) / len(examples)
    model.train()
    return out


def _lr_at(cfg: PretrainArgs, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _save_atomic(model, tokenizer, state: dict, path: str) -> None:
    with atomic_target(path, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, "state.pt"))


def pretrain(cfg: PretrainArgs, progress: bool = True) -> dict:
    """Train (or resume) a tiny model; returns the final evaluation."""
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt = os.path.join(cfg.out, "ckpt")
    tokenizer = build_word_tokenizer()
    task = EntityTracking(n_boxes=cfg.max_boxes) if cfg.task == "entity-tracking" else TheoryOfMind()
    maker = SequenceMaker(cfg, tokenizer)

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if os.path.isdir(ckpt):
        model = LlamaForCausalLM.from_pretrained(ckpt, local_files_only=True)
        state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
        if state["config"] != asdict(cfg):
            diff = {k: (state["config"].get(k), v) for k, v in asdict(cfg).items() if state["config"].get(k) != v}
            raise UsageError(f"{ckpt} was written by a run with a different configuration: {diff}")
    else:
        model = _warm_start(cfg, tokenizer) if cfg.init_from else make_model(cfg, tokenizer)
        state = None
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    step, level, ema, log = 0, (cfg.start_boxes if cfg.task == "entity-tracking" else cfg.tom_start_level), 0.0, []
    top_level = cfg.max_boxes if cfg.task == "entity-tracking" else 3
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, level, ema, log = state["step"], state["level"], state["ema"], state["log"]
        rng.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
    log_path = os.path.join(cfg.out, "log.jsonl")
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"pretrain {cfg.task}/{cfg.role}")
    t0 = time.time()
    done_early = False
    while step < cfg.steps and not done_early:
        ids, attn, labels, sizes = maker.batch(rng, level)
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        logits = model(input_ids=ids, attention_mask=attn).logits
        sel = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[sel], labels[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        with torch.no_grad():
            hit = (logits.argmax(-1) == labels) & sel  # [batch, T]
            if cfg.task == "entity-tracking":
                top = sizes == level
                acc = (hit[top].sum() / sel[top].sum().clamp(min=1)).item() if top.any() else ema
            else:
                acc = (hit.sum() / sel.sum()).item()
        ema = 0.95 * ema + 0.05 * acc
        if level < top_level and ema > cfg.curriculum_threshold:
            level += 1
            ema = 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{ema:.2f}", boxes=level)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = evaluate(model, tokenizer, task, cfg.eval_n)
            rec = {"step": step, "loss": loss.item(), "train_acc_ema": ema, "level": level,
                   "lr": _lr_at(cfg, step - 1), "elapsed_s": round(time.time() - t0, 1),
                   **{f"val_{k}": v for k, v in ev.items()}}
            log.append(rec)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if cfg.stop_at_accuracy is not None and ev["accuracy"] >= cfg.stop_at_accuracy:
                done_early = True
        if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
            done_early = True
        if step % cfg.save_every == 0 or step == cfg.steps or done_early:
            _save_atomic(model, tokenizer, {
                "optimizer": opt.state_dict(), "step": step, "level": level, "ema": ema, "log": log,
                "py_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "config": asdict(cfg),
            }, ckpt)
    bar.close()
    final = os.path.join(cfg.out, "final")
    model.eval()
    test = evaluate(model, tokenizer, task, max(cfg.eval_n, 1000), split="test")
    _save_atomic(model, tokenizer, {"config": asdict(cfg), "test": test, "steps": step}, final)
    write_json_atomic({"config": asdict(cfg), "test": test, "steps": step}, os.path.join(cfg.out, "result.json"))
    return test


CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json")


def export_checkpoint(src: str, dest: str, *, log: str | None = None, info: dict | None = None) -> str:
    """Copy a trained model (a run's ``final`` or ``ckpt`` directory) into a shippable checkpoint folder:
    weights, config and tokenizer (never the optimizer state), the training log and ``fastcd_checkpoint.json``
    (``info``: command, steps, accuracies)."""
    if not os.path.isfile(os.path.join(src, "model.safetensors")):
        raise InputFileError(f"src: {src!r} holds no model.safetensors")
    with atomic_target(dest, directory=True) as tmp:
        for name in CHECKPOINT_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        if log:
            shutil.copy2(log, os.path.join(tmp, "train_log.jsonl"))
        write_json_atomic(info or {}, os.path.join(tmp, "fastcd_checkpoint.json"))
    return dest


def shipped_checkpoint(name: str) -> str:
    """Path of a checkpoint shipped inside the package: ``et-teacher``, ``et-student``, ``tom-teacher`` ..."""
    path = os.path.join(os.path.dirname(__file__), "checkpoints", name)
    if not os.path.isdir(path):
        have = sorted(os.listdir(os.path.dirname(path))) if os.path.isdir(os.path.dirname(path)) else []
        raise InputFileError(f"name: no shipped checkpoint {name!r}; shipped: {have}")
    return path
