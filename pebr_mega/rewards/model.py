"""Stage presets and the reward model that scores a batch of responses (PEBR_FACTS, "Rewards").

    stage1 (perception RL) = 0.4 clip + 0.4 keyword + 0.1 format + 0.1 length   (accuracy logged, weight 0)
    stage2 (reasoning RL)  = 0.9 accuracy + 0.1 format

The preset is the stage's: the caller names it (`build_reward(cfg, stage)`; the GRPO trainer passes
`grpo.stage`, the one stage switch). This config holds no stage of its own, so a stage-2 run cannot score
with stage-1 rewards because a second key was left at its default.

Which components are computed: every one with a non-zero weight, plus accuracy and format always (both are
cheap and are the numbers to watch in either stage). A component that is not computed is absent from the
result, never reported as 0.

The CLIP reward scores the prompt's first image (as the policy sees it, after the pixel-bound resize)
against the response's image description, as upstream's `examples/reward_function/pebr_1.py` does; a
response without a description (no `### Image Description:` ... `### Rationales:` text) is scored against
an empty caption, as upstream does, and counted as the warning `description_missing`.

Robustness: the text components run in worker processes under a per-sample time limit
(`pebr_mega.rewards.guard`; the CLIP component runs here, in the parent). A sample whose grading overruns
`rewards.timeout_s` scores 0 in total and in every component and is counted (`reward/timeouts`). A reward
function that raises scores 0 for that sample and is counted as a failure of that component; neither kills
the step. Data problems that are not the model's fault are counted as warnings: `keyword_empty` (a record
without key words) and `image_missing` (a sample with no image: CLIP reward 0).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pebr_mega.config_fields import check_fields, choice
from pebr_mega.errors import PebrError
from pebr_mega.rewards.guard import RewardPool, score_components, shared_pool
from pebr_mega.rewards.text import (GRADINGS, KEYWORD_MATCHES, accuracy_reward, extract_description, format_reward,
                                    keyword_reward, length_reward, normalize_key_words)

COMPONENTS = ("clip", "keyword", "format", "length", "accuracy")
STAGE_WEIGHTS: dict[str, dict[str, float]] = {
    "stage1": {"clip": 0.4, "keyword": 0.4, "format": 0.1, "length": 0.1, "accuracy": 0.0},
    "stage2": {"clip": 0.0, "keyword": 0.0, "format": 0.1, "length": 0.0, "accuracy": 0.9},
}
ALWAYS_COMPUTED = ("accuracy", "format")
# The pure text rewards, run in the guard's workers (sent by reference, so module-level functions only).
TEXT_REWARDS: dict[str, Callable[..., float]] = {"format": format_reward, "accuracy": accuracy_reward,
                                                 "keyword": keyword_reward, "length": length_reward}


@dataclass
class RewardConfig:
    """Weight overrides of the stage preset, answer grading, the CLIP scorer's and the grading pool's settings
    (the preset itself is chosen by the stage: `build_reward(cfg, stage)`)."""

    answer_grading: str = choice("upstream", list(GRADINGS),
                                 "how the answer is taken from a response (pebr_mega.rewards.text); the "
                                 "difficulty sampling and evaluation grade the same way")
    weights: dict[str, float] = field(default_factory=dict)  # overrides of the preset, e.g. {clip: 0.5}
    # Key words compared as written, lower-cased (upstream: a blank key word is always found), or stripped with
    # blank ones dropped (strict).
    keyword_match: str = choice("upstream", list(KEYWORD_MATCHES), "how key words are compared (rewards.text)")
    clip_model_dir: str | None = None  # a local CLIP-family checkpoint (FG-CLIP large upstream)
    clip_threshold: float = 0.4  # similarity at which the CLIP reward saturates at 1
    clip_device: str = "auto"  # auto = cuda when present; or "cpu", "cuda:1", ...
    clip_image_size: int = 336
    clip_max_text_tokens: int = 248
    clip_batch_size: int = 32
    clip_trust_remote_code: bool = True  # FG-CLIP ships its own modelling code
    length_limit: int = 512  # responses up to this many tokens get the full length reward
    # Grading runs in worker processes (pebr_mega.rewards.guard): a sample whose text rewards take longer than
    # timeout_s scores 0 and is counted (reward/timeouts); a worker may use at most worker_memory_mb of address
    # space (0 = no cap).
    timeout_s: float = 5.0
    num_workers: int = 4
    worker_memory_mb: int = 4096

    def __post_init__(self) -> None:
        check_fields("rewards", {
            "clip_threshold": (self.clip_threshold > 0, self.clip_threshold, "must be > 0"),
            "clip_image_size": (self.clip_image_size >= 1, self.clip_image_size, "must be >= 1"),
            "clip_max_text_tokens": (self.clip_max_text_tokens >= 1, self.clip_max_text_tokens, "must be >= 1"),
            "clip_batch_size": (self.clip_batch_size >= 1, self.clip_batch_size, "must be >= 1"),
            "length_limit": (self.length_limit >= 1, self.length_limit, "must be >= 1"),
            "timeout_s": (math.isfinite(self.timeout_s) and self.timeout_s > 0, self.timeout_s,
                          "must be a positive number of seconds"),
            "num_workers": (self.num_workers >= 1, self.num_workers, "must be >= 1"),
            "worker_memory_mb": (self.worker_memory_mb >= 0, self.worker_memory_mb, "must be >= 0 (0 = no cap)"),
        })


def reward_pool(cfg: RewardConfig) -> RewardPool:
    """The process's grading pool for `cfg`'s time limit, worker count and memory cap (shared, started lazily)."""
    return shared_pool(cfg.timeout_s, cfg.num_workers, cfg.worker_memory_mb)


@dataclass
class RewardSample:
    """What the rewards need from one response: its text and length, and the record's answer and key words."""

    response: str
    response_tokens: int
    answer: str
    key_words: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # PIL images of the prompt; only CLIP reads them
    qid: str | None = None


@dataclass
class RewardResult:
    """The weighted total and every computed component (unweighted, in [0, 1])."""

    total: float
    components: dict[str, float]
    failures: list[str] = field(default_factory=list)  # components whose function raised (scored 0)
    warnings: list[str] = field(default_factory=list)  # data problems noticed while scoring
    timed_out: bool = False  # grading overran rewards.timeout_s: the sample scores 0


def preset_weights(cfg: RewardConfig, stage: str) -> dict[str, float]:
    """`stage`'s preset with `cfg.weights` applied; an unknown stage, unknown or non-finite weights are a
    PebrError."""
    if stage not in STAGE_WEIGHTS:
        raise PebrError(f"unknown reward preset {stage!r}; valid: {list(STAGE_WEIGHTS)}")
    weights = dict(STAGE_WEIGHTS[stage])
    for name, w in cfg.weights.items():
        if name not in weights:
            raise PebrError(f"unknown reward component in rewards.weights.{name}; valid: {list(COMPONENTS)}")
        if not math.isfinite(w):
            raise PebrError(f"rewards.weights.{name} must be a finite number, got {w}")
        weights[name] = float(w)
    return weights


class RewardModel:
    """Scores batches of `RewardSample`s with one stage's weights."""

    def __init__(self, cfg: RewardConfig, weights: dict[str, float], clip_scorer: Any = None,
                 pool: RewardPool | None = None) -> None:
        self.cfg = cfg
        self.weights = weights
        self.clip_scorer = clip_scorer
        self.pool = pool if pool is not None else reward_pool(cfg)
        self.components = [c for c in COMPONENTS if weights[c] != 0 or c in ALWAYS_COMPUTED]
        if "clip" in self.components and clip_scorer is None:
            raise PebrError("the CLIP reward has a non-zero weight but no CLIP scorer was given")
        self.last_errors: dict[str, str] = {}  # component -> the latest exception text, for the log

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, batch: Sequence[RewardSample]) -> list[RewardResult]:
        """Score every sample; never raises or hangs because of one sample (failures and timeouts are counted
        in the results)."""
        text = [c for c in self.components if c != "clip"]
        graded = score_components(self.pool, [[(c, TEXT_REWARDS[c], self._text_args(c, s)) for c in text]
                                              for s in batch])
        results = [RewardResult(0.0, {}) for _ in batch]
        for sample, res, g in zip(batch, results, graded):
            res.timed_out = g.timed_out
            for name in text:
                res.components[name] = 0.0 if g.timed_out else self._checked(name, g.values.get(name),
                                                                             g.failed.get(name), res)
            if "keyword" in text and not normalize_key_words(sample.key_words):
                res.warnings.append("keyword_empty")
        if any(r.timed_out for r in results):
            self.last_errors["timeout"] = f"grading took longer than rewards.timeout_s={self.cfg.timeout_s:g} s"
        if "clip" in self.components:
            self._score_clip(batch, results)
        for res in results:
            if res.timed_out:  # an answer that stalls the grader earns nothing, whatever else it got right
                res.components = {c: 0.0 for c in res.components}
            res.total = sum(self.weights[c] * v for c, v in res.components.items())
        return results

    def _text_args(self, name: str, s: RewardSample) -> tuple:
        """The arguments of the text reward `name` for sample `s` (what is sent to a worker)."""
        return {"format": (s.response,), "accuracy": (s.response, s.answer, self.cfg.answer_grading),
                "keyword": (s.response, list(s.key_words), self.cfg.keyword_match),
                "length": (s.response_tokens, self.cfg.length_limit)}[name]

    def _checked(self, name: str, value: Any, error: str | None, res: RewardResult) -> float:
        """A component's value, or 0 counted as a failure when its function raised or gave a non-finite number."""
        if error is None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                error = f"TypeError: {name} reward returned {value!r}"
            else:
                if math.isfinite(value):
                    return value
                error = f"ValueError: {name} reward is {value}"
        self.last_errors[name] = error  # one bad sample must not kill the step: score 0, count it, keep the reason
        res.failures.append(name)
        return 0.0

    def _score_clip(self, batch: Sequence[RewardSample], results: list[RewardResult]) -> None:
        """CLIP rewards: the similarity of each sample's first image and its description (module docstring)."""
        from pebr_mega.rewards.clip import similarity_to_reward  # transformers: only when a CLIP weight is set

        pairs: list[tuple[int, Any, str]] = []
        for i, (sample, res) in enumerate(zip(batch, results)):
            res.components["clip"] = 0.0
            if not sample.images:
                res.warnings.append("image_missing")
                continue
            desc = extract_description(sample.response)
            if desc is None:
                res.warnings.append("description_missing")
            pairs.append((i, sample.images[0], desc or ""))
        if not pairs:
            return
        for (i, _, _), sim in zip(pairs, self._similarities_guarded(pairs, results)):
            if sim is not None:
                results[i].components["clip"] = similarity_to_reward(sim, self.cfg.clip_threshold)

    def _similarities_guarded(self, pairs: list[tuple[int, Any, str]],
                              results: list[RewardResult]) -> list[float | None]:
        """The batched similarities; if the batch fails, retry sample by sample so only bad samples score 0."""
        try:
            return list(self.clip_scorer.similarities([p[1] for p in pairs], [p[2] for p in pairs]))
        except Exception as e:
            self.last_errors["clip_batch"] = f"{type(e).__name__}: {e}"
        sims: list[float | None] = []
        failed: set[int] = set()
        for i, im, desc in pairs:
            try:
                sims.append(float(self.clip_scorer.similarities([im], [desc])[0]))
            except Exception as e:
                self.last_errors["clip"] = f"{type(e).__name__}: {e}"
                sims.append(None)
                if i not in failed:
                    failed.add(i)
                    results[i].failures.append("clip")
        return sims


def summarize(results: Sequence[RewardResult]) -> dict[str, float]:
    """Step metrics: mean total and mean of each component, timed-out samples (`reward/timeouts`), failures per
    component, warnings per kind."""
    out: dict[str, float] = {"reward/count": float(len(results))}
    if not results:
        return out
    out["reward/total"] = sum(r.total for r in results) / len(results)
    out["reward/timeouts"] = float(sum(r.timed_out for r in results))
    names = [c for c in COMPONENTS if any(c in r.components for r in results)]
    for c in names:
        values = [r.components[c] for r in results if c in r.components]
        out[f"reward/{c}"] = sum(values) / len(values)
    failures = Counter(f for r in results for f in r.failures)
    for c in names:
        out[f"reward_failures/{c}"] = float(failures.get(c, 0))
    for w, n in sorted(Counter(w for r in results for w in r.warnings).items()):
        out[f"reward_warnings/{w}"] = float(n)
    return out


def build_reward(cfg: RewardConfig, stage: str, clip_scorer: Any = None, pool: RewardPool | None = None) -> RewardModel:
    """The reward model of `stage`'s preset (`stage1` | `stage2`) under `cfg`. Loads the CLIP scorer when the
    preset needs it and none is passed in.

    A preset that needs CLIP with no `rewards.clip_model_dir` fails here, at start-up, not mid-run.
    """
    weights = preset_weights(cfg, stage)
    if weights["clip"] != 0 and clip_scorer is None:
        if not cfg.clip_model_dir:
            raise PebrError(f"the {stage} preset gives the CLIP reward weight {weights['clip']} but "
                            "rewards.clip_model_dir is not set: point it at a local CLIP-family checkpoint "
                            "(FG-CLIP large upstream; `pebr make-tiny-clip --out DIR` for a tiny random one), "
                            "or set rewards.weights.clip=0")
        from pebr_mega.rewards.clip import ClipAlignmentScorer  # transformers: only when a CLIP weight is set

        try:
            clip_scorer = ClipAlignmentScorer(cfg.clip_model_dir, cfg.clip_device, cfg.clip_image_size,
                                              cfg.clip_max_text_tokens, cfg.clip_batch_size,
                                              cfg.clip_trust_remote_code)
        except PebrError as e:
            raise PebrError(f"rewards.clip_model_dir={cfg.clip_model_dir}: {e}") from None
    return RewardModel(cfg, weights, clip_scorer, pool)
