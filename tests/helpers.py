"""Helpers the test modules share: inputs, float64 references, actor and model builders, worker set-up.

Test modules import these from here, never from one another.
"""
from __future__ import annotations

import numpy as np
import torch


# ------------------------------------------------------------------------------------------- actor inputs
TEMPERATURE = 0.7
MB_TOKENS = 160  # sequences of 61-161 tokens: 5 micro-batches at DP=1 (one packs two, one exceeds the bound), 2 + 3 at DP=2
ALGO = dict(clip_low=0.2, clip_high=0.3, clip_dual=3.0, kl_coef=0.05, kl_type="low_var_kl")
MICRO = "token-mean-microbatch"  # upstream's per-micro-batch token mean (algo.agg)
# A real step: lr 1e-3 moves every weight by ~1e-3; weight decay 0.1 moves a norm weight of 1 by 1e-4, so a
# wrong decay rule shows. eps 1e-6 keeps Adam's first step (g / (|g| + eps)) from amplifying float32 noise
# of gradients that are exactly zero in exact arithmetic (the key bias: softmax ignores it).
OPT = dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-6, weight_decay=0.1, clip_grad=1.0)

# (image sizes (H, W), prompt, response tokens)
SPECS = [
    ([(56, 84)], "How many circles?", 9),
    ([], "What is 12 + 30? Think step by step and answer with a number.", 70),
    ([(84, 56), (56, 56)], "Compare the two pictures.", 6),
    ([(112, 84)], "Count the red squares, then the blue ones, and add them up.", 11),
    ([], "Name a colour.", 5),
    ([(56, 56)], "Which shape is the largest one in the picture?", 8),
]


def make_sequences(hf_dir, seed: int) -> list[dict]:
    """Chat-formatted image+text prompts with random responses, as plain ActorSequence fields."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    proc = AutoImageProcessor.from_pretrained(hf_dir)
    rng = np.random.default_rng(seed)
    out = []
    for sizes, prompt, n_resp in SPECS:
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": prompt}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        pixels, grids = [], []
        for h, w in sizes:
            vis = proc(images=[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))], return_tensors="pt")
            n = int(vis["image_grid_thw"].prod()) // 4
            text = text.replace("<|vision_start|><|image_pad|>", "<|vision_start|>" + "<|IMG|>" * n, 1)
            pixels.append(vis["pixel_values"].float().numpy())
            grids.append(vis["image_grid_thw"].numpy())
        prompt_ids = tok(text.replace("<|IMG|>", "<|image_pad|>"))["input_ids"]
        response = rng.integers(0, 300, n_resp).tolist()  # plain BPE ids, never an image pad
        out.append({"input_ids": prompt_ids + response, "target_mask": [0] * len(prompt_ids) + [1] * n_resp,
                    "pixel_values": np.concatenate(pixels) if pixels else None,
                    "image_grid_thw": np.concatenate(grids) if grids else None})
    return out


def add_grpo_inputs(seqs: list[dict], logprobs: list[torch.Tensor], seed: int) -> None:
    """Old / reference log-probs scattered around the current ones, and advantages of both signs."""
    rng = np.random.default_rng(seed)
    for i, (s, lp) in enumerate(zip(seqs, logprobs)):
        base = lp.detach().numpy()
        s["old_logprobs"] = (base + rng.normal(0, 0.6, base.shape)).astype(np.float32)  # clips and dual clips
        s["ref_logprobs"] = (base + rng.normal(0, 0.3, base.shape)).astype(np.float32)
        s["advantage"] = float(rng.normal(0, 1.0)) if i != 3 else -1.7


def actor_sequences(seqs: list[dict]):
    from pebr_mega.actor.packing import ActorSequence

    def t(x):
        return None if x is None else torch.as_tensor(x)

    return [ActorSequence(s["input_ids"], s["target_mask"], t(s["pixel_values"]), t(s["image_grid_thw"]),
                          s.get("advantage", 0.0), t(s.get("old_logprobs")), t(s.get("ref_logprobs")))
            for s in seqs]


def hf_model(hf_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float64).eval()


def hf_target_logprobs(model, seqs: list[dict], temperature: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log softmax(logits / T)[target], entropy) at every target position, float64, differentiable."""
    out = []
    for s in seqs:
        ids = torch.tensor([s["input_ids"]])
        extra = {}
        if s["pixel_values"] is not None:
            extra = {"pixel_values": torch.as_tensor(s["pixel_values"]).double(),
                     "image_grid_thw": torch.as_tensor(s["image_grid_thw"])}
        logits = model(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).int(), **extra).logits[0]
        logp = torch.log_softmax(logits / temperature, dim=-1)
        tgt = torch.tensor([j for j, m in enumerate(s["target_mask"]) if m])
        out.append((logp[tgt - 1, ids[0, tgt]], -(logp.exp() * logp).sum(-1)[tgt - 1]))
    return out


def _layout(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> left-aligned [n, T] values and mask (the GRPO math's layout)."""
    width = max(len(r) for r in rows)
    mask = torch.zeros(len(rows), width, dtype=torch.float64)
    out = []
    for i, r in enumerate(rows):
        mask[i, : len(r)] = 1
        out.append(torch.cat([r.double(), r.new_zeros(width - len(r), dtype=torch.float64)]))
    return torch.stack(out), mask


def _frozen(name: str, freeze: str) -> bool:
    visual = ".visual." in f".{name}"
    merger = ".merger." in name
    return visual and ((freeze == "all") or (freeze == "vision" and not merger))


# The GRPO loss from its formulas, for the comparisons with the actor. Written here, apart from
# `pebr_mega.kernels.reference` (which the actor's torch path runs), so that a mistake there shows as a
# difference instead of being checked against itself: the clip is the case analysis on the advantage's sign
# (not the library's max/min form), the aggregation loops over rows.
def grpo_token_losses(lp, old, adv, ref, clip_low: float, clip_high: float, clip_dual: float, kl_coef: float,
                      kl_type: str) -> torch.Tensor:
    """Per-token GRPO loss [B, T]: asymmetric PPO-clip with dual clip, plus kl_coef x the KL estimator.

    With r = exp(clamp(lp - old, -20, 20)): for A >= 0 the loss is -A min(r, 1 + clip_high) (the gain is
    capped once r passes 1 + clip_high); for A < 0 it is |A| min(max(r, 1 - clip_low), clip_dual) (floored
    at the lower bound, capped by the dual clip). KL, with d = ref - lp: k1 = -d, k2 = d^2 / 2, low_var_kl
    (k3) = exp(d) - d - 1 on d clamped to [-20, 20], the result clamped to [-10, 10] (EasyR1)."""
    r = torch.exp((lp - old).clamp(-20.0, 20.0))
    gain = -adv * torch.clamp(r, max=1.0 + clip_high)
    cost = -adv * torch.clamp(torch.clamp(r, min=1.0 - clip_low), max=clip_dual)
    pg = torch.where(adv >= 0, gain, cost)
    d = ref - lp
    if kl_type == "k1":
        kl = -d
    elif kl_type == "k2":
        kl = d * d / 2
    else:
        dc = d.clamp(-20.0, 20.0)
        kl = (torch.exp(dc) - dc - 1).clamp(-10.0, 10.0)
    return pg + kl_coef * kl


def grpo_loss_by_rows(per_token: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Aggregate per-token losses by looping over the rows' response tokens: token-mean = all tokens' mean;
    seq-mean-token-sum = the mean over rows of each row's sum; seq-mean-token-mean = the mean of row means."""
    rows = [per_token[b][mask[b] != 0] for b in range(per_token.shape[0])]
    rows = [r for r in rows if r.numel()]
    if agg == "token-mean":
        return sum(r.sum() for r in rows) / sum(r.numel() for r in rows)
    if agg == "seq-mean-token-sum":
        return sum(r.sum() for r in rows) / len(rows)
    if agg == "seq-mean-token-mean":
        return sum(r.mean() for r in rows) / len(rows)
    raise ValueError(f"no reference for agg {agg!r}")


def microbatch_token_mean(lp, old, adv, mask, ref, plan) -> torch.Tensor:
    """Upstream PeBR-R1's `loss_avg_mode: token` (its EasyR1 0.3.2.dev0 fork, dp_actor.update_policy): each
    micro-batch's token mean of (policy loss + kl_coef * KL), divided by the micro-batches per rank (gradient
    accumulation), averaged over the data-parallel ranks (FSDP's gradient mean)."""
    per_token = grpo_token_losses(lp, old, adv, ref, **ALGO) * mask
    total = lp.new_zeros(())
    for rank in plan:
        for group in rank:
            rows = torch.tensor(group, dtype=torch.long)
            total = total + per_token[rows].sum() / mask[rows].sum().clamp(min=1) / (len(rank) * len(plan))
    return total


def reference_step(hf_dir, seqs: list[dict], kind: str = "grpo", agg: str = "token-mean", freeze: str = "none",
                   opt: dict | None = None, decay_all: bool = True, plan=None) -> dict:
    """Loss, total grad norm and (with `opt`) the weights after one clipped AdamW step, all in float64; the
    GRPO loss from its formulas (`grpo_token_losses`, `grpo_loss_by_rows`), not from the library.

    `plan` (`actor.packing.plan_micro_batches`) is the micro-batch partition `token-mean-microbatch` needs."""
    from pebr_mega.checkpoint.hf_mapping import normalize_hf_name

    model = hf_model(hf_dir)
    named = [(n, p) for n, p in model.named_parameters() if not _frozen(n, freeze)]
    for n, p in model.named_parameters():
        p.requires_grad_(not _frozen(n, freeze))
    temperature = TEMPERATURE if kind == "grpo" else 1.0
    lp, mask = _layout([lp for lp, _ in hf_target_logprobs(model, seqs, temperature)])
    if kind == "grpo":
        old, _ = _layout([torch.as_tensor(s["old_logprobs"]) for s in seqs])
        ref, _ = _layout([torch.as_tensor(s["ref_logprobs"]) for s in seqs])
        adv = torch.tensor([s["advantage"] for s in seqs], dtype=torch.float64)[:, None].expand_as(lp)
        if agg == MICRO:
            loss = microbatch_token_mean(lp, old, adv, mask, ref, plan)
        else:
            loss = grpo_loss_by_rows(grpo_token_losses(lp, old, adv, ref, **ALGO), mask, agg)
    else:
        loss = -(lp * mask).sum() / mask.sum()
    loss.backward()
    params = [p for _, p in named]  # named_parameters lists a tied embedding once
    out = {"loss": float(loss), "grad_norm": float(torch.sqrt(sum((p.grad ** 2).sum() for p in params)))}
    if opt is not None:
        torch.nn.utils.clip_grad_norm_(params, opt["clip_grad"])
        if decay_all:
            groups = [{"params": params}]
        else:  # Megatron's default exemption: biases and 1-D parameters
            no_decay = [p for n, p in named if p.ndim == 1 or n.endswith(".bias")]
            groups = [{"params": [p for p in params if all(p is not q for q in no_decay)]},
                      {"params": no_decay, "weight_decay": 0.0}]
        torch.optim.AdamW(groups, lr=opt["lr"], betas=(opt["adam_beta1"], opt["adam_beta2"]), eps=opt["adam_eps"],
                          weight_decay=opt["weight_decay"]).step()
        out["weights"] = {normalize_hf_name(k): v.detach() for k, v in model.state_dict().items()}
    return out


def solo_world() -> None:
    """A one-rank gloo world inside a spawned rank (an in-memory store: no port, no other process)."""
    import torch.distributed as dist

    from pebr_mega.parallel.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def make_actor(hf_dir, tp: int, pp: int, kernels: str = "torch", sequence_parallel: bool = False,
           params_dtype: str = "float32", attention: str = "auto", **overrides):
    from pebr_mega.actor.config import ActorConfig
    from pebr_mega.actor.megatron_actor import build_actor
    from pebr_mega.models.config import ModelConfig

    mc = ModelConfig(spec="torch", tp=tp, pp=pp, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                     attention=attention)
    return build_actor(hf_dir, mc, ActorConfig(micro_batch_tokens=MB_TOKENS, kernels=kernels, **overrides),
                       trainable=True, total_updates=10)


def grpo_loss_spec(agg: str = "token-mean"):
    from pebr_mega.actor.megatron_actor import LossSpec
    from pebr_mega.algo.grpo import AlgoConfig

    return LossSpec("grpo", AlgoConfig(agg=agg, **ALGO), TEMPERATURE)


def hf_weights(actor) -> dict[str, torch.Tensor]:
    from pebr_mega.checkpoint.hf_mapping import HFMapping
    from pebr_mega.checkpoint.gather import iter_hf_tensors

    return {n: t.clone() for n, t in iter_hf_tensors(actor.module, HFMapping(actor.arch))}


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((torch.as_tensor(a[n]) - torch.as_tensor(b[n])).abs().max()) for n in a)


# ------------------------------------------------------------------------------------- model parity inputs
def make_parity_batch(hf_dir, seed: int) -> dict:
    """Three right-padded samples: one image, two images (different sizes), text only."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    proc = AutoImageProcessor.from_pretrained(hf_dir)
    rng = np.random.default_rng(seed)
    specs = [[(84, 140)], [(112, 56), (56, 84)], []]
    prompts = ["How many circles?", "Compare the two pictures and count the red squares.", "What is 12 + 30?"]
    rows, pixels, grids = [], [], []
    for sizes, prompt in zip(specs, prompts):
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": prompt}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        for h, w in sizes:
            vis = proc(images=[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))], return_tensors="pt")
            n = int(vis["image_grid_thw"].prod()) // 4
            text = text.replace("<|vision_start|><|image_pad|>", "<|vision_start|>" + "<|IMG|>" * n, 1)
            pixels.append(vis["pixel_values"])
            grids.append(vis["image_grid_thw"])
        ids = tok(text.replace("<|IMG|>", "<|image_pad|>"))["input_ids"]
        ids += rng.integers(0, 700, 5).tolist()  # a short "response"
        rows.append(ids)
    s = max(map(len, rows))
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    input_ids = torch.full((len(rows), s), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), s, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = torch.from_numpy(rng.integers(0, len(tok), input_ids.shape)).long()
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.cat(pixels).float(),
            "image_grid_thw": torch.cat(grids), "labels": labels,
            "images_per_row": torch.tensor([len(sizes) for sizes in specs])}

def hf_parity_reference(hf_dir, batch) -> dict:
    """Logits and vision-tower gradients of sum(CE(logits, labels)) over valid tokens, from transformers."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(ids == model.config.image_token_id).int())
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    (ce * mask.flatten()).sum().backward()
    grads = {"vision_model." + k[len("model.visual."):]: p.grad.clone()
             for k, p in model.named_parameters() if k.startswith("model.visual.")}
    return {"logits": out.logits.detach(), "vision_grads": grads}

def build_parity_model(hf_dir, tp, pp, spec="torch"):
    from megatron.core import parallel_state as mpu

    from pebr_mega.checkpoint.hf_load import load_hf_weights
    from pebr_mega.models.arch import arch_from_hf_dir
    from pebr_mega.models.config import ModelConfig
    from pebr_mega.models.qwen25_vl import build_model

    cfg = ModelConfig(spec=spec, tp=tp, pp=pp, params_dtype="float32")
    model = build_model(arch_from_hf_dir(hf_dir), cfg, mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage())
    load_hf_weights(model, hf_dir)
    return model

def model_inputs(model, batch, with_labels=False):
    from pebr_mega.checkpoint.compare import position_ids_for

    out = {"input_ids": batch["input_ids"], "position_ids": position_ids_for(model.arch, batch),
           "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    if with_labels:
        out["labels"] = batch["labels"]
    return out

def vision_grads(model):
    if model.vision_model is None:
        return None
    return {"vision_model." + n: (getattr(p, "main_grad", None) if p.grad is None else p.grad).clone()
            for n, p in model.vision_model.named_parameters()}
