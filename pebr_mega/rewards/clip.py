"""The CLIP alignment reward: cosine similarity between an image and the response's image description.

Any CLIP-family checkpoint directory loads through transformers: a standard one (`CLIPModel`, SigLIP, ...)
through `AutoModel`, and one that ships its own modelling code (FG-CLIP, which upstream uses: large, 336 px
images, 248 text tokens) through the Auto class its `config.json` `auto_map` names, with
`trust_remote_code=True`. The model must expose `get_image_features` and `get_text_features`; FG-CLIP's
`get_text_features(walk_short_pos=False)` selects its long-caption path, as upstream calls it.

Images are squashed to `image_size` x `image_size` (upstream's resize) before the checkpoint's own image
processor; texts are truncated to `max_text_tokens` (capped at the text tower's position table).

reward(sim) = 1 if sim >= threshold else sim / threshold, with threshold 0.4: a negative similarity gives a
negative reward, as upstream's `clip_score_reward` (`examples/reward_function/pebr_1.py`) computes it.

Upstream pads every caption to 248 tokens and passes no attention mask; this scorer pads to the batch's
longest caption and passes the mask where the model takes one. The result is the same: a CLIP text tower is
causal and pools the end-of-text token, so the padding after it never reaches the pooled state.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Sequence

from pebr_mega.errors import BackendUnavailableError, PebrError

DEFAULT_THRESHOLD = 0.4


def similarity_to_reward(sim: float, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Map a cosine similarity to a reward: 1 from `threshold` up, `sim / threshold` below it (negative for a
    negative similarity, as upstream)."""
    if threshold <= 0:
        raise ValueError(f"CLIP threshold must be positive, got {threshold}")
    return 1.0 if sim >= threshold else sim / threshold


def _features(out: Any) -> Any:
    """The projected embedding from whatever `get_*_features` returns across transformers versions.

    transformers < 5 and FG-CLIP's own code return the tensor; transformers 5 returns a model output whose
    `pooler_output` holds the projected embedding.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise PebrError(f"cannot find the embedding in a {type(out).__name__} returned by the CLIP model")


CLIP_EXTRA_INSTALL = 'pip install -e ".[clip]"'


def missing_package_error(err: ImportError, model_dir: str | Path) -> BackendUnavailableError:
    """One line for an import that fails while loading a CLIP checkpoint: FG-CLIP's own modelling code
    imports `torchvision.ops` (installed by the `clip` extra); any other missing package is named as is."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "torchvision" in (getattr(err, "name", None) or "") or "torchvision" in text:
        return BackendUnavailableError(f"the CLIP checkpoint {model_dir} needs torchvision, which does not import "
                                       f"({text}); install it with: {CLIP_EXTRA_INSTALL}")
    return BackendUnavailableError(f"the CLIP checkpoint {model_dir} needs a package that does not import: {text}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when CUDA is available, else 'cpu'; any other value must be a usable torch device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise PebrError(f"invalid CLIP device {device!r}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise PebrError(f"CLIP device {device!r} asked for, but CUDA is not available")
    return device


class ClipAlignmentScorer:
    """Batched image-text cosine similarity under a local CLIP-family checkpoint."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", image_size: int = 336,
                 max_text_tokens: int = 248, batch_size: int = 32, trust_remote_code: bool = True) -> None:
        import torch

        self.model_dir = Path(model_dir)
        self.device = torch.device(resolve_device(device))
        self.image_size = image_size
        self.batch_size = max(1, batch_size)
        self.model, self.tokenizer, self.image_processor = self._load(trust_remote_code)
        text_params = inspect.signature(self.model.get_text_features).parameters
        self._text_kwargs = {"walk_short_pos": False} if "walk_short_pos" in text_params else {}
        self._pass_attention_mask = "attention_mask" in text_params
        self.max_text_tokens = min(max_text_tokens, self._text_positions() or max_text_tokens)

    # ------------------------------------------------------------------------------------------ loading
    def _load(self, trust_remote_code: bool) -> tuple[Any, Any, Any]:
        import torch
        import transformers

        cfg_file = self.model_dir / "config.json"
        if not cfg_file.is_file():
            raise PebrError(f"CLIP model directory {self.model_dir} has no config.json")
        auto_map = json.loads(cfg_file.read_text(encoding="utf-8")).get("auto_map") or {}
        remote = bool(auto_map)
        if remote and not trust_remote_code:
            raise PebrError(f"CLIP checkpoint {self.model_dir} ships its own modelling code (auto_map); "
                            "allow it with rewards.clip_trust_remote_code=true")
        auto_name = next((n for n in ("AutoModel", "AutoModelForCausalLM") if n in auto_map), "AutoModel")
        auto_cls = getattr(transformers, auto_name)
        try:
            model = auto_cls.from_pretrained(self.model_dir, trust_remote_code=remote, dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=remote)
            image_processor = transformers.AutoImageProcessor.from_pretrained(self.model_dir,
                                                                             trust_remote_code=remote)
        except ImportError as e:
            raise missing_package_error(e, self.model_dir) from None
        except (OSError, ValueError, KeyError) as e:
            raise PebrError(f"cannot load a CLIP model from {self.model_dir}: {e}") from None
        for method in ("get_image_features", "get_text_features"):
            if not callable(getattr(model, method, None)):
                raise PebrError(f"the model in {self.model_dir} ({type(model).__name__}) has no {method}(); "
                                "a CLIP-family checkpoint is needed")
        return model.to(self.device).eval(), tokenizer, image_processor

    def _text_positions(self) -> int | None:
        text_cfg = getattr(self.model.config, "text_config", None)
        return getattr(text_cfg, "max_position_embeddings", None)

    # ------------------------------------------------------------------------------------------ embedding
    def pixel_values(self, images: Sequence[Any]) -> Any:
        """Images (PIL) resized to image_size x image_size, then the checkpoint's processor -> [B, 3, H, W]."""
        from PIL import Image

        side = (self.image_size, self.image_size)
        prepared = [im.convert("RGB").resize(side, Image.BICUBIC) for im in images]
        return self.image_processor(images=prepared, return_tensors="pt")["pixel_values"]

    def text_inputs(self, texts: Sequence[str]) -> dict[str, Any]:
        """Token ids (and attention mask) of `texts`, truncated to max_text_tokens."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        keep = ("input_ids", "attention_mask") if self._pass_attention_mask else ("input_ids",)
        return {k: enc[k] for k in keep if k in enc}

    def embed_images(self, images: Sequence[Any]) -> Any:
        """L2-normalised image embeddings, float32, [B, D]."""
        import torch

        with torch.no_grad():
            pv = self.pixel_values(images).to(self.device, torch.float32)
            feats = _features(self.model.get_image_features(pixel_values=pv)).float()
        return torch.nn.functional.normalize(feats, dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> Any:
        """L2-normalised text embeddings, float32, [B, D]."""
        import torch

        with torch.no_grad():
            inputs = {k: v.to(self.device) for k, v in self.text_inputs(texts).items()}
            feats = _features(self.model.get_text_features(**inputs, **self._text_kwargs)).float()
        return torch.nn.functional.normalize(feats, dim=-1)

    def similarities(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each (image, text) pair, computed in batches of `batch_size` pairs."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        sims: list[float] = []
        for i in range(0, len(images), self.batch_size):
            img = self.embed_images(images[i: i + self.batch_size])
            txt = self.embed_texts(texts[i: i + self.batch_size])
            sims.extend((img * txt).sum(dim=-1).cpu().tolist())
        return sims
