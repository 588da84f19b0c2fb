"""The `pebr` command: thin subcommands over the library.

Each subcommand is an `_add_<name>` function that declares its arguments and a handler that imports the
library lazily (so `pebr --help` is fast) and returns an exit code. Library errors that are the user's to fix
(`ConfigError`, `DataError`, ...) are printed as one line and exit with status 2, never as a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


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
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model, count_parameters
    from pebr_mega.data.corpus import tokenizer_corpus

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
    print(f"wrote tiny Qwen2.5-VL to {out} ({count_parameters(out) / 1e6:.2f} M parameters)")
    return 0


# ---------------------------------------------------------------------------------------------- config
def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved configuration",
                       description="Load a YAML config, apply key=value overrides and print the result.")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(handler=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from pebr_mega.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
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
    p.set_defaults(handler=_cmd_compare_logits)


def _cmd_compare_logits(args: argparse.Namespace) -> int:
    from pebr_mega.checkpoint.compare import DEFAULT_PROMPT, compare_logits, sample_inputs
    from pebr_mega.models.specs import resolve_spec

    import torch

    resolve_spec(args.spec)  # an unusable backend fails here, before any rank starts
    if args.tp < 1 or args.pp < 1:
        raise UserError(f"--tp {args.tp} and --pp {args.pp} must be >= 1")
    if torch.cuda.is_available() and args.tp * args.pp > torch.cuda.device_count():
        raise UserError(f"--tp {args.tp} x --pp {args.pp} ranks need that many GPUs; {torch.cuda.device_count()} visible")
    inputs = sample_inputs(args.hf_dir, image=args.image, prompt=args.prompt or DEFAULT_PROMPT)
    s = compare_logits(args.hf_dir, args.mcore_dir, tp=args.tp, pp=args.pp, inputs=inputs, spec=args.spec)
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
    _add_compare_logits,
]


def build_parser() -> argparse.ArgumentParser:
    """The `pebr` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="pebr", description="PeBR-R1 on Megatron-Core: SFT, sampling, "
                                     "two-stage GRPO for Qwen2.5-VL, checkpoints and tools.")
    from pebr_mega import __version__

    parser.add_argument("--version", action="version", version=f"pebr-mega {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pebr` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 1
    from pebr_mega.errors import PebrError

    try:
        return int(args.handler(args) or 0)
    except (UserError, PebrError, FileNotFoundError) as e:
        print(f"pebr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pebr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
