"""The engine's lifecycle owner: the order of its calls, a sync in every phase once a weight source is
attached, and a clear error (not a rollout on freed memory) for a phase that has nothing to sync from."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from pebr_mega.errors import PebrError
from pebr_mega.rollout.factory import sampling_params
from pebr_mega.rollout.hf_engine import HFRolloutEngine
from pebr_mega.trainer import lifecycle as lifecycle_module
from pebr_mega.trainer.lifecycle import EngineLifecycle


class RecordingEngine(HFRolloutEngine):
    """The real HF engine, noting the order of the contract's calls."""

    calls: list[str]

    def generate(self, requests, sampling):
        self.calls.append("generate")
        return super().generate(requests, sampling)

    def update_weights(self, buckets):
        self.calls.append("update_weights")
        return super().update_weights(buckets)

    def release_memory(self):
        self.calls.append("release")
        return super().release_memory()

    def resume_memory(self, tags=None):
        self.calls.append(f"resume {tags or 'all'}")
        return super().resume_memory(tags)


    def shutdown(self):
        self.calls.append("shutdown")
        return super().shutdown()


@pytest.fixture()
def engine(tiny_model_dir, monkeypatch):
    eng = RecordingEngine.from_pretrained(tiny_model_dir)
    eng.calls = []
    # the allocator-cache frees are part of the order (torch.cuda.empty_cache on a GPU, nothing on CPU)
    monkeypatch.setattr(lifecycle_module, "free_allocator_cache", lambda: eng.calls.append("free cache"))
    return eng


def _request(tiny_model_dir, engine):
    from pebr_mega.data.prompts import render_prompt_ids
    from pebr_mega.rollout.types import RolloutRequest

    ids = render_prompt_ids(engine.tokenizer, "How many shapes?", [])
    return [RolloutRequest(record_id="q", prompt_ids=ids)], sampling_params(engine.tokenizer, 1, 0.0, 1.0, 4, 0)


def test_each_phase_resumes_syncs_resumes_generates_and_releases(tiny_model_dir, engine):
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    requests, sampling = _request(tiny_model_dir, engine)
    before = engine.generate(requests, sampling)[0].response_ids
    lifecycle = EngineLifecycle(engine)
    lifecycle.release()  # what a trainer does before it builds the actor
    with pytest.raises(PebrError, match="no weight source"):
        with lifecycle.rollout_phase():
            pass
    lifecycle.attach(lambda eng: (eng.update_weights([list(state.items())]), {"sync/bytes": 1.0})[1])
    engine.calls.clear()
    for _ in range(2):
        with lifecycle.rollout_phase() as eng:
            assert eng.generate(requests, sampling)[0].response_ids == before
    # the training step's cached blocks go back before the weights are resumed, the sync buffers before the
    # KV cache is (slime's order)
    phase = ["free cache", "resume ['weights']", "update_weights", "free cache", "resume all", "generate", "release"]
    assert engine.calls == phase * 2 and lifecycle.last_sync == {"sync/bytes": 1.0}


def test_without_a_source_only_the_weights_loaded_at_construction_serve(tiny_model_dir, engine):
    requests, sampling = _request(tiny_model_dir, engine)
    lifecycle = EngineLifecycle(engine)  # difficulty sampling: no actor
    with lifecycle.rollout_phase() as eng:
        eng.generate(requests, sampling)
        eng.generate(requests, sampling)
    assert engine.calls == ["free cache", "resume ['weights']", "free cache", "resume all", "generate", "generate",
                            "release"]
    with pytest.raises(PebrError, match="released and there is no weight source"):
        with lifecycle.rollout_phase():
            pass


def test_close_shuts_the_engine_down_once_and_every_later_call_is_refused(tiny_model_dir, engine):
    """A stage ends with `close()`: the engine is shut down (the pipeline's next stage builds its own) and the
    HF engine, like SGLang's, refuses every call afterwards instead of answering from freed memory."""
    requests, sampling = _request(tiny_model_dir, engine)
    lifecycle = EngineLifecycle(engine, source=lambda eng: {})
    lifecycle.close()
    lifecycle.close()
    assert engine.calls == ["shutdown", "free cache"] and engine.is_shut_down and lifecycle.source is None
    assert all(p.numel() == 0 for p in engine.model.parameters())
    with pytest.raises(PebrError, match="after the rollout engine was shut down"):
        with lifecycle.rollout_phase():
            pass
    for call in (lambda: engine.generate(requests, sampling), lambda: engine.update_weights([]),
                 engine.release_memory, engine.resume_memory):
        with pytest.raises(PebrError, match="after the rollout engine was shut down"):
            call()
