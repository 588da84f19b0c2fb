"""`pebr plan`'s output: a readable report, or JSON for tools (`total_parameters`, `layouts`, ...)."""
from __future__ import annotations

from pebr_mega.plan.memory import GIB, MemoryTable
from pebr_mega.plan.planner import LayoutPlan, Plan
from pebr_mega.plan.shapes import SHAPE_NAMES

WIDTH = 62


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def _table(title: str, t: MemoryTable, card: int) -> list[str]:
    lines = [f"{title:<{WIDTH}} {'GiB':>7}   note"]
    for r in t.rows:
        lines.append(f"  {r.name:<{WIDTH - 2}} {_gib(r.bytes)}   {r.note}".rstrip())
    verdict = "fits" if t.total <= card else f"DOES NOT FIT (over by {(t.total - card) / GIB:.2f} GiB)"
    lines.append(f"  {'peak (rows in parentheses not counted)':<{WIDTH - 2}} {_gib(t.total)}   of {card / GIB:.1f}: {verdict}")
    return lines


def _model_name(plan: Plan) -> str:
    for name in SHAPE_NAMES.values():
        if name in plan.arch_source:
            return name
    t = plan.arch.text
    return f"Qwen2.5-VL ({t.num_layers} layers, hidden {t.hidden_size})"


def _workload_lines(plan: Plan) -> list[str]:
    w, g = plan.workload, plan.workload.image_grid
    img_tokens = g[0] * g[1] * g[2] // plan.arch.vision.spatial_merge_size**2
    side = g[1] * plan.arch.vision.patch_size
    if w.job == "grpo":
        sizes = w.update_prompts()
        last = f", the last of each epoch {sizes[-1]}" if sizes[-1] != sizes[0] else ""
        head = (f"step ({w.stage}): {w.prompts} prompts x {w.n} samples = {w.sequences} sequences of <= {w.prompt_tokens} "
                f"prompt + {w.response_tokens} response tokens; {w.updates} update(s) of {sizes[0]} prompts{last}"
                f"; reference model: {'yes' if w.with_reference else 'no'}")
    else:
        head = f"step (sft): one update of {w.prompts} conversations of <= {w.prompt_tokens} tokens"
    return [head, f"  {w.images_per_prompt} image(s) per prompt at images.max_pixels: {side}x{side} px = {g[1]}x{g[2]} "
                  f"patches = {img_tokens} tokens each; micro-batches of {max(w.micro_batch_tokens, w.seq_tokens)} tokens"]


def _layout_row(p: LayoutPlan) -> str:
    lay = p.layout
    train = f"{p.training.total / GIB:6.1f}" if p.training is not None else f"{'-':>6}"
    roll = f"{p.rollout.total / GIB:6.1f}" if p.rollout is not None else f"{'-':>6}"
    step = f"{p.step_seconds:8.1f}" if p.times else f"{'-':>8}"
    verdict = "yes" if p.fits else ("no" if p.valid else "invalid")
    return f"  {lay.tp:>3} {lay.pp:>3} {lay.dp:>3}  {verdict:<7} {train} {roll} {step}   {p.short_reason}"


def format_plan(plan: Plan) -> str:
    """The human-readable report."""
    c, gpu = plan.cluster, plan.cluster.gpu
    card = gpu.memory_bytes
    out = [f"pebr plan: {_model_name(plan)}, {plan.total_parameters / 1e9:.2f} B parameters ({plan.arch_source})",
           f"cluster: {c.nodes} node(s) x {c.gpus_per_node} {gpu.label} ({card / GIB:.1f} GiB each) = {c.world} GPUs"]
    out += _workload_lines(plan)
    d = plan.detail
    if plan.configured_errors:
        out.append("the configured layout cannot start on this cluster (the start-up checks of the run):")
        out += [f"  - {e}" for e in plan.configured_errors]
    if d is None:
        out.append("no layout passes the start-up checks on this cluster; see the reasons below")
    else:
        lay = d.layout
        if plan.configured and (plan.configured.tp, plan.configured.pp) == (lay.tp, lay.pp):
            which = "the configured layout"
        else:
            which = "the fastest valid layout (the configured one cannot start here: see the failed checks above)"
        out.append(f"per GPU for model.tp={lay.tp} model.pp={lay.pp} -> DP={lay.dp}, {which}; optimizer "
                   f"{'distributed' if plan.distributed_optimizer else 'not distributed'} (actor.distributed_optimizer)")
        out.append("")
        out += _table(f"Training phase (stage {d.train_stage} of {lay.pp}, the most loaded)", d.training, card)
        if d.rollout is not None:
            out.append("")
            frac = f"{plan.mem_fraction}" + (" (SGLang's default, assumed)" if plan.mem_fraction_assumed else "")
            out += _table(f"Rollout phase (SGLang, mem_fraction_static {frac})", d.rollout, card)
            out.append("")
            out.append("Colocated schedule: SGLang releases its weights and KV cache while the actor trains; the actor's "
                       "parameters, gradients, optimizer state and the reference stay resident.")
            status = "fits" if d.fits else f"does not fit: {d.reason}"
            out.append(f"  training peak {d.training.total / GIB:.1f} GiB, rollout peak {d.rollout.total / GIB:.1f} GiB, "
                       f"card {card / GIB:.1f} GiB: {status}")
        out.append("")
        out.append("Estimated step time (seconds; lengths at the configured maxima unless overridden):")
        for k, v in d.times.items():
            out.append(f"  {k:<12} {v:9.2f}")
        out.append(f"  {'total':<12} {d.step_seconds:9.2f}   (reward scoring not modelled)")
    out.append("")
    out.append(f"Rates ({gpu.name}):")
    for k, v in plan.rates.items():
        out.append(f"  {k:<10} {v}")
    out.append("")
    out.append("Layouts (TP: divisors of the GPUs per node; PP: divisors of the rest; DP = GPUs / (TP x PP)), fitting ones "
               "ranked by estimated step time:")
    out.append(f"  {'tp':>3} {'pp':>3} {'dp':>3}  {'fits':<7} {'train':>6} {'rollout':>6} {'step s':>8}   reason")
    out += [_layout_row(p) for p in plan.layouts]
    notes = []
    for p in plan.layouts:
        notes += [n for n in p.checks.notes if n not in notes]
    if notes:
        out.append("")
        out.append("Notes:")
        out += [f"  - {n}" for n in notes]
    return "\n".join(out)


def _rows(t: MemoryTable | None) -> list[dict] | None:
    if t is None:
        return None
    return [{"name": r.name.strip(), "gib": round(r.bytes / GIB, 3), "counted": r.counted, "note": r.note}
            for r in t.rows]


def plan_to_json(plan: Plan) -> dict:
    """The plan as plain data: `total_parameters`, `layouts` (tp, pp, dp, fits, reason, ...), the detail tables."""
    c, w = plan.cluster, plan.workload
    d = plan.detail
    return {
        "model": _model_name(plan),
        "arch_source": plan.arch_source,
        "total_parameters": plan.total_parameters,
        "cluster": {"nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "gpu": c.gpu.name,
                    "gpu_memory_gib": round(c.gpu.memory_bytes / GIB, 2)},
        "workload": {"job": w.job, "stage": w.stage, "prompts": w.prompts, "n": w.n, "prompt_tokens": w.prompt_tokens,
                     "response_tokens": w.response_tokens, "images_per_prompt": w.images_per_prompt,
                     "micro_batch_tokens": w.micro_batch_tokens, "updates": w.updates,
                     "update_prompts": w.update_prompts(), "target_share": round(w.target_share, 4),
                     "logprobs_from": w.logprob_path},
        "configured": None if plan.configured is None else {"tp": plan.configured.tp, "pp": plan.configured.pp,
                                                             "dp": plan.configured.dp},
        "configured_errors": plan.configured_errors,
        "distributed_optimizer": plan.distributed_optimizer,
        "mem_fraction_static": plan.mem_fraction,
        "detail": None if d is None else {**d.to_json(), "training": _rows(d.training), "rollout": _rows(d.rollout)},
        "rates": plan.rates,
        "layouts": [p.to_json() for p in plan.layouts],
    }
