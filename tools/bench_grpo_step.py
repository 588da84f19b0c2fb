#!/usr/bin/env python3
"""The actor's share of one GRPO step on a realistic RL batch: pebr-mega's Megatron actor against the
transformers actor a user would otherwise write, in the same run, on the same GPU.

    python tools/bench_grpo_step.py --model 7b-shaped --layers 4          # one GPU (H100/H200 class)
    python tools/bench_grpo_step.py --model 7b-shaped --layers 4 --record docs/PERFORMANCE.md
    python tools/bench_grpo_step.py --model tiny --device cpu              # any machine: the code path only

The batch (fixed seed): `--prompts` prompts x `--n` responses (default 64 x 8); each prompt is ~400 text
tokens around one `--image` (448x448: 1,024 patches, 256 image tokens); response lengths are drawn from a
log-normal (mean ~450) cut at `--response-max` (2,048). Weights are random, in bf16, with the real
Qwen2.5-VL-7B widths (hidden 3584, FFN 18944, 28 heads / 4 KV groups, vocab 152,064; ViT 1280 wide, window
attention) and `--layers` decoder / `--vision-layers` ViT blocks.

Phases, each timed on the whole batch after a warm-up on a slice of it (compilation, allocator):
  old log-probs   the policy's log-probs of every response token (no gradient)
  ref log-probs   the frozen reference's
  update          one optimizer step of the GRPO loss (PPO-clip, dual clip, k3 KL, token-mean) over the batch
ours: `MegatronActor` (`torch` spec: packed, balanced micro-batches of `--micro-batch-tokens`, one
variable-length attention call per layer, log-probs of the target positions only, Triton kernels,
Megatron's optimizer with fp32 master weights). Baseline: transformers' `Qwen2_5_VLForConditionalGeneration`
(sdpa attention) on padded batches of `--hf-micro-batch` sequences (prompts left-padded, responses
right-padded, as verl / EasyR1 lay them out), float32 log-softmax of the response logits, the same loss
(`pebr_mega.kernels.reference.grpo_loss_reference`), `torch.optim.AdamW` on the bf16 parameters.

Reported per phase and implementation: seconds, tokens/s (prompt + image + response tokens), model
TFLOP/s and MFU against a bf16 matmul (8192^3) measured in the same run, and peak memory. Model FLOPs are
the same for both (the work the phase needs, not the work an implementation does): the decoder on every
token with causal attention inside each sample, the ViT on every image, the output layer on the response
tokens only (they are all the log-probs a GRPO step uses); training = 3 x forward. Also timed: the two
ways `actor.logprobs_from` turns hidden states into log-probs (`logits`, `hidden`) at this batch's
largest micro-batch of targets, forward + backward, which sets that key's default per device.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

TEMPERATURE = 1.0
SECTION = "## Actor phases of a GRPO step"
HEADER = ("| date | card | model | batch | tokens | phase | impl | s | tokens/s | model TFLOP/s | MFU | peak GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


# ----------------------------------------------------------------------------------------------- model
def arch_for(args):
    """The architecture: Qwen2.5-VL-7B widths with fewer layers, or the CPU toy."""
    from bench_train_step import qwen25_vl_7b_arch, tiny_arch

    if args.model == "tiny":
        return tiny_arch()
    return qwen25_vl_7b_arch(args.layers, args.vision_layers)


def hf_config(arch):
    """transformers' `Qwen2_5_VLConfig` for `arch` (the inverse of `pebr_mega.models.arch.arch_from_hf_config`)."""
    from transformers import Qwen2_5_VLConfig

    t, v = arch.text, arch.vision
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                hidden_act="silu", max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                 "mrope_section": list(t.mrope_section)},
                tie_word_embeddings=t.tie_word_embeddings, use_sliding_window=False, max_window_layers=t.num_layers)
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                  spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                  window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                  tokens_per_second=v.tokens_per_second, hidden_act=v.hidden_act, in_channels=v.in_channels)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=arch.image_token_id,
                            video_token_id=arch.video_token_id, vision_start_token_id=arch.vision_start_token_id,
                            vision_end_token_id=arch.vision_start_token_id + 1,
                            tie_word_embeddings=t.tie_word_embeddings)


def write_random_hf_model(arch, out: Path, device, seed: int) -> Path:
    """Random bf16 weights (initialised on `device`) saved as an HF directory: both actors load it."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config(arch), dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    from pebr_mega.models.arch import arch_from_hf_dir

    # hf_config is the inverse of the project's reader: the benchmark's two actors must see the same model
    if arch_from_hf_dir(out) != arch:
        raise RuntimeError(f"{out}: config.json reads back as another architecture than the one benchmarked")
    return out


# ----------------------------------------------------------------------------------------------- batch
@dataclass
class Sample:
    prompt: list[int]
    response: list[int]
    pixel_values: object  # [patches, C*T*P*P] float32 (host)
    grid: object  # [1, 3] long (host)
    group: int


def make_batch(arch, args) -> list[Sample]:
    """`prompts` x `n` samples: text around one image, long-tailed response lengths (fixed seed)."""
    import numpy as np
    import torch

    v = arch.vision
    rng = np.random.default_rng(args.seed)
    h, w = (int(x) for x in args.image.split("x"))
    unit = v.patch_size * v.spatial_merge_size
    gh, gw = h // unit * v.spatial_merge_size, w // unit * v.spatial_merge_size
    image_tokens = gh * gw // v.spatial_merge_size**2
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    top = min(arch.text.vocab_size, arch.vision_start_token_id) - 1  # plain text ids only
    mu = math.log(args.response_mean) - 0.5 * args.response_sigma**2  # log-normal with that mean
    samples = []
    for g in range(args.prompts):
        text = int(rng.integers(int(args.prompt_tokens * 0.85), int(args.prompt_tokens * 1.15) + 1))
        head = int(rng.integers(8, 24))
        ids = rng.integers(0, top, text).tolist()
        prompt = (ids[:head] + [arch.vision_start_token_id] + [arch.image_token_id] * image_tokens
                  + [arch.vision_start_token_id + 1] + ids[head:])
        pixels = torch.from_numpy(rng.standard_normal((gh * gw, patch), dtype=np.float32))
        grid = torch.tensor([[1, gh, gw]])
        for _ in range(args.n):
            n_resp = int(min(args.response_max, max(1, round(rng.lognormal(mu, args.response_sigma)))))
            samples.append(Sample(prompt, rng.integers(0, top, n_resp).tolist(), pixels, grid, g))
    return samples


def model_flops(arch, samples, train: bool) -> float:
    """Model FLOPs of one phase (see the module docstring)."""
    from pebr_mega.models.flops import decoder_forward_flops, vision_forward_flops

    t = arch.text
    fwd = 0
    for s in samples:
        length = len(s.prompt) + len(s.response)
        fwd += decoder_forward_flops(t, length) - 2 * (length - len(s.response)) * t.hidden_size * t.vocab_size
    fwd += len(samples) * vision_forward_flops(arch.vision, samples[0].grid)
    return float(3 * fwd if train else fwd)


# ----------------------------------------------------------------------------------------------- timing
class Meter:
    """Wall time and peak memory of a block, synchronised on CUDA."""

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")


def matmul_tflops(device) -> float:
    """The dense bf16 matmul rate of this device (8192^3 on CUDA; a float32 1024^3 on CPU)."""
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
        ms = do_bench(lambda: a @ b, warmup=100, rep=500)
        return 2 * 8192**3 / (ms * 1e-3) / 1e12
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024**3 / (time.perf_counter() - t0) / 1e12


# ----------------------------------------------------------------------------------------------- ours
def actor_sequences(samples):
    from pebr_mega.actor.packing import ActorSequence

    return [ActorSequence(s.prompt + s.response, [0] * len(s.prompt) + [1] * len(s.response), s.pixel_values,
                          s.grid) for s in samples]


def advantages(samples, seed: int) -> list[float]:
    import torch

    from pebr_mega.algo.grpo import group_advantages

    scores = torch.rand(len(samples), generator=torch.Generator().manual_seed(seed)).round()
    return group_advantages(scores, [s.group for s in samples]).tolist()


def run_ours(hf_dir: Path, arch, samples, args, device) -> dict:
    """The three phases with pebr-mega's Megatron actor; returns {phase: Meter} and the results."""
    import torch

    from pebr_mega.actor.config import ActorConfig
    from pebr_mega.actor.megatron_actor import LossSpec, build_actor
    from pebr_mega.algo.grpo import AlgoConfig
    from pebr_mega.models.config import ModelConfig

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    mc = ModelConfig(spec="torch", params_dtype=dtype, attention=args.attention)
    ac = ActorConfig(micro_batch_tokens=args.micro_batch_tokens, lr=1e-6, logprobs_from=args.logprobs_from)
    policy = build_actor(hf_dir, mc, ac, trainable=True, total_updates=10)
    reference = build_actor(hf_dir, mc, ac, trainable=False)
    seqs = actor_sequences(samples)
    adv = advantages(samples, args.seed)
    loss = LossSpec("grpo", AlgoConfig(), TEMPERATURE)
    # warm-up on a slice of the batch: Triton compilation, cuBLAS, the caching allocator
    warm = seqs[: max(2, len(seqs) // 16)]
    lp = policy.compute_logprobs(warm, TEMPERATURE)
    reference.compute_logprobs(warm, TEMPERATURE)
    for s, a, (x, _) in zip(warm, adv, lp):
        s.old_logprobs, s.ref_logprobs, s.advantage = x, x, a
    policy.train_step(warm, loss)
    meters = {}
    with Meter(device) as meters["old log-probs"]:
        old = policy.compute_logprobs(seqs, TEMPERATURE)
    with Meter(device) as meters["ref log-probs"]:
        ref = reference.compute_logprobs(seqs, TEMPERATURE)
    for s, a, (o, _), (r, _) in zip(seqs, adv, old, ref):
        s.old_logprobs, s.ref_logprobs, s.advantage = o, r, a
    with Meter(device) as meters["update"]:
        metrics = policy.train_step(seqs, loss)
    plan = policy.plan(seqs)
    largest = max((sum(seqs[i].num_targets for i in g) for rank in plan for g in rank), default=1)
    del policy, reference
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"meters": meters, "old": [x for x, _ in old], "metrics": metrics, "largest_targets": largest,
            "micro_batches": len(plan[0])}


# ----------------------------------------------------------------------------------------------- baseline
def _padded(samples, device, arch):
    """Left-padded prompts, right-padded responses (verl / EasyR1 layout): ids, mask, response mask."""
    import torch

    p = max(len(s.prompt) for s in samples)
    r = max(len(s.response) for s in samples)
    ids = torch.zeros(len(samples), p + r, dtype=torch.long)
    mask = torch.zeros_like(ids)
    resp = torch.zeros(len(samples), r)
    for i, s in enumerate(samples):
        ids[i, p - len(s.prompt): p] = torch.tensor(s.prompt)
        ids[i, p: p + len(s.response)] = torch.tensor(s.response)
        mask[i, p - len(s.prompt): p + len(s.response)] = 1
        resp[i, : len(s.response)] = 1
    return ids.to(device), mask.to(device), resp.to(device), p, r


def hf_response_logprobs(model, samples, device, arch):
    """log softmax(logits / T) (float32) at every response position [b, R], and the response mask."""
    import torch

    ids, mask, resp, p, r = _padded(samples, device, arch)
    out = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == arch.image_token_id).int(),
                pixel_values=torch.cat([s.pixel_values for s in samples]).to(device, torch.bfloat16),
                image_grid_thw=torch.cat([s.grid for s in samples]).to(device))
    logits = out.logits[:, p - 1: p + r - 1]  # the positions predicting the responses
    logp = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    return logp.gather(-1, ids[:, p: p + r, None]).squeeze(-1), resp


def run_baseline(hf_dir: Path, arch, samples, args, device) -> dict:
    """The same three phases with transformers, padded batches and torch AdamW."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pebr_mega.algo.grpo import AlgoConfig
    from pebr_mega.kernels.reference import grpo_loss_reference

    def load():
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            hf_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            attn_implementation="sdpa").to(device)

    policy, reference = load(), load().eval()
    reference.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=1e-2)
    algo = AlgoConfig()
    mb = args.hf_micro_batch
    adv = advantages(samples, args.seed)
    starts = list(range(0, len(samples), mb))

    @torch.no_grad()
    def logprobs(model, chunks):
        model.eval()
        return [hf_response_logprobs(model, samples[i: i + mb], device, arch)[0] for i in chunks]

    def update(chunks, old, ref):
        policy.train()
        total = sum(len(samples[j].response) for i in chunks for j in range(i, min(i + mb, len(samples))))
        for k, i in enumerate(chunks):
            lp, resp = hf_response_logprobs(policy, samples[i: i + mb], device, arch)
            a = torch.tensor(adv[i: i + mb], device=device)[:, None].expand_as(lp)
            loss, _ = grpo_loss_reference(lp, old[k], a, resp, ref[k], algo.clip_low, algo.clip_high, algo.clip_dual,
                                algo.kl_coef, algo.kl_type, "token-mean", denominator=float(total))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    update(starts[:1], logprobs(policy, starts[:1]), logprobs(reference, starts[:1]))  # warm-up
    meters = {}
    with Meter(device) as meters["old log-probs"]:
        old = logprobs(policy, starts)
    with Meter(device) as meters["ref log-probs"]:
        ref = logprobs(reference, starts)
    with Meter(device) as meters["update"]:
        update(starts, old, ref)
    flat_old = [row[: len(s.response)].float().cpu()
                for i, lp in zip(starts, old) for row, s in zip(lp, samples[i: i + mb])]
    del policy, reference, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"meters": meters, "old": flat_old}


# ----------------------------------------------------------------------------------------------- output path
def time_logprob_paths(arch, n_rows: int, device) -> dict[str, float]:
    """Forward + backward ms of `actor.logprobs_from` = logits and = hidden at n_rows targets."""
    import torch

    from pebr_mega.kernels import ops as kernels

    if device.type != "cuda":
        return {}
    from triton.testing import do_bench

    g = torch.Generator(device=device).manual_seed(0)
    h, v = arch.text.hidden_size, arch.text.vocab_size
    hidden = (torch.randn(n_rows, h, device=device, generator=g) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
    ids = torch.randint(0, v, (n_rows,), device=device, generator=g)

    def logits_path():
        lp, _ = kernels.logprobs(torch.nn.functional.linear(hidden, weight), ids, inplace_backward=True)
        lp.sum().backward()

    def hidden_path():
        lp, _ = kernels.linear_logprobs(hidden, weight, ids)
        lp.sum().backward()

    return {"logits": do_bench(logits_path, warmup=5, rep=50), "hidden": do_bench(hidden_path, warmup=5, rep=50)}


# ----------------------------------------------------------------------------------------------- report
def report(args, arch, samples, ours: dict, base: dict | None, rate: float, card: str) -> tuple[list[str], dict]:
    tokens = sum(len(s.prompt) + len(s.response) for s in samples)
    flops = {"old log-probs": model_flops(arch, samples, False), "ref log-probs": model_flops(arch, samples, False),
             "update": model_flops(arch, samples, True)}
    model = args.model + (f" ({args.layers}+{args.vision_layers}v)" if args.model != "tiny" else "")
    batch = f"{args.prompts}x{args.n}"
    rows, summary = [], {"matmul_tflops": rate, "tokens": tokens}
    for impl, res in (("pebr-mega", ours), ("transformers", base)):
        if res is None:
            continue
        total = 0.0
        for phase, m in res["meters"].items():
            tf = flops[phase] / m.seconds / 1e12
            total += m.seconds
            summary[f"{impl}/{phase}/s"] = m.seconds
            summary[f"{impl}/{phase}/tflops"] = tf
            rows.append(f"| {dt.date.today()} | {card} | {model} | {batch} | {tokens} | {phase} | {impl} | "
                        f"{m.seconds:.2f} | {tokens / m.seconds:,.0f} | {tf:.1f} | {tf / rate:.0%} | "
                        f"{m.peak_gib:.1f} |")
        summary[f"{impl}/actor/s"] = total
        rows.append(f"| {dt.date.today()} | {card} | {model} | {batch} | {tokens} | actor (all three) | {impl} | "
                    f"{total:.2f} | {3 * tokens / total:,.0f} | {sum(flops.values()) / total / 1e12:.1f} | "
                    f"{sum(flops.values()) / total / 1e12 / rate:.0%} | |")
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="7b-shaped", choices=["7b-shaped", "tiny"])
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the 7B has 28)")
    p.add_argument("--vision-layers", type=int, default=4, help="ViT blocks (the 7B has 32)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=400, help="text tokens per prompt (+-15%%)")
    p.add_argument("--image", default="448x448", help="HxW pixels of the one image per prompt")
    p.add_argument("--response-mean", type=float, default=450.0)
    p.add_argument("--response-sigma", type=float, default=0.8, help="log-normal shape: larger = longer tail")
    p.add_argument("--response-max", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-batch-tokens", type=int, default=16384, help="ours: token budget per micro-batch")
    p.add_argument("--attention", default="auto", choices=["auto", "varlen", "flash_attn", "sdpa"])
    p.add_argument("--logprobs-from", default="auto", choices=["auto", "logits", "hidden"])
    p.add_argument("--hf-micro-batch", type=int, default=8, help="baseline: sequences per padded micro-batch")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--work", default=None, help="where the random HF model is written (default: a temp dir)")
    p.add_argument("--record", default=None, help="markdown file to add the rows to (GPU runs only)")
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    if args.model == "tiny":
        args.prompts, args.n = min(args.prompts, 2), min(args.n, 2)
        args.prompt_tokens, args.image = min(args.prompt_tokens, 24), "56x56"
        args.response_mean, args.response_max = min(args.response_mean, 12.0), min(args.response_max, 40)
        args.micro_batch_tokens, args.hf_micro_batch = min(args.micro_batch_tokens, 64), min(args.hf_micro_batch, 2)
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_grpo_step: --device cuda but no CUDA GPU is visible; nothing measured "
              "(use --model tiny --device cpu to check the code path)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)  # toy matmuls: threads cost more than they give
    device = torch.device(args.device)
    from pebr_mega.parallel.groups import destroy_parallel, init_parallel

    arch = arch_for(args)
    samples = make_batch(arch, args)
    lens = [len(s.response) for s in samples]
    print(f"batch: {args.prompts} x {args.n} samples, prompts {len(samples[0].prompt)}+ tokens "
          f"({args.image} image), responses mean {sum(lens) / len(lens):.0f} max {max(lens)}, "
          f"{sum(len(s.prompt) + len(s.response) for s in samples):,} tokens", flush=True)
    rate = matmul_tflops(device)
    print(f"dense matmul rate on this device: {rate:.1f} TFLOP/s", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_grpo_"))
    hf_dir = write_random_hf_model(arch, work / "model", device, args.seed)
    init_parallel(1, 1)
    try:
        ours = run_ours(hf_dir, arch, samples, args, device)
    finally:
        destroy_parallel(process_group=True)
    print(f"ours: {ours['micro_batches']} micro-batches, metrics {json.dumps({k: round(v, 4) for k, v in ours['metrics'].items()})}",
          flush=True)
    base = None if args.skip_baseline else run_baseline(hf_dir, arch, samples, args, device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (code path only)"
    rows, summary = report(args, arch, samples, ours, base, rate, card)
    print(HEADER)
    print("\n".join(rows))
    if base is not None:
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours["old"], base["old"]) if len(a))
        summary["old_logprobs_max_abs_diff"] = diff
        speed = summary["transformers/actor/s"] / summary["pebr-mega/actor/s"]
        summary["actor_speedup"] = speed
        print(f"actor phase (log-probs + reference + update): {speed:.2f}x transformers' padded baseline "
              f"(target >= 2.5x); old log-probs max |ours - transformers| = {diff:.3g}")
    mfu = summary["pebr-mega/update/tflops"] / rate
    print(f"update phase: {summary['pebr-mega/update/tflops']:.1f} model TFLOP/s = {mfu:.0%} of the measured "
          f"matmul rate (target >= 50%)")
    paths = time_logprob_paths(arch, min(ours["largest_targets"], 16384), device)
    if paths:
        summary["logprobs_from_ms"] = paths
        faster = min(paths, key=paths.get)
        print(f"log-probs from hidden states, forward + backward at {ours['largest_targets']} targets: "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in paths.items()) + f" -> faster: {faster}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    if args.record and device.type == "cuda":
        from perf_docs import add_table_row

        for row in rows:
            add_table_row(args.record, SECTION, HEADER, row)
        print(f"recorded in {args.record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
