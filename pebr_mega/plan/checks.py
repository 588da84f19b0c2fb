"""The divisibility and size rules a run must satisfy, checked before anything is loaded.

One set of rules serves both `pebr plan` (which layouts are valid) and the start-up of `pebr train`, `sft`,
`sample` and `pipeline` (`plan/startup.py`, for the run and its dry run), so the two cannot disagree. Each
failure is one line that names the keys and a value that would work. What the code tolerates but the user should know (an uneven pipeline
split, uneven data-parallel shares) is a note, not a failure.

The rules and where they come from:
- heads, KV heads, FFN width and vocabulary divide by TP: Megatron's column/row-parallel layers split them
  evenly, and the vocabulary is not padded (docs/MODEL.md: logits stay exact); TP stays inside a node.
- PP: every stage needs at least one decoder layer; uneven splits are allowed, the last stage takes the rest
  (`models/qwen25_vl._pipeline_split`).
- world size = TP x PP x DP (`parallel/groups.init_parallel`); every update needs at least one sequence per
  data-parallel rank (`MegatronActor.train_step`): for GRPO the updates the trainer cuts from a rollout step
  (whole mini-batches, then the rest: `trainer/grpo.py`), for SFT a batch.
- FP8 (Transformer Engine): GEMM dims multiple of 16. Token counts need no rule: the packer pads every
  micro-batch to `models.config.token_multiple` (16, x TP with sequence parallelism) itself; a budget that
  is not such a multiple gets a note (a full micro-batch is padded past it).
- prompt + response (or the SFT cutoff) within the model's `max_position_embeddings`.
- SGLang: rollout TP divides the GPUs per node (a group must not straddle nodes, `rollout/sglang_engine.py`)
  and the attention heads; `mem_fraction_static` in (0, 1).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pebr_mega.config_fields import ConfigError
from pebr_mega.models.arch import QwenVLArch
from pebr_mega.models.config import token_multiple
from pebr_mega.plan.shapes import try_resolve_arch

COMMANDS = ("train", "sft", "sample", "pipeline")


class StartupCheckError(ConfigError):
    """The configuration cannot run on this world; the message has one line per failed rule."""


@dataclass
class CheckResult:
    """Failures (the run cannot start) and notes (it can, but the user should know)."""

    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def extend(self, other: "CheckResult") -> None:
        self.errors += [e for e in other.errors if e not in self.errors]
        self.notes += [n for n in other.notes if n not in self.notes]


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tp(arch: QwenVLArch, limit: int) -> list[int]:
    """TP sizes up to `limit` that divide heads, KV heads, FFN width and vocabulary."""
    t = arch.text
    return [d for d in divisors(limit) if not (t.num_heads % d or t.num_kv_heads % d or t.intermediate_size % d
                                                or t.vocab_size % d)]


# ------------------------------------------------------------------------------------------------ the layout
def layout_check(arch: QwenVLArch | None, model_cfg: Any, world: int, gpus_per_node: int | None) -> CheckResult:
    """The actor's TP/PP layout on `world` GPUs (`gpus_per_node` per node, when known)."""
    r = CheckResult()
    tp, pp = model_cfg.tp, model_cfg.pp
    try:
        dataclasses.replace(model_cfg)  # re-runs ModelConfig.__post_init__ (its cross-field rules) on the values now
    except ValueError as e:
        r.errors.append(str(e))
        return r
    limit = gpus_per_node or world
    if gpus_per_node and gpus_per_node % tp:
        r.errors.append(f"model.tp={tp} must divide the {gpus_per_node} GPUs per node (tensor parallelism stays on "
                        f"NVLink); valid: model.tp in {valid_tp(arch, limit) if arch else divisors(limit)}")
    if world % (tp * pp):
        fits = [f"model.pp={p}" for p in divisors(world // tp)] if world % tp == 0 else []
        r.errors.append(f"model.tp={tp} x model.pp={pp} = {tp * pp} GPUs per model replica does not divide the world "
                        f"size {world}" + (f"; with model.tp={tp}: {', '.join(fits)}" if fits else
                                           f"; choose model.tp in {[d for d in divisors(world) if d <= limit]}"))
    if arch is not None:
        t = arch.text
        good = valid_tp(arch, limit)
        for what, n in (("attention heads", t.num_heads), ("KV heads", t.num_kv_heads),
                        ("FFN width", t.intermediate_size), ("vocabulary size (not padded)", t.vocab_size)):
            if n % tp:
                r.errors.append(f"model.tp={tp} does not divide the model's {n} {what}; valid: model.tp in {good}")
        if pp > t.num_layers:
            r.errors.append(f"model.pp={pp} exceeds the {t.num_layers} decoder layers (every stage needs one); "
                            f"valid: model.pp <= {t.num_layers}")
        elif pp > 1 and t.num_layers % pp:
            base, rem = divmod(t.num_layers, pp)
            r.notes.append(f"model.pp={pp} splits {t.num_layers} layers unevenly ({base} per stage, the last "
                           f"{base + rem}); the pipeline runs at the pace of the last stage")
        if model_cfg.fp8 != "none":
            d = t.head_dim
            dims = {"hidden size": t.hidden_size, "FFN shard": t.intermediate_size // tp,
                    "qkv shard": (t.num_heads + 2 * t.num_kv_heads) * d // tp, "attention shard": t.num_heads * d // tp}
            for what, n in dims.items():
                if n % 16:
                    r.errors.append(f"model.fp8={model_cfg.fp8}: the {what} {n} at model.tp={tp} is not a multiple of "
                                    f"16 (Transformer Engine FP8 GEMMs); use model.fp8=none or another model.tp")
    return r


# ------------------------------------------------------------------------------------------------ the jobs
def _grpo_stage(cfg: Any, stage: str | None = None) -> Any:
    return cfg.grpo if stage is None else cfg.grpo.for_stage(stage)


def _grpo_update_check(cfg: Any, g: Any, dp: int, r: CheckResult) -> None:
    """The GRPO trainer's updates against `dp` data-parallel ranks. A rollout step of grpo.rollout_batch_size
    prompts x rollout.n samples is cut into updates of grpo.mini_batch_size prompts, the last of them what remains
    (all of the step's prompts when it has fewer than a mini-batch): trainer/grpo.py `_update`. Every update needs
    at least one sequence per rank (`MegatronActor.train_step`); the log-prob passes over the whole step do not
    (a rank left without sequences takes part with padding only)."""
    n, rbs, mbs = cfg.rollout.n, g.rollout_batch_size, g.mini_batch_size
    full, rest = divmod(rbs, mbs)
    need = math.ceil(dp / n)  # prompts per update that feed every rank
    if not full:  # one update of the whole step
        if rbs * n < dp:
            r.errors.append(f"grpo.rollout_batch_size={rbs} x rollout.n={n} = {rbs * n} sequences per update ({g.stage}: "
                            f"the step has fewer prompts than grpo.mini_batch_size={mbs}, so one update of all of them) "
                            f"cannot feed {dp} data-parallel ranks; use grpo.rollout_batch_size >= {need} or a larger "
                            f"model.tp x model.pp")
            return
        r.notes.append(f"{g.stage}: grpo.rollout_batch_size={rbs} < grpo.mini_batch_size={mbs}: each step makes one "
                       f"update of its {rbs} prompts")
    elif mbs * n < dp:
        r.errors.append(f"grpo.mini_batch_size={mbs} x rollout.n={n} = {mbs * n} sequences per update ({g.stage}) cannot "
                        f"feed {dp} data-parallel ranks; use grpo.mini_batch_size >= {need} or a larger model.tp x model.pp")
        return
    elif rest and rest * n < dp:
        good = min((k for k in range(need, rbs + 1) if rbs % k == 0 or rbs % k >= need), key=lambda k: (abs(k - mbs), k))
        r.errors.append(f"{g.stage}: the last update of each step gets grpo.rollout_batch_size={rbs} mod "
                        f"grpo.mini_batch_size={mbs} = {rest} prompts x rollout.n={n} = {rest * n} sequences, fewer than "
                        f"the {dp} data-parallel ranks; use grpo.mini_batch_size={good} (every update >= {need} prompts) "
                        f"or a larger model.tp x model.pp")
        return
    elif rest:
        r.notes.append(f"{g.stage}: grpo.rollout_batch_size={rbs} is not a multiple of grpo.mini_batch_size={mbs}: the "
                       f"last update of each step has {rest} prompts")
    per_update = min(rbs, mbs) * n
    if per_update % dp:
        r.notes.append(f"{g.stage}: {per_update} sequences per update over {dp} data-parallel ranks: some ranks get one "
                       f"more (the packer balances their tokens; a multiple of {dp} balances the counts too)")
    if need > 1:
        r.notes.append(f"{g.stage}: an update needs >= {need} prompts to feed {dp} data-parallel ranks; prompts skipped in a "
                       f"step (unreadable image, over-long prompt) come off its last update ({rest or min(rbs, mbs)} "
                       f"prompts), and fewer than {need} left stop the run")


def batch_check(cfg: Any, job: str, dp: int, tp: int, stage: str | None = None) -> CheckResult:
    """Batch sizes against `dp` data-parallel ranks, and the micro-batch token budget, for one job."""
    r = CheckResult()
    mbt = cfg.actor.micro_batch_tokens
    if job == "grpo":
        _grpo_update_check(cfg, _grpo_stage(cfg, stage), dp, r)
        longest = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    elif job == "sft":
        if cfg.sft.batch_size < dp:
            r.errors.append(f"sft.batch_size={cfg.sft.batch_size} conversations per update cannot feed {dp} "
                            f"data-parallel ranks; use sft.batch_size >= {dp} or a larger model.tp x model.pp")
        if dp > 1:
            r.notes.append("sft: the last batch of an epoch is smaller; it needs at least one conversation per "
                           f"data-parallel rank ({dp}), which depends on the data set size")
        longest = cfg.sft.cutoff_len
    else:
        return r
    # The packer pads every micro-batch to this multiple itself (actor/packing.py, models.config.token_multiple):
    # any budget runs, but one that is not a multiple lets a full micro-batch grow past it.
    multiple = token_multiple(tp, cfg.model.sequence_parallel)
    if mbt % multiple:
        why = (f"16 for FP8 GEMMs x TP={tp} for sequence parallelism" if cfg.model.sequence_parallel else
               "16 for FP8 GEMMs, applied on every run" if multiple == 16 else f"lcm(16, TP={tp})")
        r.notes.append(f"actor.micro_batch_tokens={mbt}: the packer pads every micro-batch to a multiple of {multiple} "
                       f"({why}), so a full one holds up to {mbt - mbt % multiple + multiple} tokens; "
                       f"actor.micro_batch_tokens={mbt // multiple * multiple or multiple} keeps them within the budget")
    if longest > mbt:
        r.notes.append(f"{job}: sequences of up to {longest} tokens exceed actor.micro_batch_tokens={mbt}; each such "
                       f"sequence gets a micro-batch of its own")
    return r


def length_check(arch: QwenVLArch, cfg: Any, job: str) -> CheckResult:
    """Sequence lengths against the model's maximum position."""
    r = CheckResult()
    limit = arch.text.max_position_embeddings
    if job in ("grpo", "sample"):
        p, n = cfg.data.max_prompt_length, cfg.rollout.max_new_tokens
        if p + n > limit:
            r.errors.append(f"data.max_prompt_length={p} + rollout.max_new_tokens={n} = {p + n} exceeds the model's "
                            f"max_position_embeddings {limit}; use rollout.max_new_tokens <= {max(limit - p, 1)}")
    if job == "sft" and cfg.sft.cutoff_len > limit:
        r.errors.append(f"sft.cutoff_len={cfg.sft.cutoff_len} exceeds the model's max_position_embeddings {limit}; "
                        f"use sft.cutoff_len <= {limit}")
    return r


def rollout_check(arch: QwenVLArch | None, cfg: Any, world: int, gpus_per_node: int | None) -> CheckResult:
    """The SGLang engine's TP size and memory fraction."""
    r = CheckResult()
    etp = cfg.rollout.sglang_tp_size
    if etp < 1 or world % etp or (gpus_per_node and gpus_per_node % etp):
        limit = math.gcd(world, gpus_per_node or world)
        good = [d for d in divisors(limit) if arch is None or arch.text.num_heads % d == 0]
        r.errors.append(f"rollout.sglang_tp_size={etp} must divide the world size {world}"
                        + (f" and the {gpus_per_node} GPUs per node" if gpus_per_node else "")
                        + f" (an engine's GPUs are one node's); valid: {good}")
    elif arch is not None and arch.text.num_heads % etp:
        good = [d for d in divisors(math.gcd(world, gpus_per_node or world)) if arch.text.num_heads % d == 0]
        r.errors.append(f"rollout.sglang_tp_size={etp} does not divide the model's {arch.text.num_heads} attention "
                        f"heads (SGLang splits heads evenly); valid: {good}")
    frac = cfg.rollout.sglang_args.get("mem_fraction_static")
    if frac is not None and not 0 < float(frac) < 1:
        r.errors.append(f"rollout.sglang_args.mem_fraction_static={frac} must be in (0, 1); SGLang's share of the "
                        f"free memory for weights and KV cache, e.g. 0.6")
    return r


def _uses_sglang(cfg: Any) -> bool:
    if cfg.rollout.engine == "sglang":
        return True
    if cfg.rollout.engine != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def command_jobs(cfg: Any, command: str) -> list[tuple[str, str | None]]:
    """(job, GRPO stage) pairs a command runs: grpo / sft / sample."""
    if command == "train":
        return [("grpo", None)]
    if command in ("sft", "sample"):
        return [(command, None)]
    if command == "pipeline":
        jobs = {"sft": ("sft", None), "sample": ("sample", None), "stage1": ("grpo", "stage1"),
                "stage2": ("grpo", "stage2")}
        return [jobs[s] for s in cfg.pipeline.stages if s in jobs]
    raise ValueError(f"unknown command {command!r}; one of {COMMANDS}")


def model_path(cfg: Any, command: str) -> tuple[str, str]:
    """(config key, path) of the model the command loads first."""
    key = {"train": "grpo.init_model", "sft": "sft.init_model", "sample": "sample.model",
           "pipeline": "pipeline.base_model"}[command]
    section, name = key.split(".")
    return key, getattr(getattr(cfg, section), name)


def run_checks(cfg: Any, world: int, command: str, gpus_per_node: int | None = None,
               arch: QwenVLArch | None = None, rollout_engine: str | None = None) -> CheckResult:
    """Every rule for `command` on `world` GPUs; `arch` None: read it from the command's model, when it can be."""
    r = CheckResult()
    if arch is None:
        found = try_resolve_arch(model_path(cfg, command)[1])
        arch = found[0] if found else None
    jobs = command_jobs(cfg, command)
    trains = any(job in ("grpo", "sft") for job, _ in jobs)
    if trains:
        r.extend(layout_check(arch, cfg.model, world, gpus_per_node))
    tp, pp = max(cfg.model.tp, 1), max(cfg.model.pp, 1)
    dp = world // (tp * pp) if world % (tp * pp) == 0 else None
    sglang = rollout_engine == "sglang" if rollout_engine else _uses_sglang(cfg)
    for job, stage in jobs:
        if job in ("grpo", "sft") and dp and r.ok:
            r.extend(batch_check(cfg, job, dp, tp, stage))
        if arch is not None:
            r.extend(length_check(arch, cfg, job))
        if job in ("grpo", "sample") and sglang:
            r.extend(rollout_check(arch, cfg, world, gpus_per_node))
    if arch is None:
        key, path = model_path(cfg, command)
        r.notes.append(f"{key}={path!r}: architecture unknown before loading; head, layer and length checks skipped")
    return r
