"""The stage sections of the config tree: one GRPO stage, the SFT warm-up, sampling, and the whole recipe.

They are the trainers' own settings, declared here (a leaf importing only `config_fields`) rather than in
`pebr_mega/trainer/`, because the root `pebr_mega.config` composes them and the trainers import the root.

Stage-dependent upstream values are `None` in the schema and filled once, when the config is loaded
(`pebr_mega.config.load_config` calls `GRPOTrainerConfig.with_stage_defaults`): stage 1 uses 560 prompts per
rollout step and 112 per update (5 updates), 1 epoch; stage 2 uses 512 and 128 (4 updates), 2 epochs
(PEBR_FACTS). `grpo.stage` is the one stage switch: it picks these values and the reward preset (the rewards
section has no stage of its own). Code that runs a loaded config as another stage (the pipeline runs both)
asks for `GRPOTrainerConfig.for_stage`, which refills the values the stage, not the user, chose.

Precedence between a stage section and the shared sections (one rule): a key that a stage section declares
under the same name as a key of `actor.*` (the SFT section's `lr`, `warmup_ratio`, `lr_schedule`,
`freeze_vision`, `freeze_projector`) applies to that stage and wins over `actor.*` there; every other
`actor.*` key applies to every stage, and the `actor.*` keys of those names are the GRPO stages' own.
`pebr_mega.trainer.sft.sft_actor_config` applies the rule and the SFT trainer prints what it took.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from pebr_mega.config_fields import ConfigError, check_fields, choice, optional_positive, positive

STAGE_DEFAULTS = {
    "stage1": {"rollout_batch_size": 560, "mini_batch_size": 112, "epochs": 1},
    "stage2": {"rollout_batch_size": 512, "mini_batch_size": 128, "epochs": 2},
}


@dataclass
class StageLoopConfig:
    """The keys the one stage loop (`pebr_mega.trainer.stage.StageTrainer`) reads, the same in every stage."""

    section: ClassVar[str]  # the config section the stage's keys live under (named in messages)

    save_every: int = 0  # steps between checkpoints; 0 = only when interrupted and at the end
    keep_last: int = 1  # complete checkpoints kept
    eval_every: int = 0  # steps between held-out evaluations; 0 = only before and after
    eval_file: str = ""  # GRPO-format held-out set; "" = data.eval_file
    eval_max_samples: int = 0  # 0 = all
    # Evaluate the starting model before the first step. The pipeline does not re-measure a model the stage
    # before it has just evaluated on the same set (recipe/pipeline.py); false skips it (a random base model).
    eval_before: bool = True

    def check_loop(self, section: str) -> None:
        """ConfigError naming `section.key` for a loop key out of range."""
        check_fields(section, {
            "save_every": (self.save_every >= 0, self.save_every, "must be >= 0 (0 = only at the end)"),
            "keep_last": positive(self.keep_last),
            "eval_every": (self.eval_every >= 0, self.eval_every, "must be >= 0 (0 = only before and after)"),
            "eval_max_samples": (self.eval_max_samples >= 0, self.eval_max_samples, "must be >= 0 (0 = all)"),
        })


@dataclass
class GRPOTrainerConfig(StageLoopConfig):
    """One GRPO stage: data sizes, epochs, checkpointing and evaluation."""

    section: ClassVar[str] = "grpo"
    stage: str = choice("stage1", ["stage1", "stage2"])
    init_model: str = ""  # HF dir or Megatron checkpoint the stage starts from (also the frozen reference)
    train_file: str = ""  # GRPO records (easycase.json for stage 1, mediumcase.json for stage 2)
    rollout_batch_size: Optional[int] = None  # prompts per rollout step
    mini_batch_size: Optional[int] = None  # prompts per optimizer update
    ppo_epochs: int = 1
    epochs: Optional[int] = None
    max_steps: int = -1  # -1 = floor(#prompts / rollout_batch_size) x epochs; else at most this many steps
    shuffle: bool = True
    # Records of train_file held out of training and evaluated on instead (chosen by run.seed, after the
    # record filters); 0 = none. Exclusive with an eval file (grpo.eval_file / data.eval_file).
    eval_holdout: int = 0
    save_every: int = 50
    keep_last: int = 2

    def __post_init__(self) -> None:
        self.check_loop("grpo")
        check_fields("grpo", {
            "rollout_batch_size": optional_positive(self.rollout_batch_size),
            "mini_batch_size": optional_positive(self.mini_batch_size),
            "ppo_epochs": positive(self.ppo_epochs),
            "epochs": optional_positive(self.epochs),
            "max_steps": (self.max_steps == -1 or self.max_steps >= 1, self.max_steps, "must be -1 (all) or >= 1"),
            "eval_holdout": (self.eval_holdout >= 0, self.eval_holdout, "must be >= 0 (0 = no held-out slice)"),
        })
        if self.eval_holdout and self.eval_file:
            raise ConfigError(f"grpo.eval_holdout={self.eval_holdout} and grpo.eval_file={self.eval_file!r} both give "
                              "the stage an evaluation set: set one of them")

    def with_stage_defaults(self) -> "GRPOTrainerConfig":
        """A copy with the stage's upstream values filled where the user left `None` (`load_config` calls it
        once). The copy remembers which keys the stage filled, so that `for_stage` can refill them."""
        filled = {k: v for k, v in STAGE_DEFAULTS[self.stage].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **filled)
        # Not a field: not a config key, not in to_dict/to_yaml; copies (deepcopy, pickle) keep it.
        out._stage_filled = frozenset(filled) | getattr(self, "_stage_filled", frozenset())
        return out

    def for_stage(self, stage: str) -> "GRPOTrainerConfig":
        """This (loaded) config run as `stage`: the values the old stage filled are the new stage's, the
        values the user set stay (also one assigned after loading: a filled value that changed is the user's)."""
        old = STAGE_DEFAULTS[self.stage]
        unset = {k: None for k in getattr(self, "_stage_filled", ()) if getattr(self, k) == old[k]}
        return dataclasses.replace(self, stage=stage, **unset).with_stage_defaults()


@dataclass
class SFTConfig(StageLoopConfig):
    """The SFT warm-up (upstream: full fine-tune, lr 1e-5, warmup 0.1, cosine, 2 epochs, cutoff 4096).

    `lr`, `warmup_ratio`, `lr_schedule`, `weight_decay`, `freeze_vision` and `freeze_projector` are this stage's
    and win over the `actor.*` keys of the same names (the module docstring's precedence rule); the other
    `actor.*` keys (betas, clipping, micro-batch tokens, kernels) apply here too.
    """

    section: ClassVar[str] = "sft"
    init_model: str = ""
    train_file: str = ""  # ShareGPT JSON or JSONL (messages/role/content or conversations/from/value)
    dataset_info: str = ""  # optional LLaMA-Factory dataset_info.json whose entry gives the columns and tags
    dataset_name: str = ""  # the entry of dataset_info (its file_name is used when train_file is empty)
    # Where the SFT file's relative image paths resolve (LLaMA-Factory's media_dir); empty: the SFT file's own
    # folder. Not data.image_root, which is the GRPO images' folder.
    image_root: str = ""
    # LLaMA-Factory's image bounds before the processor (hparams image_max_pixels / image_min_pixels defaults)
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    lr: float = 1e-5
    # Upstream's SFT runs LLaMA-Factory's HF Trainer, whose weight_decay defaults to 0.0 and which
    # docs/qwen2_5vl_full_sft.yaml does not set; the GRPO stages' actor.weight_decay is 1e-2.
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_schedule: str = choice("cosine", ["constant", "cosine", "linear"])
    epochs: int = 2
    cutoff_len: int = 4096
    batch_size: int = 32  # conversations per optimizer step
    freeze_vision: bool = True
    freeze_projector: bool = True

    def __post_init__(self) -> None:
        self.check_loop("sft")
        check_fields("sft", {
            "lr": (self.lr >= 0, self.lr, "must be >= 0"),
            "warmup_ratio": (0 <= self.warmup_ratio <= 1, self.warmup_ratio, "must be in [0, 1]"),
            "epochs": positive(self.epochs),
            "batch_size": positive(self.batch_size),
            "save_every": (self.save_every >= 0, self.save_every, "must be >= 0 (0 = only at the end)"),
            "keep_last": positive(self.keep_last),
            "dataset_name": (bool(self.dataset_name) or not self.dataset_info, self.dataset_name,
                             "must name an entry of sft.dataset_info"),
            "dataset_info": (bool(self.dataset_info) or not self.dataset_name, self.dataset_info,
                             "must be set when sft.dataset_name is"),
            "image_max_pixels": (self.image_max_pixels >= 1, self.image_max_pixels, "must be >= 1"),
            "image_min_pixels": (1 <= self.image_min_pixels <= self.image_max_pixels, self.image_min_pixels,
                                 "must be in [1, sft.image_max_pixels]"),
            "cutoff_len": (self.cutoff_len >= 2, self.cutoff_len, "must be >= 2"),
        })


@dataclass
class SampleConfig:
    """Difficulty sampling: n answers per GRPO question with the warm-up model (upstream's values:
    `examples/pebr_sample.yaml`, which samples at a higher image pixel cap than the RL stages)."""

    model: str = ""
    dataset: str = ""
    output: str = ""  # rollouts JSONL (overwritten, never appended)
    n: int = 8
    temperature: float = 1.2
    top_p: float = 0.99
    max_pixels: int = 4194304  # image pixel cap while sampling (RL: images.max_pixels = 802816)
    batch_size: int = 64
    correct_threshold: float = 1.0

    def __post_init__(self) -> None:
        check_fields("sample", {
            "n": positive(self.n),
            "temperature": (self.temperature >= 0, self.temperature, "must be >= 0 (0 = greedy)"),
            "top_p": (0 < self.top_p <= 1, self.top_p, "must be in (0, 1]"),
            "max_pixels": (self.max_pixels >= 1, self.max_pixels, "must be >= 1"),
            "batch_size": positive(self.batch_size),
            "correct_threshold": (0 <= self.correct_threshold <= 1, self.correct_threshold, "must be in [0, 1]"),
        })


@dataclass
class PipelineConfig:
    """The whole recipe: sft -> sample -> split -> stage 1 -> stage 2 -> export, in one work directory."""

    work_dir: str = "runs/pipeline"
    base_model: str = ""
    sft_file: str = ""
    grpo_file: str = ""
    eval_file: str = ""
    image_root: str = ""
    stages: list[str] = field(default_factory=lambda: ["sft", "sample", "split", "stage1", "stage2", "export"])
    # Stage 1's prompts: "easy", the recipe's (the split's easycase.json, questions the SFT model answers right
    # every time), or "grpo", every question of grpo_file. The demo takes "grpo": its easy split is a few dozen
    # questions on images the model already describes best (docs/DEMO.md, "Where the demo departs").
    stage1_data: str = choice("easy", ["easy", "grpo"])
    # Stage 1's step limit, where it differs from stage 2's (grpo.max_steps, shared by both stages); 0 = the same.
    stage1_max_steps: int = 0

    def __post_init__(self) -> None:
        check_fields("pipeline", {
            "stage1_max_steps": (self.stage1_max_steps >= 0, self.stage1_max_steps,
                                 "must be >= 0 (0 = grpo.max_steps, as stage 2)"),
        })
