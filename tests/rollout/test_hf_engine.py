"""The transformers rollout engine: n samples per prompt, determinism, weights from buckets, mismatch = 1."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pebr_mega.data.prompts import render_prompt_ids
from pebr_mega.rollout.engine import group_samples
from pebr_mega.rollout.hf_engine import HFRolloutEngine, checkpoint_to_module_name, mm_token_type_ids
from pebr_mega.algo.mismatch import token_mult_prob_error
from pebr_mega.rollout.types import RolloutRequest, SamplingParams


def _requests(model_dir, n_req=3):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = Qwen2VLImageProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(n_req):
        img = Image.fromarray(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8))
        vis = proc(images=[img], return_tensors="pt")
        n_tok = int(vis["image_grid_thw"].prod()) // 4
        ids = render_prompt_ids(tok, f"<image>How many shapes? ({i})", [n_tok])
        reqs.append(RolloutRequest(record_id=f"q{i}", prompt_ids=ids, pixel_values=vis["pixel_values"],
                                   image_grid_thw=vis["image_grid_thw"]))
    return tok, reqs


def _stop_ids(tok):
    return [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def test_n_samples_grouped_in_order_and_deterministic(tiny_model_dir):
    tok, reqs = _requests(tiny_model_dir)
    eng = HFRolloutEngine.from_pretrained(tiny_model_dir, batch_size=2)
    sp = SamplingParams(n=3, temperature=1.2, top_p=0.99, max_new_tokens=6, stop_token_ids=_stop_ids(tok), seed=7)
    a = eng.generate(reqs, sp)
    b = eng.generate(reqs, sp)
    assert [s.record_id for s in a] == ["q0"] * 3 + ["q1"] * 3 + ["q2"] * 3
    assert [len(g) for g in group_samples(a)] == [3, 3, 3]
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    for s in a:
        assert 1 <= len(s.response_ids) <= 6 and len(s.rollout_logprobs) == len(s.response_ids)
        assert s.finish_reason == ("stop" if s.response_ids[-1] in _stop_ids(tok) else "length")
    c = eng.generate(reqs, SamplingParams(**{**sp.__dict__, "seed": 8}))
    assert [s.response_ids for s in a] != [s.response_ids for s in c]


def test_engine_logprobs_match_actor_recompute(tiny_model_dir):
    """The engine's log-probs equal a fresh forward's log softmax(logits / T): mismatch metric = 1."""
    tok, reqs = _requests(tiny_model_dir, n_req=2)
    eng = HFRolloutEngine.from_pretrained(tiny_model_dir)
    sp = SamplingParams(n=2, temperature=0.7, max_new_tokens=5, stop_token_ids=_stop_ids(tok), seed=1)
    samples = eng.generate(reqs, sp)
    actor = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.request.prompt_ids + s.response_ids])
            logits = eng.model(input_ids=ids, pixel_values=s.request.pixel_values, image_grid_thw=s.request.image_grid_thw,
                               mm_token_type_ids=mm_token_type_ids(ids, eng.model.config)).logits[0].double()
            p = len(s.request.prompt_ids)
            lp = torch.log_softmax(logits[p - 1:-1] / sp.temperature, -1)
            actor.append(lp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1))
    err = token_mult_prob_error(actor, [s.rollout_logprobs for s in samples])
    assert err == pytest.approx(1.0, abs=1e-4)
    shifted = [a + 0.1 for a in actor]
    assert token_mult_prob_error(shifted, [s.rollout_logprobs for s in samples]) == pytest.approx(np.exp(0.1), abs=1e-3)


def test_update_weights_from_buckets_equals_loading_that_model(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from pebr_mega.data.corpus import tokenizer_corpus
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model

    other = build_tiny_model(tmp_path / "other", TinyModelConfig(seed=3), tokenizer_corpus())
    tok, reqs = _requests(tiny_model_dir, n_req=2)
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, stop_token_ids=_stop_ids(tok), seed=3)
    eng = HFRolloutEngine.from_pretrained(tiny_model_dir)
    state = load_file(str(other / "model.safetensors"))
    names = sorted(state)
    eng.update_weights([[(k, state[k]) for k in names[i:i + 10]] for i in range(0, len(names), 10)])
    fresh = HFRolloutEngine.from_pretrained(other)
    assert [s.response_ids for s in eng.generate(reqs, sp)] == [s.response_ids for s in fresh.generate(reqs, sp)]


def test_update_weights_rejects_unknown_names_and_shapes(tiny_model_dir):
    from pebr_mega.errors import CheckpointError

    eng = HFRolloutEngine.from_pretrained(tiny_model_dir)
    with pytest.raises(CheckpointError, match="model.layers.99"):
        eng.update_weights([[("model.layers.99.mlp.up_proj.weight", torch.zeros(1))]])
    with pytest.raises(CheckpointError, match="shape"):
        eng.update_weights([[("model.norm.weight", torch.zeros(3))]])


def test_generation_uses_3d_mrope_positions(tiny_model_dir):
    """transformers 5 builds M-RoPE positions only from `mm_token_type_ids`: the engine must pass them, or its
    prompts would be encoded with 1-D positions unlike the actor's. Greedy continuation equals the argmax of
    a forward with the token types, and differs from one without them on some prompt."""
    tok, reqs = _requests(tiny_model_dir, n_req=3)
    eng = HFRolloutEngine.from_pretrained(tiny_model_dir)
    out = eng.generate(reqs, SamplingParams(n=1, temperature=0.0, max_new_tokens=1, stop_token_ids=[-1]))
    differs = False
    with torch.no_grad():
        for r, s in zip(reqs, out):
            ids = torch.tensor([r.prompt_ids])
            kw = dict(input_ids=ids, pixel_values=r.pixel_values, image_grid_thw=r.image_grid_thw)
            typed = eng.model(**kw, mm_token_type_ids=mm_token_type_ids(ids, eng.model.config)).logits[0, -1]
            plain = eng.model(**kw).logits[0, -1]
            assert s.response_ids[0] == int(typed.argmax())
            differs |= not torch.allclose(typed, plain)
    assert differs


def test_checkpoint_names_map_to_both_module_layouts():
    new = {"model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.attn.qkv.weight", "lm_head.weight"}
    old = {"model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.weight", "lm_head.weight"}
    for names in (new, old):
        assert checkpoint_to_module_name("model.layers.0.mlp.up_proj.weight", names) in names
        assert checkpoint_to_module_name("visual.blocks.0.attn.qkv.weight", names) in names
        assert checkpoint_to_module_name("lm_head.weight", names) == "lm_head.weight"
    assert checkpoint_to_module_name("nope.weight", new) is None


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_model_dir_alt"])
def test_released_weights_are_gone_until_every_one_is_delivered_again(model, request):
    """SGLang's contract, enforced on CPU: release frees the weights; generate refuses until update_weights has
    restored every parameter (a tied lm_head comes back with the embedding, the only name the checkpoint has)."""
    from safetensors.torch import load_file

    from pebr_mega.errors import PebrError

    model_dir = request.getfixturevalue(model)
    tok, reqs = _requests(model_dir, n_req=2)
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=5, stop_token_ids=_stop_ids(tok), seed=4)
    eng = HFRolloutEngine.from_pretrained(model_dir)
    before = [s.response_ids for s in eng.generate(reqs, sp)]
    params = list(eng.model.parameters())
    eng.release_memory()
    assert all(p.numel() == 0 for p in params)  # freed, not parked on the host
    with pytest.raises(PebrError, match="released"):
        eng.generate(reqs, sp)
    state = load_file(str(model_dir / "model.safetensors"))
    with pytest.raises(PebrError, match="resume_memory"):
        eng.update_weights([list(state.items())])
    eng.resume_memory(["weights"])
    names = sorted(state)
    eng.update_weights([[(k, state[k]) for k in names[:-2]]])
    eng.resume_memory()
    with pytest.raises(PebrError, match=f"2 of .* {names[-1]}|2 of .* {names[-2]}"):
        eng.generate(reqs, sp)
    eng.update_weights([[(k, state[k]) for k in names[-2:]]])
    assert [s.response_ids for s in eng.generate(reqs, sp)] == before
