"""Will a run fit, and how fast will it go: answered from the config and the architecture, before any GPU-hour.

- `make_plan(cfg, arch, cluster)`: per-GPU memory of the colocated schedule (actor, optimizer, reference,
  activations, the log-probs of the target positions; SGLang's weights, KV cache and CUDA graphs), its feasibility, a step-time estimate per
  phase from the FLOPs and the card's measured rates, and every parallel layout ranked (`pebr plan`);
- `startup_checks(cfg, command, world)`: the same divisibility and size rules, one GPU per process and the
  input paths, run at the start of `pebr train`/`sft`/`sample`/`pipeline` (and by their `--dry-run`) before
  anything is loaded; `check_startup` raises on them.

The component reads the config tree and the model architecture; it imports no trainer.
"""
from pebr_mega.plan.checks import CheckResult, StartupCheckError, run_checks
from pebr_mega.plan.hardware import GPUS, gpu_spec
from pebr_mega.plan.planner import Cluster, LayoutPlan, Plan, make_plan
from pebr_mega.plan.report import format_plan, plan_to_json
from pebr_mega.plan.shapes import BUILTIN_SHAPES, resolve_arch
from pebr_mega.plan.startup import World, check_startup, startup_checks

__all__ = ["BUILTIN_SHAPES", "GPUS", "CheckResult", "Cluster", "LayoutPlan", "Plan", "StartupCheckError", "World",
           "check_startup", "format_plan", "gpu_spec", "make_plan", "plan_to_json", "resolve_arch", "run_checks",
           "startup_checks"]
