"""`make_plan`: for a resolved config and a cluster, every parallel layout with its memory, time and verdict.

A layout is valid when it passes the start-up rules (`plan/checks.py`, the very ones `check_startup` runs),
and fits when, in addition, the peak of the training phase and the peak of the rollout phase each stay within
the card's memory on the most loaded GPU. Layouts are ranked by estimated step time; each rejected one says
why. What one step processes (the workload) comes from the config: GRPO (`grpo.*` of the configured stage,
`rollout.*`, `data.max_prompt_length`, one square image at `images.max_pixels` per prompt) or SFT
(`sft.batch_size` conversations of `sft.cutoff_len` tokens per update); lengths are the configured maxima
unless overridden. A GRPO step's updates are cut as the trainer cuts them (whole mini-batches, then the rest);
a micro-batch is the token budget filled and padded as the packer pads it, whose targets (the positions whose
log-probs are computed) are the response share of its tokens at those lengths, or for SFT every token (the
assistant share is not known before the data: the upper bound).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pebr_mega.actor.config import logprobs_path
from pebr_mega.models.arch import QwenVLArch
from pebr_mega.models.config import token_multiple
from pebr_mega.plan import memory as mem
from pebr_mega.plan import timing
from pebr_mega.plan.checks import (CheckResult, batch_check, divisors, layout_check, length_check, rollout_check,
                                   run_checks)
from pebr_mega.plan.hardware import GpuSpec
from pebr_mega.plan.memory import GIB, MemoryTable
from pebr_mega.plan.timing import Layout

# SGLang's own default when the config does not set mem_fraction_static (its ServerArgs picks ~0.8-0.9 from the
# GPU memory and TP size); assumed.
SGLANG_DEFAULT_MEM_FRACTION = 0.88


@dataclass(frozen=True)
class Cluster:
    """Where the run goes: nodes x GPUs per node of one card type."""

    nodes: int
    gpus_per_node: int
    gpu: GpuSpec

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    """What one step processes."""

    job: str  # "grpo" | "sft"
    stage: str  # "stage1" | "stage2" | "sft"
    prompts: int  # per rollout step (grpo) or conversations per update (sft)
    n: int  # samples per prompt
    prompt_tokens: int  # including image tokens
    response_tokens: int
    images_per_prompt: int
    image_grid: tuple[int, int, int]
    mini_batch_prompts: int
    ppo_epochs: int
    with_reference: bool
    freeze_vision: bool
    freeze_projector: bool
    micro_batch_tokens: int
    logprob_path: str = "logits"  # what actor.logprobs_from runs on CUDA

    @property
    def seq_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def sequences(self) -> int:
        return self.prompts * self.n

    def update_prompts(self) -> list[int]:
        """Prompts of each update of one PPO epoch of a step, as the GRPO trainer cuts them (trainer/grpo.py,
        `_update`): whole mini-batches of the step's prompts, then what remains (all of them when there are fewer
        than a mini-batch)."""
        full, rest = divmod(self.prompts, self.mini_batch_prompts)
        return [self.mini_batch_prompts] * full + ([rest] if rest else [])

    @property
    def updates(self) -> int:
        return len(self.update_prompts()) * self.ppo_epochs

    @property
    def target_share(self) -> float:
        """Share of a sequence's tokens whose log-probs are computed: GRPO, the response; SFT, every token (the
        upper bound: the assistant share of a conversation is not known before the data)."""
        return 1.0 if self.job == "sft" else self.response_tokens / self.seq_tokens

    def target_note(self) -> str:
        """Where the target count comes from, for the report."""
        if self.job == "sft":
            return "SFT: the assistant share is not known before the data, so every token (the upper bound)"
        return (f"the response share {self.response_tokens}/{self.seq_tokens} of the packed tokens at the planned "
                f"lengths")

    def grids(self, count: int) -> list[tuple[int, int, int]]:
        return [self.image_grid] * count

    def micro_batch(self, multiple: int = 1) -> mem.MicroBatch:
        """The heaviest micro-batch: the token budget (or one longest sequence) filled, images and targets in
        proportion, padded as the packer pads it (to a multiple of `multiple`, `models.config.token_multiple`)."""
        tokens = max(self.micro_batch_tokens, self.seq_tokens)
        images = math.ceil(tokens * self.images_per_prompt / self.seq_tokens)
        targets = math.ceil(tokens * self.target_share)
        return mem.MicroBatch(-(-tokens // multiple) * multiple, tuple(self.grids(images)), targets=targets)

    def micro_batches(self, sequences: int) -> int:
        """Packed micro-batches for `sequences` sequences on one rank."""
        return max(1, math.ceil(sequences * self.seq_tokens / max(self.micro_batch_tokens, self.seq_tokens)))


def workload_from_config(cfg: Any, arch: QwenVLArch, job: str = "grpo", prompt_tokens: int | None = None,
                         response_tokens: int | None = None, images_per_prompt: int = 1) -> Workload:
    """The step the config describes (see the module docstring)."""
    grid = mem.square_image_grid(arch.vision, cfg.images.max_pixels)
    path = logprobs_path(cfg.actor.logprobs_from, "cuda")
    if job == "sft":
        s = cfg.sft
        return Workload("sft", "sft", s.batch_size, 1, prompt_tokens or s.cutoff_len, 0, images_per_prompt, grid,
                        s.batch_size, 1, False, s.freeze_vision, s.freeze_projector, cfg.actor.micro_batch_tokens,
                        path)
    if job != "grpo":
        raise ValueError(f"job {job!r} is not 'grpo' or 'sft'")
    g = cfg.grpo
    return Workload("grpo", g.stage, g.rollout_batch_size, cfg.rollout.n, prompt_tokens or cfg.data.max_prompt_length,
                    cfg.rollout.max_new_tokens if response_tokens is None else response_tokens, images_per_prompt,
                    grid, g.mini_batch_size, g.ppo_epochs, cfg.algo.kl_coef > 0, cfg.actor.freeze_vision,
                    cfg.actor.freeze_projector, cfg.actor.micro_batch_tokens, path)


def uses_distributed_optimizer(cfg: Any) -> bool:
    """`actor.distributed_optimizer`: `on` as written; `auto` runs it only with a fused Adam (TE or Apex) on the
    target machine, which the plan cannot see, so it plans without (the safe side) and shows both."""
    return cfg.actor.distributed_optimizer == "on"


@dataclass
class LayoutPlan:
    """One layout's verdict, memory tables (most loaded GPU) and phase times."""

    layout: Layout
    valid: bool
    fits: bool
    reason: str
    checks: CheckResult
    short_reason: str = ""
    training: MemoryTable | None = None
    rollout: MemoryTable | None = None
    train_stage: int = 0
    kv_tokens: int = 0
    concurrency: int = 0
    times: dict[str, float] = field(default_factory=dict)

    @property
    def step_seconds(self) -> float:
        return sum(self.times.values()) if self.times else float("inf")

    def to_json(self) -> dict:
        """The layout's entry of `pebr plan --json`."""
        out = {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp, "valid": self.valid,
               "fits": self.fits, "reason": self.reason, "notes": list(self.checks.notes)}
        if self.training is not None:
            out["train_peak_gib"] = round(self.training.total / GIB, 2)
        if self.rollout is not None:
            out["rollout_peak_gib"] = round(self.rollout.total / GIB, 2)
            out["kv_cache_tokens"] = self.kv_tokens
            out["concurrent_sequences"] = self.concurrency
        if self.times:
            out["step_seconds"] = round(self.step_seconds, 2)
            out["phase_seconds"] = {k: round(v, 2) for k, v in self.times.items()}
        return out


@dataclass
class Plan:
    """Everything `pebr plan` prints."""

    arch: QwenVLArch
    arch_source: str
    cluster: Cluster
    workload: Workload
    configured: Layout | None
    layouts: list[LayoutPlan]
    detail: LayoutPlan | None  # the configured layout, or the best one when the configured cannot run here
    distributed_optimizer: bool
    mem_fraction: float
    mem_fraction_assumed: bool
    rates: dict[str, str]
    # Why the configured model.tp/model.pp cannot start on this cluster (the start-up checks' lines); empty: it can.
    configured_errors: list[str] = field(default_factory=list)

    @property
    def total_parameters(self) -> int:
        return mem.total_parameters(self.arch)


# ------------------------------------------------------------------------------------------------ memory
def _optimizer(w: Workload, sp: mem.StageParams, cfg: Any, dp: int, distributed: bool) -> mem.OptimizerBytes:
    b = mem.DTYPE_BYTES[cfg.model.params_dtype]
    return mem.optimizer_bytes(sp, sp.trainable(w.freeze_vision, w.freeze_projector), b, distributed, dp)


def training_table(arch: QwenVLArch, cfg: Any, w: Workload, layout: Layout, gpu: GpuSpec, rollout: bool,
                   distributed: bool, stage: int, profile: mem.KernelProfile = mem.CUDA) -> MemoryTable:
    """The training phase's peak on one GPU of `stage`: what stays resident plus one update's activations."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    m = cfg.model
    b = mem.DTYPE_BYTES[m.params_dtype]
    sp = mem.stage_params(arch, tp, pp, stage)
    last = stage == pp - 1
    opt = _optimizer(w, sp, cfg, dp, distributed)
    other = _optimizer(w, sp, cfg, dp, not distributed)
    mb = w.micro_batch(token_multiple(tp, m.sequence_parallel))
    per_rank = math.ceil(max(w.update_prompts()) * w.n / dp)
    in_flight = min(pp - stage, w.micro_batches(per_rank)) if pp > 1 else 1
    t = MemoryTable()
    t.add("CUDA context, NCCL (training rank)", mem.CUDA_CONTEXT_BYTES, "outside the caching allocator; assumed")
    if rollout:
        t.add("CUDA context (SGLang scheduler)", mem.CUDA_CONTEXT_BYTES, "outside the caching allocator; assumed")
    t.add(f"parameters ({m.params_dtype})", opt.params,
          f"{sp.total / 1e9:.2f} B on this GPU (stage {stage}: {sp.num_layers} layers"
          + (", vision tower replicated over TP" if stage == 0 else "") + ")")
    t.add("gradient buffer (fp32)", opt.grads, f"{sp.trainable(w.freeze_vision, w.freeze_projector) / 1e9:.2f} B trainable")
    label = f"distributed over DP={dp}" if distributed else "not distributed"
    t.add(f"optimizer: fp32 main params + Adam, {label}", opt.main_params + opt.adam, "Adam's moments from the 1st update")
    t.add(f"  (optimizer {'not distributed' if distributed else f'distributed over DP={dp}'})",
          other.main_params + other.adam, "for comparison", counted=False)
    if w.with_reference:
        t.add(f"reference model ({m.params_dtype}, frozen)", opt.params, "algo.kl_coef > 0")
    frozen = dict(freeze_vision=w.freeze_vision, freeze_projector=w.freeze_projector)
    acts = mem.stage_activation_bytes(arch, sp, mb, tp, b, m.recompute_granularity, m.recompute_num_layers,
                                      m.vision_recompute, profile, last, m.sequence_parallel, **frozen)
    note = f"{in_flight} micro-batch(es) in flight x {mb.tokens} tokens"
    t.add(f"activations: decoder, recompute={m.recompute_granularity}", in_flight * acts["decoder"], note)
    if "recompute" in acts:
        t.add("activations: one recomputed chunk in backward", acts["recompute"])
    for mode in ("none", "selective", "full"):
        if mode != m.recompute_granularity:
            alt = mem.stage_activation_bytes(arch, sp, mb, tp, b, mode, m.recompute_num_layers, m.vision_recompute,
                                             profile, last, m.sequence_parallel, **frozen)
            t.add(f"  (decoder with recompute={mode})", in_flight * (alt["decoder"] + alt.get("recompute", 0)),
                  "for comparison", counted=False)
    if stage == 0:
        images = len(mb.grids)
        patches = sum(a * h * w_ for a, h, w_ in mb.grids)
        note = f"{images} image(s) of {mb.grids[0][1]}x{mb.grids[0][2]} patches, {patches} patches" if images else ""
        if "vision recompute" in acts:  # at the end of backward, once the decoder's activations are gone
            note += f"; +{acts['vision recompute'] / GIB:.2f} GiB while a block is recomputed, after the decoder's"
        if w.freeze_vision:
            note += "; tower frozen" + (" with the merger" if w.freeze_projector else ", merger trained")
        t.add(f"activations: vision tower, vision_recompute={m.vision_recompute}", in_flight * acts["vision"], note)
        if not w.freeze_vision:
            saved, _ = mem.vision_bytes(arch.vision, list(mb.grids), b, not m.vision_recompute)
            t.add(f"  (vision tower with vision_recompute={not m.vision_recompute})", in_flight * saved,
                  "for comparison", counted=False)
        t.add("activations: embedding inputs", in_flight * acts["embedding"])
    if last:
        t.add("activations: final norm + the targets' hidden states", acts["head"],
              f"{mb.target_count} target positions of {mb.tokens} tokens: {w.target_note()}")
        for path in (w.logprob_path, *(p for p in mem.LOGPROB_PATHS if p != w.logprob_path)):
            kept, transient = mem.logprob_bytes(arch.text, mb.target_count, tp, b, path)
            if path == "logits":
                label = f"log-probs: target logits [{mb.target_count}, V/{tp}] ({m.params_dtype})"
                note = "kept for backward, which overwrites them with their gradient"
            else:
                rows = min(mb.target_count, mem.hidden_path_chunk_rows(arch.text, tp))
                label = f"log-probs: hidden-state chunk [{rows}, V/{tp}] ({m.params_dtype})"
                note = "kernels.linear_logprobs: in forward, recomputed in backward"
            if path == w.logprob_path:
                how = f"actor.logprobs_from={cfg.actor.logprobs_from}" + (f" ({path} on CUDA)" if
                                                                          cfg.actor.logprobs_from == "auto" else "")
                if cfg.actor.kernels == "torch":  # the reference gathers the vocabulary and keeps fp32 copies
                    note += "; actor.kernels=torch keeps several fp32 copies [N, V] more: not modelled"
                t.add(label, kept + transient, f"{how}: {note}")
            else:
                t.add(f"  ({label})", kept + transient, f"actor.logprobs_from={path}, for comparison", counted=False)
    t.add("backward workspace", mem.backward_workspace_bytes(arch.text, sp, mb.tokens, tp, b, last, mb.target_count),
          "largest weight gradient + the targets' and every token's hidden-state gradient" if last else
          "received hidden-state gradient + largest weight gradient")
    if rollout:
        t.add("SGLang CUDA graphs (kept)", mem.CUDA_GRAPH_BYTES, "assumed; released too by SGLangs that tag them")
    dynamic = sum(r.bytes for r in t.rows if r.counted and (r.name.startswith(("activations", "log-probs", "backward"))))
    t.add(f"caching-allocator headroom ({mem.ALLOCATOR_HEADROOM:.0%} of the dynamic part)",
          mem.ALLOCATOR_HEADROOM * dynamic, "assumed")
    return t


def rollout_table(arch: QwenVLArch, cfg: Any, w: Workload, layout: Layout, gpu: GpuSpec, distributed: bool,
                  stage: int, frac: float) -> tuple[MemoryTable, int, int, float]:
    """The rollout phase's peak on one GPU of `stage`, the KV cache's tokens and concurrent sequences, and the
    memory free when the engine started."""
    m = cfg.model
    sp = mem.stage_params(arch, layout.tp, layout.pp, stage)
    opt = _optimizer(w, sp, cfg, layout.dp, distributed)
    etp = cfg.rollout.sglang_tp_size
    ref = opt.params if w.with_reference else 0
    contexts = 2 * mem.CUDA_CONTEXT_BYTES
    weights = mem.engine_weight_bytes(arch, etp)
    free_at_start = gpu.memory_bytes - contexts - opt.at_build - ref
    kv = frac * free_at_start - weights
    kv_dtype = str(cfg.rollout.sglang_args.get("kv_cache_dtype", "auto"))
    cell = mem.kv_bytes_per_token(arch.text, etp, 1 if kv_dtype.startswith("fp8") else 2)
    tokens = max(0, int(kv // cell))
    concurrency = tokens // max(w.seq_tokens, 1)
    cap = cfg.rollout.sglang_args.get("max_running_requests")
    if cap:
        concurrency = min(concurrency, int(cap))
    t = MemoryTable()
    t.add("CUDA contexts (training rank + SGLang scheduler)", contexts, "outside the caching allocator; assumed")
    t.add("actor: parameters + gradient buffer + main params", opt.at_build, "resident: not released for rollouts")
    t.add("actor: Adam moments", opt.adam, "allocated at the 1st update, after SGLang sized its KV cache")
    if w.with_reference:
        t.add(f"reference model ({m.params_dtype})", ref)
    t.add(f"SGLang weights (TP={etp}, bf16)", weights)
    t.add(f"SGLang KV cache: {tokens:,} tokens = {concurrency} sequences of {w.seq_tokens}", max(kv, 0.0),
          f"mem_fraction_static {frac} of {free_at_start / GIB:.1f} GiB free at start-up, minus the weights")
    t.add("SGLang CUDA graphs", mem.CUDA_GRAPH_BYTES, "assumed")
    chunk = int(cfg.rollout.sglang_args.get("chunked_prefill_size") or mem.SGLANG_PREFILL_CHUNK)
    tt = arch.text
    work = chunk * 2 * (2 * (tt.num_heads + 2 * tt.num_kv_heads) * tt.head_dim + 3 * tt.intermediate_size) / etp
    t.add(f"SGLang prefill workspace ({chunk}-token chunk)", work, "forward only, one layer at a time")
    return t, tokens, concurrency, free_at_start


def _peak_stage(arch: QwenVLArch, cfg: Any, w: Workload, layout: Layout, gpu: GpuSpec, rollout: bool,
                distributed: bool) -> tuple[int, MemoryTable]:
    tables = [training_table(arch, cfg, w, layout, gpu, rollout, distributed, s) for s in range(layout.pp)]
    stage = max(range(layout.pp), key=lambda s: tables[s].total)
    return stage, tables[stage]


# ------------------------------------------------------------------------------------------------ time
def phase_times(arch: QwenVLArch, cfg: Any, w: Workload, layout: Layout, cluster: Cluster, distributed: bool,
                concurrency: int) -> dict[str, float]:
    """Seconds per phase of one step (rollout, log-probs, update, sync for GRPO; update for SFT)."""
    gpu, m = cluster.gpu, cfg.model
    b = mem.DTYPE_BYTES[m.params_dtype]
    grids = w.grids(w.images_per_prompt)
    f = timing.sequence_flops(arch, w.prompt_tokens, w.response_tokens, grids,
                              targets=math.ceil(w.seq_tokens * w.target_share))
    seqs_replica = w.sequences / layout.dp
    mbt = max(w.micro_batch_tokens, w.seq_tokens)
    out: dict[str, float] = {}
    if w.job == "grpo":
        etp = cfg.rollout.sglang_tp_size
        engines = cluster.world // etp
        per_engine = math.ceil(w.sequences / engines)
        prefill = per_engine * f.prefill / (etp * gpu.rate("train").value)
        cell = mem.kv_bytes_per_token(arch.text, etp)
        decode = timing.decode_seconds(arch, gpu, etp, per_engine, concurrency, w.prompt_tokens, w.response_tokens,
                                       cell, mem.engine_weight_bytes(arch, etp))
        out["rollout"] = prefill + decode
        passes = 2 if w.with_reference else 1
        mbs = w.micro_batches(math.ceil(seqs_replica))
        out["log-probs"] = passes * timing.model_phase_seconds(arch, gpu, layout, seqs_replica * f.decoder,
                                                               seqs_replica * f.vision, mbs, mbt, 2, b,
                                                               seqs_replica * f.output)
    # Update: forward + backward (3 forwards) plus what recompute runs again.
    fwd_dec = {"none": 3.0, "selective": 3.0, "full": 4.0}[m.recompute_granularity]
    fwd_vis = 4.0 if m.vision_recompute else 3.0
    collectives = 6 if m.recompute_granularity == "full" else 4
    fwd_out = 4.0 if w.logprob_path == "hidden" else 3.0  # the hidden-state path recomputes the logits in backward
    sp = mem.stage_params(arch, layout.tp, layout.pp, 0)
    trainable = sp.trainable(w.freeze_vision, w.freeze_projector)
    extra = (timing.dp_grad_seconds(gpu, trainable, layout, cluster.gpus_per_node)
             + timing.optimizer_seconds(gpu, trainable, layout.dp if distributed else 1))
    update = 0.0
    for prompts in w.update_prompts():
        seqs = prompts * w.n / layout.dp
        mbs = w.micro_batches(math.ceil(seqs))
        update += extra + timing.model_phase_seconds(arch, gpu, layout, fwd_dec * seqs * f.decoder,
                                                     fwd_vis * seqs * f.vision, mbs, mbt, collectives, b,
                                                     fwd_out * seqs * f.output)
    out["update"] = w.ppo_epochs * update
    if w.job == "grpo":
        out["weight sync"] = mem.engine_weight_bytes(arch, 1) / gpu.rate("nvlink").value
    return out


# ------------------------------------------------------------------------------------------------ layouts
def evaluate_layout(arch: QwenVLArch, cfg: Any, w: Workload, cluster: Cluster, tp: int, pp: int,
                    distributed: bool, frac: float) -> LayoutPlan:
    """Checks, memory and time of one layout."""
    world = cluster.world
    layout = Layout(tp, pp, world // (tp * pp) if world % (tp * pp) == 0 else 0)
    try:
        model_cfg = dataclasses.replace(cfg.model, tp=tp, pp=pp)
    except ValueError as e:  # a cross-field rule of ModelConfig refuses this layout (sequence parallelism at TP 1)
        return LayoutPlan(layout, valid=False, fits=False, reason=str(e), checks=CheckResult(errors=[str(e)]),
                          short_reason=str(e))
    checks = layout_check(arch, model_cfg, world, cluster.gpus_per_node)
    if checks.ok and layout.dp:
        trial = dataclasses.replace(cfg, model=model_cfg)
        checks.extend(batch_check(trial, w.job, layout.dp, tp, w.stage if w.job == "grpo" else None))
    checks.extend(length_check(arch, cfg, w.job))
    rollout = w.job == "grpo"
    if rollout:
        checks.extend(rollout_check(arch, cfg, world, cluster.gpus_per_node))
    first = checks.errors[0] if checks.errors else ""
    plan = LayoutPlan(layout, valid=checks.ok, fits=False, reason=first, checks=checks, short_reason=first)
    if not checks.ok:
        return plan
    trial = dataclasses.replace(cfg, model=model_cfg)
    plan.train_stage, plan.training = _peak_stage(arch, trial, w, layout, cluster.gpu, rollout, distributed)
    card = cluster.gpu.memory_bytes
    problems: list[tuple[str, str]] = []  # (short, full)
    if plan.training.total > card:
        problems.append((f"training {plan.training.total / GIB:.1f} GiB > {card / GIB:.1f}",
                         f"training phase needs {plan.training.total / GIB:.1f} GiB of {card / GIB:.1f} (stage "
                         f"{plan.train_stage}); {_training_advice(trial)}"))
    if rollout:
        rollouts = [rollout_table(arch, trial, w, layout, cluster.gpu, distributed, s, frac) for s in range(pp)]
        plan.rollout, plan.kv_tokens, plan.concurrency, free = max(rollouts, key=lambda r: r[0].total)
        if plan.concurrency < 1:
            problems.append(("KV cache < 1 sequence",
                             f"rollout phase: the KV cache holds {plan.kv_tokens:,} tokens, less than one sequence of "
                             f"{w.seq_tokens}; raise rollout.sglang_args.mem_fraction_static or rollout.sglang_tp_size"))
        elif plan.rollout.total > card:
            advice = _rollout_advice(plan.rollout.total - card, free, frac)
            problems.append((f"rollout {plan.rollout.total / GIB:.1f} GiB > {card / GIB:.1f} ({advice.split('use ')[-1]})",
                             f"rollout phase needs {plan.rollout.total / GIB:.1f} GiB of {card / GIB:.1f}: SGLang sized "
                             f"its KV cache from the memory free at start-up, before Adam's moments "
                             f"({plan.rollout.get('actor: Adam moments') / GIB:.1f} GiB) existed; {advice}"))
    plan.fits = not problems
    plan.short_reason = "; ".join(p[0] for p in problems)
    plan.reason = "; ".join(p[1] for p in problems)
    if not rollout or plan.concurrency >= 1:  # no time for a rollout that cannot hold one sequence
        plan.times = phase_times(arch, trial, w, layout, cluster, distributed, plan.concurrency)
    return plan


def _training_advice(cfg: Any) -> str:
    tips = []
    if cfg.model.recompute_granularity != "full":
        tips.append("model.recompute_granularity=full")
    if not cfg.model.vision_recompute:
        tips.append("model.vision_recompute=true")
    tips.append("a smaller actor.micro_batch_tokens")
    if cfg.actor.distributed_optimizer != "on":
        tips.append("actor.distributed_optimizer=on (needs TE or Apex)")
    return "try " + ", ".join(tips)


def _rollout_advice(over: float, free_at_start: float, frac: float) -> str:
    """The largest mem_fraction_static that removes `over` bytes (the KV cache shrinks by frac x free)."""
    lower = math.floor((frac - over / max(free_at_start, 1.0)) * 100) / 100
    if lower <= 0:
        return "the actor leaves no room for the engine on this layout"
    return f"use rollout.sglang_args.mem_fraction_static <= {lower:.2f}"


def make_plan(cfg: Any, arch: QwenVLArch, cluster: Cluster, job: str = "grpo", arch_source: str = "",
              prompt_tokens: int | None = None, response_tokens: int | None = None,
              images_per_prompt: int = 1) -> Plan:
    """Every layout of `cluster` for `cfg`'s step, ranked (fitting ones by estimated step time first)."""
    w = workload_from_config(cfg, arch, job, prompt_tokens, response_tokens, images_per_prompt)
    distributed = uses_distributed_optimizer(cfg)
    frac_cfg = cfg.rollout.sglang_args.get("mem_fraction_static")
    frac = float(frac_cfg) if frac_cfg is not None else SGLANG_DEFAULT_MEM_FRACTION
    layouts = []
    for tp in divisors(cluster.gpus_per_node):
        for pp in divisors(cluster.world // tp):
            layouts.append(evaluate_layout(arch, cfg, w, cluster, tp, pp, distributed, frac))
    layouts.sort(key=lambda p: (not p.fits, not p.valid, p.step_seconds, p.layout.tp, p.layout.pp))
    configured = Layout(cfg.model.tp, cfg.model.pp, cluster.world // (cfg.model.tp * cfg.model.pp)) \
        if cfg.model.tp >= 1 and cfg.model.pp >= 1 and cluster.world % (cfg.model.tp * cfg.model.pp) == 0 else None
    detail = next((p for p in layouts if configured and (p.layout.tp, p.layout.pp) == (configured.tp, configured.pp)
                   and p.training is not None), None)
    if detail is None:
        detail = next((p for p in layouts if p.training is not None), None)
    gpu = cluster.gpu
    rates = {name: gpu.rate(name).describe() for name in ("train", "copy", "nvlink", "internode")}
    # The configured layout through the very checks `pebr train` runs at start-up on this cluster.
    errors = run_checks(cfg, cluster.world, "sft" if job == "sft" else "train", cluster.gpus_per_node, arch).errors
    return Plan(arch, arch_source, cluster, w, configured, layouts, detail, distributed, frac, frac_cfg is None, rates,
                errors)
