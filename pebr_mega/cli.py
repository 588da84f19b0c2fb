"""The `pebr` command: thin subcommands over the library.

Each subcommand is an `_add_<name>` function that declares its arguments and a handler that returns an exit
code. The light modules (data records and files, outputs, errors: no torch) are imported here; a handler imports
what loads torch, transformers or Megatron itself, so `pebr --help` and the data commands start fast. Library
errors that are the user's to fix (`ConfigError`, `DataError`, ...) are printed as one line and exit with status
2, never as a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, Callable, Sequence

from pebr_mega import __version__
from pebr_mega.versions import version_line
from pebr_mega.data.corpus import tokenizer_corpus
from pebr_mega.data.llamafactory import register_dataset
from pebr_mega.data.sft_filter import filter_sft_file, sidecar_path
from pebr_mega.data.split import SPLIT_FILES, format_summary, split_files
from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset
from pebr_mega.errors import DataError, PebrError, describe_os_error
from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model, count_saved_parameters
from pebr_mega.outputs import claim_output_dir, claim_output_file, lock_beside, plot_path
from pebr_mega.parallel.threads import apply_cpu_budget
from pebr_mega.rewards.tiny_clip import TinyClipConfig, build_tiny_clip

if TYPE_CHECKING:  # the config tree imports torch: handlers import it lazily
    from pebr_mega.config import PebrConfig

class UserError(Exception):
    """An error the user can fix (bad path, bad config); printed without a traceback."""


# ---------------------------------------------------------------------------------------------- tiny-model
def _add_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="build a tiny Qwen2.5-VL in HF format, offline",
                       description="Build a tiny Qwen2.5-VL (config, safetensors, tokenizer trained locally, "
                                   "image processor, generation config) that loads with transformers offline.")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="language model layers")
    p.add_argument("--heads", type=int, default=None, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA groups)")
    p.add_argument("--vision-depth", type=int, default=None)
    p.add_argument("--vision-window-size", type=int, default=None, help="window attention size in pixels")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size before special tokens")
    p.add_argument("--tie-embeddings", action="store_true", help="tie lm_head to the token embedding")
    p.set_defaults(handler=_cmd_tiny_model)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    claim_output_dir(args.out, what="--out")

    cfg = TinyModelConfig(seed=args.seed, tie_word_embeddings=args.tie_embeddings)
    for arg, name in [("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
                      ("layers", "num_layers"), ("heads", "num_heads"), ("kv_heads", "num_kv_heads"),
                      ("vision_depth", "vision_depth"), ("vision_window_size", "vision_window_size"),
                      ("vocab_size", "vocab_size")]:
        if getattr(args, arg) is not None:
            setattr(cfg, name, getattr(args, arg))
    try:
        out = build_tiny_model(args.out, cfg, tokenizer_corpus())
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote tiny Qwen2.5-VL to {out} ({count_saved_parameters(out) / 1e6:.2f} M parameters)")
    return 0


# ---------------------------------------------------------------------------------------------- config
def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved configuration",
                       description="Load a YAML config, apply key=value overrides and print the result.")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--get", default=None, metavar="KEY",
                   help="print only this dotted key's value (e.g. pipeline.work_dir; for scripts)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(handler=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from pebr_mega.config import config_value, load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    print(config_value(cfg, args.get) if args.get else to_yaml(cfg), end="" if not args.get else "\n")
    return 0


# ---------------------------------------------------------------------------------------------- plot
def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's metric curves to PNG",
                       description="Read RUN_DIR/metrics.jsonl (several run dirs overlay) and write a PNG.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png of the first run)")
    p.add_argument("--keys", nargs="*", default=None, help="metric keys to draw")
    p.set_defaults(handler=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pebr_mega.logging import DEFAULT_PLOT_KEYS, plot_metrics

    files = []
    for d in args.run_dirs:
        f = Path(d) / "metrics.jsonl" if Path(d).is_dir() else Path(d)
        if not f.is_file():
            raise UserError(f"no metrics.jsonl in {d}")
        files.append(f)
    out = claim_output_file(plot_path(args.out, files[0].parent / "curves.png"), files, what="--out")
    try:
        png = plot_metrics(files, out, args.keys or DEFAULT_PLOT_KEYS)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote {png}")
    return 0


# ---------------------------------------------------------------------------------------------- plan
def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="will the run fit, and how fast: memory, layouts and step time, no GPU needed",
                       description="For the resolved config: per-GPU memory of training (parameters, gradients, "
                                   "optimizer, activations, logits, reference) and of the SGLang rollout (weights, KV "
                                   "cache, CUDA graphs), whether the colocated schedule fits, a step-time estimate "
                                   "per phase, and every TP/PP/DP layout ranked, with the reason each rejected one "
                                   "fails. No model is loaded.")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb", help="card: h100-80gb, h200-141gb, a100-80gb, a100-40gb")
    p.add_argument("--model-shape", default=None, choices=["3b", "7b"],
                   help="plan for this built-in shape instead of the model's config.json")
    p.add_argument("--job", default="grpo", choices=["grpo", "sft"], help="a GRPO step (default) or an SFT update")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default: data.max_prompt_length (sft: cutoff_len)")
    p.add_argument("--response-tokens", type=int, default=None, help="default: rollout.max_new_tokens")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from pebr_mega.config import load_config
    from pebr_mega.plan import Cluster, format_plan, gpu_spec, make_plan, plan_to_json, resolve_arch
    from pebr_mega.plan.checks import model_path

    cfg = load_config(args.config, args.overrides)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError(f"--nodes {args.nodes} and --gpus-per-node {args.gpus_per_node} must be >= 1")
    try:
        gpu = gpu_spec(args.gpu)
    except ValueError as e:
        raise UserError(str(e)) from None
    key, path = model_path(cfg, "sft" if args.job == "sft" else "train")
    arch, source = resolve_arch(path, args.model_shape, key)
    plan = make_plan(cfg, arch, Cluster(args.nodes, args.gpus_per_node, gpu), args.job, source,
                     args.prompt_tokens, args.response_tokens, args.images_per_prompt)
    print(json.dumps(plan_to_json(plan), indent=1) if args.json else format_plan(plan))
    if plan.configured_errors:  # the table shows what would run; the configured run itself would not start
        print(f"pebr plan: the configured layout fails {len(plan.configured_errors)} start-up check(s): "
              f"{plan.configured_errors[0]}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------- synth
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="render the synthetic shapes dataset (GRPO, SFT and eval sets)",
                       description="Render shapes images with counting, colour and CLEVR-style questions: "
                                   "grpo.json, sft.json (PeBR-format answers), eval.json (held out), images/.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, default=256, help="GRPO questions (default 256)")
    p.add_argument("--num-sft", type=int, default=None, help="SFT examples (default: --num)")
    p.add_argument("--num-eval", type=int, default=None, help="held-out questions (default: max(32, num/4))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=112, help="image width in pixels")
    p.add_argument("--height", type=int, default=112, help="image height in pixels")
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--sft-teacher-error", type=float, default=0.0,
                   help="fraction of the SFT reasoning answers the teacher gets wrong by one (default 0)")
    p.add_argument("--sft-description-omission", type=float, default=0.0,
                   help="fraction of the SFT descriptions (of scenes with 2+ groups) that leave out the last group, "
                        "the counting answers following them (default 0)")
    p.add_argument("--describe-shapes", action="store_true",
                   help="name shapes in descriptions, questions and key words (default: colours and counts only; "
                        "the shapes are drawn either way)")
    p.add_argument("--distinct-colors", action="store_true",
                   help="give every object of a scene its own colour (at most 4 objects; the demo's world)")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    claim_output_dir(args.out, what="--out")
    cfg = SynthConfig(num=args.num, num_sft=args.num_sft, num_eval=args.num_eval, seed=args.seed,
                      width=args.width, height=args.height, min_objects=args.min_objects,
                      max_objects=args.max_objects, sft_teacher_error=args.sft_teacher_error,
                      sft_description_omission=args.sft_description_omission, describe_shapes=args.describe_shapes,
                      distinct_colors=args.distinct_colors)
    try:
        print(write_synthetic_dataset(args.out, cfg))
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0


# ---------------------------------------------------------------------------------------------- filter-sft
def _add_filter_sft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filter-sft", help="filter ShareGPT SFT records with the Mulberry rules",
                       description="Drop records whose assistant turns contain 'let me rethink it' or whose images "
                                   "are missing, corrupt or smaller than 28 px on a side; malformed records are "
                                   "dropped too. Writes the kept records and <output stem>.dropped.json.")
    p.add_argument("--input", required=True, help="ShareGPT JSON list or JSONL")
    p.add_argument("--output", required=True, help="filtered JSON list to write")
    p.add_argument("--image-root", "--image_root", dest="image_root", required=True,
                   help="folder the records' image paths are relative to")
    p.add_argument("--no-decode", action="store_true",
                   help="only open and verify images, do not decode them (faster; misses truncated JPEGs)")
    p.add_argument("--workers", type=int, default=4, help="threads checking images")
    p.set_defaults(handler=_cmd_filter_sft)


def _cmd_filter_sft(args: argparse.Namespace) -> int:
    claim_output_file(args.output, [args.input], what="--output")
    claim_output_file(sidecar_path(args.output), [args.input], what="the dropped-records file")
    res = filter_sft_file(args.input, args.output, args.image_root, decode=not args.no_decode,
                          workers=args.workers, progress=sys.stderr.isatty())
    print(f"filter-sft: {args.input} ({res.images_checked} distinct images checked)")
    for line in res.summary_lines():
        print("  " + line)
    print(f"wrote {args.output} ({len(res.kept)} records); dropped records listed in {sidecar_path(args.output)}")
    return 0


# ---------------------------------------------------------------------------------------------- merge-sft
def _add_merge_sft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-sft", help="merge SFT files (filtered Mulberry-SFT + PeBR's SFT set) into one",
                       description="Concatenate ShareGPT SFT files in the order given; each record's relative image "
                                   "paths are rewritten relative to one image root (no image is copied): the run "
                                   "sets sft.image_root to it. Missing images are listed.")
    p.add_argument("--input", nargs=2, action="append", required=True, metavar=("FILE", "IMAGE_DIR"),
                   help="an SFT file and the folder its image paths are relative to (repeat per file)")
    p.add_argument("--output", required=True, help="the merged JSON list to write (e.g. dataset/sft/pebr_sft.json)")
    p.add_argument("--image-root", default=None,
                   help="the folder the merged image paths are relative to (default: the deepest folder holding "
                        "every IMAGE_DIR); the SFT run's sft.image_root")
    p.set_defaults(handler=_cmd_merge_sft)


def _cmd_merge_sft(args: argparse.Namespace) -> int:
    from pebr_mega.data.sft_merge import merge_sft_files

    claim_output_file(args.output, [f for f, _ in args.input], what="--output")
    res = merge_sft_files([(f, d) for f, d in args.input], args.output, args.image_root)
    for src in res.sources:
        missing = f", {len(src.missing_images)} image(s) not found (first: {src.missing_images[0]})" \
            if src.missing_images else ""
        print(f"merge-sft: {src.path}: {src.records} records, images from {src.image_root}{missing}")
    if res.skipped:
        print(f"merge-sft: skipped {dict(sorted(res.skipped.items()))}")
    if res.outside_root:
        print(f"merge-sft: {len(res.outside_root)} absolute image path(s) lie outside {res.image_root}, kept as "
              f"written (first: {res.outside_root[0]}); the SFT run skips them unless data.allow_images_outside_root")
    print(f"wrote {res.output} ({res.records} records); train with sft.image_root={res.image_root}")
    return 0


# ---------------------------------------------------------------------------------------------- register-llamafactory
def _add_register_llamafactory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register-llamafactory", help="register an SFT file in LLaMA-Factory's dataset_info.json",
                       description="Add or replace a ShareGPT entry (messages/images columns, role/content tags) "
                                   "in dataset_info.json, creating the file if absent and keeping other entries.")
    p.add_argument("--dataset-info", required=True, help="path of dataset_info.json")
    p.add_argument("--name", default="pebr_r1_warm_up", help="dataset name (default: pebr_r1_warm_up)")
    p.add_argument("--file", required=True, help="file_name as LLaMA-Factory should see it (relative to dataset_dir)")
    p.set_defaults(handler=_cmd_register_llamafactory)


def _cmd_register_llamafactory(args: argparse.Namespace) -> int:
    replaced = register_dataset(args.dataset_info, args.name, args.file)
    print(f"{'updated' if replaced else 'added'} '{args.name}' -> {args.file} in {args.dataset_info}")
    return 0


# ---------------------------------------------------------------------------------------------- split
def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="split GRPO questions into easy/medium/hard from sampled rollouts",
                       description="Count, per question, the rollouts scoring >= the threshold: n/n -> easy, "
                                   "1..n-1 -> medium, 0 -> hard. Questions with a sample count other than n, "
                                   "without rollouts, unknown qids and malformed lines are reported, never "
                                   "filed silently. Writes easycase/mediumcase/hardcase.json and summary.json.")
    p.add_argument("--rollouts", required=True, help="JSONL, one line per sample: qid, response, ground_truth, "
                                                     "score (a number, or an object with 'accuracy')")
    p.add_argument("--dataset", required=True, help="GRPO records (JSON list or JSONL)")
    p.add_argument("--out-dir", required=True, help="folder for the split files and summary.json")
    p.add_argument("--n", type=int, default=8, help="samples per question (default 8)")
    p.add_argument("--correct-threshold", type=float, default=1.0, help="a sample is correct if score >= this")
    p.add_argument("--prompt-key", default="problem", help="the dataset's problem column (EasyR1's data.prompt_key)")
    p.add_argument("--answer-key", default="answer", help="the dataset's answer column (EasyR1's data.answer_key)")
    p.add_argument("--image-key", default="images", help="the dataset's image column (EasyR1's data.image_key)")
    p.set_defaults(handler=_cmd_split)


def _cmd_split(args: argparse.Namespace) -> int:
    claim_output_dir(args.out_dir, [args.rollouts, args.dataset], what="--out-dir",
                     writes=[*SPLIT_FILES.values(), "summary.json"])
    from pebr_mega.data.records import Columns

    res = split_files(args.rollouts, args.dataset, args.out_dir, args.n, args.correct_threshold,
                      Columns(args.prompt_key, args.answer_key, args.image_key))
    total = sum(res.counts().values())
    print(f"split: {total} questions from {args.dataset}, n={args.n}, correct if score >= {args.correct_threshold}")
    for line in format_summary(res, args.out_dir):
        print("  " + line)
    return 0


# ---------------------------------------------------------------------------------------------- make-tiny-clip
def _add_make_tiny_clip(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-clip", help="build a tiny random CLIP in HF format, offline",
                       description="Build a tiny CLIPModel with a locally trained tokenizer and a CLIP image "
                                   "processor, for rewards.clip_model_dir in tests and the demo. Its weights are "
                                   "random: the CLIP reward it gives is deterministic but meaningless.")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=336, help="vision input size in pixels (multiple of the patch)")
    p.add_argument("--patch-size", type=int, default=28)
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.set_defaults(handler=_cmd_make_tiny_clip)


def _cmd_make_tiny_clip(args: argparse.Namespace) -> int:
    claim_output_dir(args.out, what="--out")
    cfg = TinyClipConfig(seed=args.seed, image_size=args.image_size, patch_size=args.patch_size,
                         hidden_size=args.hidden_size, num_layers=args.layers)
    try:
        out = build_tiny_clip(args.out, tokenizer_corpus(), cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote tiny CLIP to {out} (image {cfg.image_size} px, text up to {cfg.max_text_tokens} tokens)")
    return 0


# ---------------------------------------------------------------------------------------------- eval / infer
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy and format rate of an HF model on a GRPO-format dataset",
                       description="Generate one answer per question (greedy by default) and grade it with the "
                                   "PeBR accuracy (MathRuler) and format rewards.")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--dataset", required=True, help="GRPO-format JSON/JSONL (qid, problem, answer, images)")
    p.add_argument("--image-root", default=None, help="default: the dataset's folder")
    p.add_argument("--max-samples", type=int, default=0, help="0 = all")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--config", default=None,
                   help="the run's YAML config: the defaults of --max-new-tokens (rollout.max_new_tokens) and "
                        "--grading (rewards.answer_grading) come from it (without it: the built-in config's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: rollout.max_new_tokens of --config")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--results", default=None, help="write one JSON line per question here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format-prompt", default=None,
                   help="prompt template (default: the model's own format_prompt.jinja, else the packaged one)")
    p.add_argument("--grading", default=None, choices=["upstream", "lenient"],
                   help="how the answer is taken from a response (default: rewards.answer_grading of --config, "
                        "upstream unless it says otherwise)")
    p.add_argument("--skip-verify", action="store_true",
                   help="read the model even when its weights do not match its MANIFEST.json (forensics)")
    p.set_defaults(handler=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pebr_mega.config import load_config
    from pebr_mega.trainer.evaluate import evaluate_model

    cfg = load_config(args.config, [])  # the generation length and the grading the run trained with
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else cfg.rollout.max_new_tokens
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    done = evaluate_model(args.model, args.dataset, max_new_tokens, args.grading or cfg.rewards.answer_grading,
                          image_root=args.image_root, max_samples=args.max_samples, temperature=args.temperature,
                          batch_size=args.batch_size, results_path=args.results, seed=args.seed,
                          format_prompt=args.format_prompt, verify=not args.skip_verify,
                          allow_images_outside_root=cfg.data.allow_images_outside_root)
    print(done.line())
    return 0


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="answer one question about one image with an HF model",
                       description="Upstream's inference.py: one image, one answer, greedy, up to 4,096 new "
                                   "tokens; prompted with the template the model was trained with.")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True, help="the problem; an <image> is put first when it has none")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (upstream: 1e-6)")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format-prompt", default=None,
                   help="prompt template (default: the model's own format_prompt.jinja, else the packaged one)")
    p.set_defaults(handler=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from pebr_mega.rollout.inference import answer_question

    print(answer_question(args.model, args.image, args.question, args.temperature, args.max_new_tokens, args.seed,
                          args.format_prompt))
    return 0


# ---------------------------------------------------------------------------------------------- training
# The config-driven commands share one shape: `--config C [k=v ...] [--dry-run]`, then one library call.
def _check_startup(cfg: PebrConfig, command: str, dry_run: bool = False, world_size: int | None = None) -> None:
    """Every start-up rule before anything loads (`plan.startup_checks`: the divisibility and size rules, one GPU
    per process, every input path the command opens), on the launcher's world for the run and on the world the
    run will have for `--dry-run` (`World.for_dry_run`: --world-size, WORLD_SIZE, the GPUs here, else the
    layout's own tp x pp); both stop naming every failure. Notes go to stderr on rank 0."""
    from pebr_mega.parallel.groups import is_main_rank
    from pebr_mega.plan.startup import World, raise_failed, startup_checks

    world = World.for_dry_run(cfg, world_size) if dry_run else World.of_launcher()
    result = startup_checks(cfg, command, world)
    raise_failed(result, command, world)
    if is_main_rank():
        for note in result.notes:
            print(f"pebr {command}: note: {note}", file=sys.stderr)


def _run_sft(cfg: PebrConfig, restart: bool = False) -> str:
    from pebr_mega.trainer.sft import SFTTrainer

    _check_startup(cfg, "sft")
    return f"sft done: model {SFTTrainer(cfg, restart=restart).train().model_dir}"


def _run_train(cfg: PebrConfig, restart: bool = False) -> str:
    from pebr_mega.trainer.grpo import GRPOTrainer

    _check_startup(cfg, "train")
    return f"{cfg.grpo.stage} done: model {GRPOTrainer(cfg, restart=restart).train().model_dir}"


def _run_sample(cfg: PebrConfig) -> str:
    from pebr_mega.trainer.sample import run_sampling

    from pebr_mega.parallel.groups import is_main_rank

    _check_startup(cfg, "sample")
    # A second `pebr sample` on this file stops here (without an output, run_sampling says what is missing). Under
    # torchrun rank 0 alone writes the file (trainer/sample.py), so it alone holds the lock: the other ranks of
    # the same job would otherwise find it taken by rank 0.
    writer = cfg.sample.output and is_main_rank()
    with lock_beside(cfg.sample.output, "sample.output") if writer else contextlib.nullcontext():
        return f"sampling done: {run_sampling(cfg)['output']}"


def _run_pipeline(cfg: PebrConfig, restart: bool = False) -> str:
    from pebr_mega.recipe.pipeline import run_pipeline

    _check_startup(cfg, "pipeline")
    res = run_pipeline(cfg, restart=restart)
    return f"pipeline done: {res.get('export', {}).get('model_dir', cfg.pipeline.work_dir)}"


CONFIG_COMMANDS = {
    "sft": (_run_sft, "SFT warm-up on the Megatron actor (sft.* settings)",
            "Full fine-tune on ShareGPT conversations, loss on assistant tokens; writes run.output_dir/hf. "
            "Resumes from its checkpoints (when run.output_dir holds a run with other settings, it stops: "
            "--force-restart discards that run). Launch with torchrun for several GPUs."),
    "sample": (_run_sample, "difficulty sampling: n answers per GRPO question (sample.* settings)",
               "Writes sample.output (JSONL: qid, response, ground_truth, score), overwriting it."),
    "train": (_run_train, "one GRPO stage (grpo.stage=stage1|stage2) on the Megatron actor",
              "GRPO from grpo.init_model on grpo.train_file with the stage's reward preset; writes "
              "run.output_dir/{metrics.jsonl,checkpoints,hf}. Resumes from its checkpoints (when run.output_dir "
              "holds a run with other settings, it stops: --force-restart discards that run)."),
    "pipeline": (_run_pipeline, "the whole recipe: sft -> sample -> split -> stage1 -> stage2 -> export",
                 "Runs pipeline.stages in pipeline.work_dir, skipping finished stages and resuming an "
                 "interrupted one (a stage run with other settings stops it: --force-restart redoes that stage "
                 "and the ones after it)."),
}


# The commands that resume what their output directory holds, and what --force-restart discards there.
RESTARTABLE = {
    "sft": "start over: discard the run in run.output_dir (checkpoints, metrics, results)",
    "train": "start over: discard the run in run.output_dir (checkpoints, metrics, results)",
    "pipeline": "redo the stages run with other settings, and the stages after them, instead of stopping",
}


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    for name, (run, help_, description) in CONFIG_COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("--config", default=None, help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
        p.add_argument("--dry-run", action="store_true",
                       help="run every start-up check, print the resolved plan (prompts, batches, epochs, steps, "
                            "reward weights) as JSON and exit without loading a model; `pebr config` prints the "
                            "resolved config")
        p.add_argument("--world-size", type=int, default=None,
                       help="with --dry-run: the number of processes the run will have (default: WORLD_SIZE, else "
                            "the GPUs visible here, else model.tp x model.pp)")
        if name in RESTARTABLE:
            p.add_argument("--force-restart", action="store_true", help=RESTARTABLE[name])
        p.set_defaults(handler=_cmd_config_command, run=run)


def _cmd_config_command(args: argparse.Namespace) -> int:
    from pebr_mega.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        _check_startup(cfg, args.command, dry_run=True, world_size=args.world_size)
        return _dry_run(cfg, args.command, getattr(args, "force_restart", False))
    print(args.run(cfg, restart=True) if getattr(args, "force_restart", False) else args.run(cfg))
    return 0


def _dry_run(cfg: PebrConfig, command: str, restart: bool = False) -> int:
    """The plan as JSON on stdout (docs/TRAINING.md, "Dry run"); a plan that cannot start ends as one error line."""
    import json

    from pebr_mega.recipe.dry_run import dry_run, plan_error

    plan = dry_run(cfg, command, restart=restart)
    print(json.dumps(plan, indent=1))
    error = plan_error(plan)
    if error:
        raise DataError(error)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole recipe on the embedded tiny model and synthetic data (CPU, offline)",
                       description="Tiny Qwen2.5-VL + synthetic shapes: SFT, sampling, split, stage 1, stage 2, "
                                   "export and an inference; writes summary.json and curves.png.")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-grpo", type=int, default=512, help="GRPO questions to synthesise")
    p.add_argument("--num-sft", type=int, default=1024, help="SFT examples to synthesise")
    p.add_argument("--num-eval", type=int, default=256, help="held-out questions")
    p.add_argument("--teacher-error", type=float, default=None,
                   help="fraction of the SFT teacher's reasoning answers that are off by one (default: the demo's, "
                        "see docs/DEMO.md; 0 = a perfect teacher)")
    p.add_argument("--description-omission", type=float, default=None,
                   help="fraction of the SFT teacher's scenes whose last group it overlooks, in its description and "
                        "its counting (default: the demo's, see docs/DEMO.md; 0 = complete descriptions)")
    p.add_argument("--describe-shapes", action="store_true",
                   help="the world that names shapes too (default: colours and counts, which the tiny model can "
                        "perceive; docs/DEMO.md)")
    p.add_argument("--repeated-colors", action="store_true",
                   help="let objects of a scene share a colour (default: each has its own, since the tiny model "
                        "does not learn to count objects of one colour; docs/DEMO.md)")
    p.add_argument("--clip-steps", type=int, default=None,
                   help="optimizer steps of the tiny CLIP's contrastive training (default: the demo's, ~1 min)")
    p.add_argument("--ablation", action="store_true",
                   help="also run stage 2 from the SFT model directly (no stage 1) and compare it with the recipe's "
                        "stage 2 on the same held-out questions (the paper's comparison; ~4 more minutes)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the demo config")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pebr_mega.recipe.demo import DEMO_DESCRIPTION_OMISSION, DEMO_TEACHER_ERROR, run_demo

    teacher_error = DEMO_TEACHER_ERROR if args.teacher_error is None else args.teacher_error
    omission = DEMO_DESCRIPTION_OMISSION if args.description_omission is None else args.description_omission
    summary = run_demo(args.out, args.seed, args.num_grpo, args.num_sft, args.num_eval, args.overrides, teacher_error,
                       clip_steps=args.clip_steps, description_omission=omission, ablation=args.ablation,
                       describe_shapes=args.describe_shapes, distinct_colors=not args.repeated_colors)
    final = summary.get("final_model")
    if final:
        first = json.loads((Path(args.out) / "data" / "eval.json").read_text())[0]
        image = Path(args.out) / "data" / first["images"][0]
        print(f"[demo] pebr infer --model {final} --image {image} --question {first['problem']!r}")
        _cmd_infer(argparse.Namespace(model=final, image=str(image), question=first["problem"], temperature=0.0,
                                      max_new_tokens=160, seed=0, format_prompt=None))
        print(f"[demo] ground truth: {first['answer']}")
    return 0


# ---------------------------------------------------------------------------------------------- compare-logits
def _add_compare_logits(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare-logits", help="Megatron vs transformers logits on one image+text input",
                       description="Run the Megatron model (its own ranks: gloo on CPU, NCCL on GPU) and "
                                   "transformers' Qwen2_5_VLForConditionalGeneration on the same image+text input; "
                                   "print max/mean |logit diff|, cosine similarity and top-1 agreement; exit 1 "
                                   "when the max difference exceeds --tolerance.")
    p.add_argument("--hf-dir", required=True, help="HF model directory (weights, tokenizer, processor)")
    p.add_argument("--mcore-dir", default=None, help="Megatron checkpoint (default: load the HF weights directly)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--image", default=None, help="image file (default: a random image)")
    p.add_argument("--prompt", default=None, help="user text after the image")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| allowed (fp32)")
    p.add_argument("--spec", default="auto", choices=["auto", "te", "torch", "local"], help="Megatron layer spec")
    p.add_argument("--skip-verify", action="store_true",
                   help="read the checkpoints even when they do not match their MANIFEST.json (forensics)")
    p.set_defaults(handler=_cmd_compare_logits)


def _cmd_compare_logits(args: argparse.Namespace) -> int:
    import torch

    from pebr_mega.checkpoint.compare import DEFAULT_PROMPT, compare_logits, sample_inputs
    from pebr_mega.checkpoint.hf_io import verify_hf_weights
    from pebr_mega.models.specs import resolve_spec

    resolve_spec(args.spec)  # an unusable backend fails here, before any rank starts
    if args.tp < 1 or args.pp < 1:
        raise UserError(f"--tp {args.tp} and --pp {args.pp} must be >= 1")
    if torch.cuda.is_available() and args.tp * args.pp > torch.cuda.device_count():
        raise UserError(f"--tp {args.tp} x --pp {args.pp} ranks need that many GPUs; {torch.cuda.device_count()} visible")
    verify_hf_weights(args.hf_dir, "--hf-dir", skip=args.skip_verify)  # before sample_inputs reads it
    inputs = sample_inputs(args.hf_dir, image=args.image, prompt=args.prompt or DEFAULT_PROMPT)
    s = compare_logits(args.hf_dir, args.mcore_dir, tp=args.tp, pp=args.pp, inputs=inputs, spec=args.spec,
                       verify=not args.skip_verify)
    print(f"tokens={s['tokens']} vocab={s['vocab']} tp={args.tp} pp={args.pp}")
    print(f"max_abs_diff={s['max_abs_diff']:.3e} mean_abs_diff={s['mean_abs_diff']:.3e} "
          f"cosine={s['cosine']:.8f} top1_agreement={s['top1_agreement']:.4f}")
    ok = s["max_abs_diff"] <= args.tolerance
    print("PASS" if ok else f"FAIL: max_abs_diff {s['max_abs_diff']:.3e} > tolerance {args.tolerance:.1e}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------- main
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_tiny_model,
    _add_config,
    _add_plot,
    _add_synth,
    _add_eval,
    _add_infer,
    _add_config_commands,
    _add_demo,
    _add_filter_sft,
    _add_merge_sft,
    _add_register_llamafactory,
    _add_split,
    _add_make_tiny_clip,
    _add_compare_logits,
    _add_plan,
]


def build_parser() -> argparse.ArgumentParser:
    """The `pebr` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="pebr", description="PeBR-R1 on Megatron-Core: SFT, sampling, "
                                     "two-stage GRPO for Qwen2.5-VL, checkpoints and tools.")

    parser.add_argument("--version", action="version", version=f"pebr-mega {__version__} ({version_line()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _quiet_known_fallback_warnings() -> None:
    """Megatron warns at import for every optional fused backend it falls back from (apex, TE) and for a
    deprecated default of its own; on CPU these are expected, and the backends in use are our choice
    (`model.spec`, see the README), so they are not repeated on every run."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)


def _config_warnings_as_notes() -> None:
    """A `ConfigWarning` (an allowed but probably unintended value, an EasyR1 key dropped) prints as one note
    line naming the key, not as Python's file:line warning with the source line under it."""
    import warnings

    from pebr_mega.config_fields import ConfigWarning

    default = warnings.formatwarning

    def formatted(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, ConfigWarning):
            return f"pebr: note: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatted


def _operation_of(e: BaseException, command: str) -> str:
    """What was being done when `e` was raised, for its one-line message: the innermost pebr_mega function of its
    traceback (`in claim_output_dir`), else the command."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "pebr_mega" in f.filename.replace("\\", "/")]
    return f"in {frames[-1].name}" if frames else f"running pebr {command}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pebr` console script; returns the process exit code."""
    _quiet_known_fallback_warnings()
    _config_warnings_as_notes()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 1
    apply_cpu_budget()  # a CPU quota below the visible CPUs: torch's pool sized to the quota
    try:
        return int(args.handler(args) or 0)
    except (UserError, PebrError, FileNotFoundError) as e:
        print(f"pebr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk (no space, read-only, permission) where the library did not name the operation
        print(f"pebr {args.command}: error: {describe_os_error(e, _operation_of(e, args.command))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pebr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
