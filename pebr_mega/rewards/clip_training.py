"""Contrastive training of a (tiny) CLIP on image/description pairs with hard negatives, so that the stage-1
CLIP reward carries signal.

The stage-1 reward maps a cosine similarity to `1 if sim >= threshold else max(sim, 0) / threshold`
(`rewards.clip.similarity_to_reward`). A CLIP that only ranks the true description first is not enough:
if a description with one wrong count also scores above the threshold, both get reward 1 and the policy
learns nothing. So the objective has two parts:

    InfoNCE, image -> text over the batch's true descriptions and the image's own hard negatives (each a
    description with one perception error: a count one off, a colour or a shape replaced), and text -> image
    over the batch's images (duplicated descriptions masked out), at a fixed temperature;
    + a hinge that places the levels: relu(threshold + positive_margin - sim(true))
                                         + relu(sim(hard negative) - negative_ceiling)

Inputs go through the reward scorer's own preprocessing (`ClipAlignmentScorer.pixel_values` and
`text_inputs`), so what the CLIP is trained on is what it scores. Everything is drawn from `cfg.seed`
(torch and `random`) and training runs on one thread, so the same pairs and config give the same weights on
the same machine.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pebr_mega.rewards.clip import ClipAlignmentScorer, _features, similarity_to_reward


@dataclass
class ClipTrainingConfig:
    """Optimisation and objective of `train_clip` (defaults: the demo's, ~1 min on 2 CPU cores)."""

    steps: int = 800
    batch_size: int = 32  # images per step
    negatives: int = 4  # hard negatives per image per step, drawn from its pool
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    temperature: float = 0.05  # InfoNCE temperature
    threshold: float = 0.4  # the CLIP reward's saturation point (rewards.clip_threshold)
    positive_margin: float = 0.1  # true descriptions are pushed to >= threshold + margin
    negative_ceiling: float = 0.0  # hard negatives are pushed to <= this (reward <= ceiling / threshold)
    hinge_weight: float = 4.0
    seed: int = 0


@dataclass
class ClipPair:
    """One image (PIL), its true description and a pool of hard-negative descriptions."""

    image: Any
    text: str
    negatives: list[str] = field(default_factory=list)


def _lr_factor(step: int, cfg: ClipTrainingConfig) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class _Encoded:
    """Every pair's pixels and every distinct text's tokens, computed once through the scorer's preprocessing."""

    def __init__(self, scorer: ClipAlignmentScorer, pairs: Sequence[ClipPair]) -> None:
        import torch

        self.pixels = torch.cat([scorer.pixel_values([p.image for p in pairs[i:i + 256]])
                                 for i in range(0, len(pairs), 256)]).float()
        texts = list(dict.fromkeys(t for p in pairs for t in [p.text, *p.negatives]))
        self.index = {t: i for i, t in enumerate(texts)}
        self.tokens = scorer.text_inputs(texts)
        self.text_ids = torch.tensor([self.index[p.text] for p in pairs])

    def texts(self, ids: Any) -> dict[str, Any]:
        return {k: v[ids] for k, v in self.tokens.items()}


def _embed(scorer: ClipAlignmentScorer, pixels: Any = None, tokens: dict | None = None) -> Any:
    import torch

    m = scorer.model
    if pixels is not None:
        out = _features(m.get_image_features(pixel_values=pixels))
    else:
        out = _features(m.get_text_features(**tokens, **scorer._text_kwargs))
    return torch.nn.functional.normalize(out.float(), dim=-1)


def clip_loss(img: Any, txt: Any, neg: Any, same_text: Any, cfg: ClipTrainingConfig) -> tuple[Any, dict]:
    """The objective (module docstring) for image embeddings [B, D], their true text embeddings [B, D], hard
    negatives [B, K, D] and `same_text` [B, B] (True where two images have the same description)."""
    import torch
    import torch.nn.functional as F

    b = img.shape[0]
    batch = img @ txt.T  # [B, B]
    hard = torch.einsum("bd,bkd->bk", img, neg)  # [B, K]
    pos = batch.diagonal()
    others = same_text & ~torch.eye(b, dtype=torch.bool)
    masked = batch.masked_fill(others, float("-inf"))
    target = torch.arange(b)
    i2t = F.cross_entropy(torch.cat([masked, hard], dim=1) / cfg.temperature, target)
    t2i = F.cross_entropy(masked.T / cfg.temperature, target)
    hinge = (F.relu(cfg.threshold + cfg.positive_margin - pos).mean()
             + F.relu(hard - cfg.negative_ceiling).mean())
    loss = 0.5 * (i2t + t2i) + cfg.hinge_weight * hinge
    with torch.no_grad():
        stats = {"loss": float(loss), "sim_true": float(pos.mean()), "sim_hard": float(hard.mean()),
                 "hard_accuracy": float((pos[:, None] > hard).float().mean())}
    return loss, stats


def train_clip(model_dir: str | Path, pairs: Sequence[ClipPair], cfg: ClipTrainingConfig | None = None,
               image_size: int = 336, max_text_tokens: int = 248, out_dir: str | Path | None = None,
               log: Callable[[str], None] | None = print) -> dict[str, float]:
    """Train the CLIP in `model_dir` on `pairs` and save it to `out_dir` (default: in place); returns the
    last steps' mean loss and similarities and the seconds taken."""
    import torch

    cfg = cfg or ClipTrainingConfig()
    if not pairs:
        raise ValueError("no image/description pairs to train the CLIP on")
    if any(not p.negatives for p in pairs):
        raise ValueError("every pair needs at least one hard negative")
    threads = torch.get_num_threads()
    # The model is so small that one thread is as fast as two, and on a busy machine much faster.
    torch.set_num_threads(1)
    try:
        return _train(model_dir, pairs, cfg, image_size, max_text_tokens, out_dir, log)
    finally:
        torch.set_num_threads(threads)


def _train(model_dir: str | Path, pairs: Sequence[ClipPair], cfg: ClipTrainingConfig, image_size: int,
           max_text_tokens: int, out_dir: str | Path | None, log: Callable[[str], None] | None) -> dict[str, float]:
    import torch

    t0 = time.perf_counter()
    scorer = ClipAlignmentScorer(model_dir, "cpu", image_size, max_text_tokens)
    enc = _Encoded(scorer, pairs)
    rng = random.Random(f"pebr-clip-train/{cfg.seed}")
    torch.manual_seed(cfg.seed)
    model = scorer.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    order: list[int] = []
    recent: list[dict] = []
    for step in range(cfg.steps):
        while len(order) < cfg.batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        neg_ids = [[enc.index[t] for t in _draw(rng, pairs[i].negatives, cfg.negatives)] for i in idx]
        ids = torch.tensor(idx)
        text_ids = enc.text_ids[ids]
        flat_neg = torch.tensor([t for row in neg_ids for t in row])
        all_txt = _embed(scorer, tokens=enc.texts(torch.cat([text_ids, flat_neg])))
        img = _embed(scorer, pixels=enc.pixels[ids])
        txt, neg = all_txt[:len(idx)], all_txt[len(idx):].view(len(idx), cfg.negatives, -1)
        loss, stats = clip_loss(img, txt, neg, text_ids[:, None] == text_ids[None, :], cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = (recent + [stats])[-20:]
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"[clip] step {step + 1}/{cfg.steps} | " + " | ".join(
                f"{k} {sum(r[k] for r in recent) / len(recent):.3f}" for k in stats))
    model.eval()
    model.save_pretrained(out_dir or model_dir)
    if out_dir is not None:
        scorer.tokenizer.save_pretrained(out_dir)
        scorer.image_processor.save_pretrained(out_dir)
    out = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]}
    out["seconds"] = time.perf_counter() - t0
    return out


def _draw(rng: random.Random, pool: Sequence[str], k: int) -> list[str]:
    """k negatives from the pool: without replacement while it lasts, then with."""
    if len(pool) >= k:
        return rng.sample(list(pool), k)
    return list(pool) + [rng.choice(pool) for _ in range(k - len(pool))]


def retrieval_metrics(scorer: Any, pairs: Sequence[ClipPair], threshold: float = 0.4) -> dict[str, float]:
    """How well a CLIP separates true descriptions from their hard negatives, on `pairs`:

    `clip_retrieval_accuracy`  images whose true description scores above every one of its hard negatives
    `clip_pairwise_accuracy`   (true, hard negative) pairs in which the true one scores higher
    `clip_reward_true` / `clip_reward_negative`  mean CLIP reward (`similarity_to_reward`) of each
    `clip_sim_true` / `clip_sim_negative`        mean cosine similarity of each
    """
    images = [p.image for p in pairs for _ in range(1 + len(p.negatives))]
    texts = [t for p in pairs for t in [p.text, *p.negatives]]
    sims = scorer.similarities(images, texts)
    true, neg, wins, beats = [], [], 0, 0
    at = 0
    for p in pairs:
        s_true, s_neg = sims[at], sims[at + 1: at + 1 + len(p.negatives)]
        at += 1 + len(p.negatives)
        true.append(s_true)
        neg += s_neg
        wins += sum(s_true > s for s in s_neg)
        beats += all(s_true > s for s in s_neg)
    n_neg = max(len(neg), 1)
    return {"clip_retrieval_accuracy": beats / max(len(pairs), 1), "clip_pairwise_accuracy": wins / n_neg,
            "clip_reward_true": sum(similarity_to_reward(s, threshold) for s in true) / max(len(true), 1),
            "clip_reward_negative": sum(similarity_to_reward(s, threshold) for s in neg) / n_neg,
            "clip_sim_true": sum(true) / max(len(true), 1), "clip_sim_negative": sum(neg) / n_neg}
