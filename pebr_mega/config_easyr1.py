"""EasyR1's config keys, read into pebr's config tree (`docs/TRAINING.md`, "Coming from EasyR1").

PeBR-R1 is an EasyR1 fork, so its users bring EasyR1 config files (`data:`, `algorithm:`, `worker:`, `trainer:`)
and EasyR1 key names on the command line. Every EasyR1 key the PeBR-R1 stage configs use
(`examples/pebr_stage1.yaml`, `pebr_stage2.yaml`, `pebr_sample.yaml`) has one row in `EASYR1_KEYS`:

- translated: the same meaning under a pebr key (`worker.actor.optim.lr` -> `actor.lr`), the value converted
  where the encodings differ (`save_freq: -1` -> `grpo.save_every: 0`);
- noted: a setting of EasyR1's FSDP/vLLM machinery with no counterpart here (offload, FSDP sharding, vLLM's
  eager mode); it does not change what is trained, so it is dropped with one note line naming what pebr uses;
- refused: a behaviour pebr does not have (online filtering, a custom reward function, KL in the reward); one
  error line naming the key and what to use instead.

An EasyR1 key that is not in the table is an error naming it. The translation is a pure function of the
mapping, so `pebr config` prints exactly what a run will use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pebr_mega.config_fields import ConfigError

# The top-level sections of an EasyR1 config; a file whose sections are among these and that has `worker` or
# `trainer` is read as EasyR1's.
EASYR1_SECTIONS = frozenset({"data", "algorithm", "worker", "trainer"})


@dataclass(frozen=True)
class Rule:
    """What one EasyR1 key becomes: `target` (a pebr key) with `convert` applied, a `note`, or an `error`."""

    target: str | None = None
    convert: Callable[[Any], Any] | None = None
    note: str | None = None
    error: str | None = None


def _minus_one_to(value_for_minus_one: Any) -> Callable[[Any], Any]:
    return lambda v: value_for_minus_one if v in (-1, None) else v


def _kl_type(v: Any) -> str:
    names = {"low_var_kl": "low_var_kl", "kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2"}
    if v not in names:
        raise ConfigError(f"algorithm.kl_penalty={v!r} has no pebr counterpart; algo.kl_type is one of "
                          f"{sorted(set(names.values()))} (low_var_kl, kl = k1, mse = k2)")
    return names[v]


def _loss_avg(v: Any) -> str:
    # EasyR1's `token` is the token mean of each micro-batch, averaged over micro-batches and ranks
    # (docs/MODEL.md, "Loss aggregation"): pebr's `token-mean-microbatch`; `seq` is the sequence mean.
    names = {"token": "token-mean-microbatch", "seq": "seq-mean-token-mean"}
    if v not in names:
        raise ConfigError(f"worker.actor.loss_avg_mode={v!r}: pebr knows token and seq (algo.agg)")
    return names[v]


def _reward_stage(v: Any) -> str:
    name = str(v).split(":")[0].rsplit("/", 1)[-1]
    stages = {"pebr_1.py": "stage1", "pebr_2.py": "stage2", "pebr_sample.py": "stage2"}
    if name not in stages:
        raise ConfigError(f"worker.reward.reward_function={v!r}: pebr's rewards are built in (upstream's pebr_1.py "
                          "and pebr_2.py); grpo.stage picks the preset and rewards.weights scales its parts")
    return stages[name]


def _local_file(key: str) -> Callable[[Any], Any]:
    def convert(v: Any) -> Any:
        if isinstance(v, str) and "@" in v and not v.startswith(("/", ".")):
            raise ConfigError(f"{key}={v!r} names a Hub dataset (repo@split), which pebr does not download: give "
                              "the local JSON/JSONL/parquet file")
        return v
    return convert


def _betas(v: Any) -> dict[str, Any]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ConfigError(f"worker.actor.optim.betas={v!r} must be [beta1, beta2]")
    return {"actor.adam_beta1": v[0], "actor.adam_beta2": v[1]}


def _loggers(v: Any) -> dict[str, Any]:
    loggers = [v] if isinstance(v, str) else list(v or [])
    unknown = [x for x in loggers if x not in ("console", "wandb", "tensorboard", "file")]
    if unknown:
        raise ConfigError(f"trainer.logger={v!r}: pebr logs to the console and metrics.jsonl always, to wandb and "
                          f"TensorBoard when asked; it has no {unknown[0]!r} sink")
    return {"logging.wandb_mode": "online" if "wandb" in loggers else "disabled",
            "logging.tensorboard": "tensorboard" in loggers}


def _expect(value: Any, why: str) -> Callable[[Any], None]:
    """A key pebr accepts only at `value` (the behaviour it has); any other value is `why`."""
    def check(v: Any) -> None:
        if v != value:
            raise ConfigError(why.format(v=v))
    return check


FSDP = "pebr trains with Megatron-Core: model.tp / model.pp / actor.distributed_optimizer decide sharding"
VLLM = "pebr rolls out with SGLang: rollout.sglang_args passes the engine's own arguments"

EASYR1_KEYS: dict[str, Rule] = {
    # data
    "data.train_files": Rule("grpo.train_file", _local_file("data.train_files")),
    "data.val_files": Rule("data.eval_file", _local_file("data.val_files")),
    "data.prompt_key": Rule("data.prompt_key"),
    "data.answer_key": Rule("data.answer_key"),
    "data.image_key": Rule("data.image_key"),
    "data.image_dir": Rule("data.image_root"),
    "data.max_prompt_length": Rule("data.max_prompt_length"),
    "data.max_response_length": Rule("rollout.max_new_tokens"),
    "data.rollout_batch_size": Rule("grpo.rollout_batch_size"),
    "data.mini_rollout_batch_size": Rule(convert=_expect(None, "data.mini_rollout_batch_size={v}: pebr generates "
                                                               "the whole rollout batch at once (rollout.batch_size "
                                                               "sets the engine's request batch)")),
    "data.val_batch_size": Rule(note="the evaluation batch is rollout.batch_size"),
    "data.format_prompt": Rule("data.format_prompt"),
    "data.override_chat_template": Rule(convert=_expect(None, "data.override_chat_template={v!r}: pebr prompts with "
                                                              "the model's own chat template")),
    "data.shuffle": Rule("grpo.shuffle"),
    "data.seed": Rule("run.seed"),
    "data.min_pixels": Rule("images.min_pixels"),
    "data.max_pixels": Rule("images.max_pixels"),
    "data.filter_overlong_prompts": Rule("data.filter_overlong_prompts"),
    # algorithm
    "algorithm.adv_estimator": Rule(convert=_expect("grpo", "algorithm.adv_estimator={v!r}: pebr trains GRPO only")),
    "algorithm.disable_kl": Rule(convert=_expect(False, "algorithm.disable_kl=true: set algo.kl_coef=0 instead")),
    "algorithm.use_kl_loss": Rule(convert=_expect(True, "algorithm.use_kl_loss=false puts the KL in the reward, "
                                                        "which pebr does not do; the KL is a loss term (algo.kl_coef)")),
    "algorithm.kl_penalty": Rule("algo.kl_type", _kl_type),
    "algorithm.kl_coef": Rule("algo.kl_coef"),
    "algorithm.online_filtering": Rule(convert=_expect(False, "algorithm.online_filtering=true: pebr filters by "
                                                              "difficulty offline (pebr sample, pebr split)")),
    "algorithm.filter_key": Rule(note="only used by online filtering, which pebr replaces with pebr sample/split"),
    "algorithm.filter_low": Rule(note="only used by online filtering, which pebr replaces with pebr sample/split"),
    "algorithm.filter_high": Rule(note="only used by online filtering, which pebr replaces with pebr sample/split"),
    # worker.actor
    "worker.actor.global_batch_size": Rule("grpo.mini_batch_size"),
    "worker.actor.micro_batch_size_per_device_for_update": Rule(
        note="pebr packs micro-batches by tokens: actor.micro_batch_tokens"),
    "worker.actor.micro_batch_size_per_device_for_experience": Rule(
        note="pebr packs micro-batches by tokens: actor.micro_batch_tokens"),
    "worker.actor.max_grad_norm": Rule("actor.clip_grad"),
    "worker.actor.clip_ratio_low": Rule("algo.clip_low"),
    "worker.actor.clip_ratio_high": Rule("algo.clip_high"),
    "worker.actor.clip_ratio_dual": Rule("algo.clip_dual"),
    "worker.actor.loss_avg_mode": Rule("algo.agg", _loss_avg),
    "worker.actor.ppo_epochs": Rule("grpo.ppo_epochs"),
    "worker.actor.padding_free": Rule(note="pebr always packs sequences (padding-free)"),
    "worker.actor.ulysses_size": Rule(note="pebr parallelises with model.tp (and sequence parallelism with it)"),
    "worker.actor.model.model_path": Rule("grpo.init_model"),
    "worker.actor.model.enable_gradient_checkpointing": Rule(
        note="activation recomputation is model.recompute_granularity"),
    "worker.actor.model.trust_remote_code": Rule(note="the Qwen2.5-VL model is built in"),
    "worker.actor.model.freeze_vision_tower": Rule("actor.freeze_vision"),
    "worker.actor.optim.lr": Rule("actor.lr"),
    "worker.actor.optim.weight_decay": Rule("actor.weight_decay"),
    "worker.actor.optim.lr_warmup_ratio": Rule("actor.warmup_ratio"),
    "worker.actor.optim.strategy": Rule(convert=_expect("adamw", "worker.actor.optim.strategy={v!r}: pebr's optimizer "
                                                                 "is AdamW with fp32 states")),
    "worker.actor.optim.betas": Rule("actor.adam_beta1, actor.adam_beta2", _betas),
    "worker.actor.fsdp.enable_full_shard": Rule(note=FSDP),
    "worker.actor.fsdp.enable_cpu_offload": Rule(note=FSDP),
    "worker.actor.fsdp.enable_rank0_init": Rule(note=FSDP),
    "worker.actor.offload.offload_params": Rule(note=FSDP),
    "worker.actor.offload.offload_optimizer": Rule(note=FSDP),
    "worker.ref.fsdp.enable_full_shard": Rule(note=FSDP),
    "worker.ref.fsdp.enable_cpu_offload": Rule(note=FSDP),
    "worker.ref.fsdp.enable_rank0_init": Rule(note=FSDP),
    "worker.ref.offload.offload_params": Rule(note=FSDP),
    # worker.rollout
    "worker.rollout.n": Rule("rollout.n"),
    "worker.rollout.temperature": Rule("rollout.temperature"),
    "worker.rollout.top_p": Rule("rollout.top_p"),
    "worker.rollout.top_k": Rule("rollout.top_k"),
    "worker.rollout.gpu_memory_utilization": Rule("rollout.sglang_args.mem_fraction_static"),
    "worker.rollout.tensor_parallel_size": Rule("rollout.sglang_tp_size"),
    "worker.rollout.enforce_eager": Rule(note=VLLM),
    "worker.rollout.enable_chunked_prefill": Rule(note=VLLM),
    "worker.rollout.limit_images": Rule(note="images per prompt are not limited"),
    "worker.rollout.val_override_config.temperature": Rule("rollout.val_temperature"),
    "worker.rollout.val_override_config.n": Rule("rollout.val_n"),
    # worker.reward
    "worker.reward.reward_type": Rule(note="rewards are scored in batches in worker processes"),
    "worker.reward.reward_function": Rule("grpo.stage", _reward_stage),
    # trainer
    "trainer.total_epochs": Rule("grpo.epochs"),
    "trainer.max_steps": Rule("grpo.max_steps", _minus_one_to(-1)),
    "trainer.project_name": Rule("logging.wandb_project"),
    "trainer.experiment_name": Rule("logging.wandb_run_name"),
    "trainer.logger": Rule("logging.wandb_mode, logging.tensorboard", _loggers),
    "trainer.nnodes": Rule(note="the world comes from the launcher (launch/torchrun.sh, the sbatch scripts)"),
    "trainer.n_gpus_per_node": Rule(note="the world comes from the launcher (launch/torchrun.sh, the sbatch scripts)"),
    "trainer.max_try_make_batch": Rule(note="pebr does not resample batches (no online filtering)"),
    "trainer.val_freq": Rule("grpo.eval_every", _minus_one_to(0)),
    "trainer.val_before_train": Rule("grpo.eval_before"),
    "trainer.val_only": Rule(convert=_expect(False, "trainer.val_only=true: use `pebr eval --model DIR --dataset F`")),
    "trainer.val_generations_to_log": Rule("logging.log_generations"),
    "trainer.save_freq": Rule("grpo.save_every", _minus_one_to(0)),
    "trainer.save_limit": Rule("grpo.keep_last", _minus_one_to(1_000_000)),
    "trainer.save_model_only": Rule(note="checkpoints keep the optimizer so that a run resumes exactly"),
    "trainer.save_checkpoint_path": Rule("run.output_dir"),
    "trainer.load_checkpoint_path": Rule(convert=_expect(None, "trainer.load_checkpoint_path={v!r}: pebr resumes "
                                                               "from run.output_dir's own checkpoints")),
}


def is_easyr1_tree(tree: dict) -> bool:
    """Whether a loaded config mapping is in EasyR1's layout (its sections only, with worker: or trainer:)."""
    keys = set(tree)
    return bool(keys) and keys <= EASYR1_SECTIONS and bool(keys & {"worker", "trainer"})


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; a mapping under a key the table names as a whole stays whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in EASYR1_KEYS:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def translate_key(key: str, value: Any) -> tuple[dict[str, Any], str | None]:
    """One EasyR1 `key` = `value` as pebr settings (dotted key -> value) and a note line or None; a key outside
    the table, or a value pebr cannot honour, is a `ConfigError` naming it."""
    rule = EASYR1_KEYS.get(key)
    if rule is None:
        raise ConfigError(f"EasyR1 key '{key}' has no pebr counterpart (docs/TRAINING.md, \"Coming from EasyR1\", "
                          "lists every key pebr reads)")
    if rule.target is None:
        if rule.convert is not None:
            rule.convert(value)  # raises when the value asks for a behaviour pebr lacks
        return {}, rule.note
    converted = rule.convert(value) if rule.convert is not None else value
    if "," in rule.target:  # one EasyR1 key, several pebr keys: the converter gives each its value
        return converted, None
    return {rule.target: converted}, None


def translate_tree(tree: dict) -> tuple[dict[str, Any], list[str]]:
    """An EasyR1 config mapping as pebr's dotted settings, and one note line per reason for the keys dropped
    (`EasyR1 keys a, b ignored: why`)."""
    settings: dict[str, Any] = {}
    dropped: dict[str, list[str]] = {}
    for key, value in flatten(tree).items():
        out, note = translate_key(key, value)
        settings.update(out)
        if note:
            dropped.setdefault(note, []).append(key)
    notes = [f"EasyR1 key{'s' if len(keys) > 1 else ''} {', '.join(keys)} ignored: {why}" for why, keys in dropped.items()]
    return settings, notes


def renamed_key(key: str) -> str | None:
    """The pebr key of an EasyR1 key that is only renamed (same meaning, same encoding), else None."""
    rule = EASYR1_KEYS.get(key)
    if rule is None or rule.target is None or rule.convert is not None or "," in rule.target:
        return None
    return rule.target


def is_easyr1_key(key: str) -> bool:
    """Whether a dotted override key is EasyR1's (its first part is one of EasyR1's own sections, and it is not a
    key pebr's tree also has: `data.max_prompt_length` is both and stays pebr's)."""
    return key in EASYR1_KEYS or key.split(".", 1)[0] in {"worker", "trainer", "algorithm"}
