"""Evaluate T-LoRA: IS / TS equal a hand computation, the Pareto choice, the plot, bad inputs.

The hand computation samples with ComfyUI's own KSampler function on the model Apply T-LoRA returns,
decodes with the VAE, embeds with the CLIP_VISION, and takes the cosines with torch's own
cosine_similarity; the text side is the tower's unprojected pooled output times the projection
matrix the test set. The server run of the sweep workflow is in tests/test_workflows.py.
"""
import math

import pytest
import torch

from tlora_pack.tlora_core.errors import TLoraError
from tlora_pack.tlora_core.metrics import best_tradeoff, image_similarity, pareto_front, text_similarity

# ---- pure maths ------------------------------------------------------------------------------------

# (IS, TS): A, B, C on the front; D is dominated by B, E by C.
POINTS = [(0.90, 0.20), (0.85, 0.26), (0.80, 0.30), (0.84, 0.25), (0.70, 0.29)]


def test_pareto_front_keeps_exactly_the_undominated_points():
    assert pareto_front(POINTS) == [0, 1, 2]
    assert pareto_front([(0.5, 0.5), (0.5, 0.5)]) == [0, 1]  # equal points do not dominate each other


def test_best_tradeoff_is_the_point_nearest_the_ideal_in_units_of_each_range():
    # ideal (0.90, 0.30); ranges IS 0.2, TS 0.1: A 1.0, B hypot(0.25, 0.4) = 0.47, C 0.5 away
    assert best_tradeoff(POINTS) == 1
    # the rule reads each score in units of its own range: rescaling TS changes nothing
    assert best_tradeoff([(i, 10 * t) for i, t in POINTS]) == 1
    # an equal distance goes to the higher TS: (1, 0) and (0, 1) are both 1 from the ideal (1, 1)
    assert best_tradeoff([(1.0, 0.0), (0.0, 1.0)]) == 1
    assert best_tradeoff([(0.3, 0.2)]) == 0
    with pytest.raises(TLoraError, match="no candidate"):
        best_tradeoff([])
    with pytest.raises(TLoraError, match="finite"):
        best_tradeoff([(float("nan"), 0.2), (0.8, 0.3)])


def test_similarities_are_mean_cosines():
    gen = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    ref = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    # cos: (1,0)-(1,0) 1, (1,0)-(0,1) 0, (1,1)-(1,0) 1/sqrt2, (1,1)-(0,1) 1/sqrt2
    assert image_similarity(gen, ref) == pytest.approx((1 + 0 + 2 / math.sqrt(2)) / 4, abs=1e-12)
    # each image with its own text only: (1,0)-(0,1) 0 and (1,1)-(0,1) 1/sqrt2
    assert text_similarity(gen, ref.flip(0)) == pytest.approx((1 / math.sqrt(2) + 0.0) / 2, abs=1e-12)
    with pytest.raises(TLoraError, match="no direction"):
        image_similarity(torch.zeros(1, 2), ref)
    with pytest.raises(TLoraError, match="2 images but 1"):
        text_similarity(gen, ref[:1])


def test_plot_is_an_image_of_the_asked_size_with_the_choice_ringed():
    from tlora_pack.trainer.plot import tradeoff_image

    plot = tradeoff_image(POINTS, [f"file {i}" for i in range(5)], [0, 1, 2], 1, width=640, height=400)
    assert plot.shape == (1, 400, 640, 3) and plot.dtype == torch.float32
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    red = (plot[0, ..., 0] > 0.7) & (plot[0, ..., 1] < 0.3) & (plot[0, ..., 2] < 0.3)
    blue = (plot[0, ..., 2] > 0.6) & (plot[0, ..., 0] < 0.3)
    assert red.any() and blue.any()


# ---- in ComfyUI, against a hand computation --------------------------------------------------------

PROMPTS = ["a photo of sks dog on the beach", "a red sks dog"]
TS_TEXTS = ["a photo of dog on the beach", "a red dog"]
SIZE, STEPS = 64, 2


@pytest.fixture(scope="module")
def towers(comfy, tiny_sd15, tmp_path_factory):
    """(clip_vision, dino stand-in, text tower with a projection P, P): CLIP_VISION objects of ComfyUI's
    class, and the tiny model's CLIP-L with a text projection, loaded as Load CLIP loads a CLIP file."""
    from support.tiny_clip import PROJECTION, tiny_clip_vision

    folder = tmp_path_factory.mktemp("clip_vision")
    projection = torch.randn(PROJECTION, PROJECTION, generator=torch.Generator().manual_seed(5)) / PROJECTION ** 0.5
    twin = _text_tower(tiny_sd15[1], projection)
    return tiny_clip_vision(folder, seed=1), tiny_clip_vision(folder, seed=2), twin, projection


def _text_tower(clip, projection):
    """A CLIP text file (HF names: the tiny model's CLIP-L tower plus `projection`) loaded as Load CLIP does."""
    import comfy.sd

    prefix = "clip_l.transformer."
    text_file = {k[len(prefix):]: v.clone() for k, v in clip.cond_stage_model.state_dict().items()
                 if k.startswith(prefix + "text_model.")}
    text_file["text_projection.weight"] = projection
    return comfy.sd.load_text_encoder_state_dicts([text_file], model_options={"dtype": torch.float32})


def _settings(**kw):
    from tlora_pack.trainer.evaluate import SamplingSettings

    return SamplingSettings(**{"steps": STEPS, "cfg": 4.0, "sampler": "euler", "scheduler": "normal", "width": SIZE,
                               "height": SIZE, "seed": 7, "images_per_prompt": 1, **kw})


def _hand_scores(tiny_sd15, towers, tlora, r_min, strength, reference):
    """IS, TS and DINO of one candidate the long way: KSampler, VAEDecode, encode_image, cosines."""
    import nodes

    from tlora_pack.trainer.runtime import apply_tlora

    patcher, clip, vae = tiny_sd15
    vision, dino, twin, projection = towers
    model, _ = apply_tlora(patcher, tlora, strength, min_rank=r_min)
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    cos = torch.nn.functional.cosine_similarity
    is_, ts, dn = [], [], []
    for prompt, text in zip(PROMPTS, TS_TEXTS):
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        _, pooled = twin.encode_from_tokens(twin.tokenize(text), return_pooled="unprojected")
        text_embed = pooled.double() @ projection.double().T
        for seed in (7,):
            latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
            (out,) = nodes.common_ksampler(model, seed, STEPS, 4.0, "euler", "normal", positive, negative, latent)
            image = vae.decode(out["samples"])
            emb = vision.encode_image(image)["image_embeds"].detach().double()
            ref = vision.encode_image(reference)["image_embeds"].detach().double()
            is_ += [float(cos(emb, r[None])) for r in ref]
            ts.append(float(cos(emb, text_embed)))
            d_emb = dino.encode_image(image)["image_embeds"].detach().double()
            d_ref = dino.encode_image(reference)["image_embeds"].detach().double()
            dn += [float(cos(d_emb, r[None])) for r in d_ref]
    return sum(is_) / len(is_), sum(ts) / len(ts), sum(dn) / len(dn)


def test_scores_equal_a_hand_computation(tiny_sd15, towers):
    from test_apply import _tlora

    from tlora_pack.trainer.evaluate import Candidate, Prompt, evaluate

    patcher, clip, vae = tiny_sd15
    vision, dino, twin, _ = towers
    tlora = _tlora(patcher, seed=3, rank=8, min_rank=4)
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(2, 48, 40, 3, generator=gen)  # two training images, not square: CLIP crops them
    candidates = [Candidate("a", tlora, 2, 1.0), Candidate("base", tlora, None, 0.0)]
    calls = []
    scores = evaluate(patcher, clip, vae, vision, reference, candidates,
                      [Prompt(p, t) for p, t in zip(PROMPTS, TS_TEXTS)], _settings(),
                      progress=lambda done, total: calls.append((done, total)), ts_clip=twin, dino=dino)
    assert calls == [(k, 4) for k in range(1, 5)]
    for score, (r_min, strength) in zip(scores, [(2, 1.0), (None, 0.0)]):
        want = _hand_scores(tiny_sd15, towers, tlora, r_min, strength, reference)
        got = (score.image_similarity, score.text_similarity, score.dino)
        assert got == pytest.approx(want, abs=2e-5), (r_min, strength)
    # the T-LoRA changes the samples, so the scores differ from the base model's (strength 0)
    assert scores[0].image_similarity != pytest.approx(scores[1].image_similarity, abs=1e-4)


def test_a_text_tower_without_its_projection_is_refused(tiny_sd15, towers):
    """The tiny SD1.5 file, like every SD 1.x checkpoint, has no CLIP text projection: TS from its CLIP would
    be noise, so without a ts_clip it is refused, and so is a ts_clip file whose projection is zero."""
    from test_apply import _tlora

    from tlora_pack.trainer.evaluate import Candidate, Prompt, evaluate

    patcher, clip, vae = tiny_sd15
    args = (patcher, clip, vae, towers[0], torch.rand(1, 32, 32, 3), [Candidate("a", _tlora(patcher), None, 1.0)],
            [Prompt(PROMPTS[0], TS_TEXTS[0])], _settings())
    with pytest.raises(TLoraError, match="not projected.*connect it to 'ts_clip'"):
        evaluate(*args)
    with pytest.raises(TLoraError, match="projection is zero"):
        evaluate(*args, ts_clip=_text_tower(clip, torch.zeros(768, 768)))


def test_prompt_lines_fill_the_trigger_and_leave_it_out_of_the_ts_text(comfy):
    from tlora_pack.nodes.evaluate import _numbers, prompt_pairs

    pairs = prompt_pairs("a photo of {trigger} {class} on the beach\n\n  a red {trigger} {class}  \n", "sks", "dog")
    assert [(p.sample, p.score) for p in pairs] == list(zip(PROMPTS, TS_TEXTS))
    assert _numbers("16, 32 32,48", int, "min_ranks") == [16, 32, 48]
    with pytest.raises(TLoraError, match="min_ranks = '16, x'"):
        _numbers("16, x", int, "min_ranks")
    with pytest.raises(TLoraError, match="prompts is empty"):
        prompt_pairs(" \n ", "sks", "dog")


def test_an_r_min_above_a_candidates_rank_is_refused_before_sampling(tiny_sd15, towers):
    from test_apply import _tlora

    from tlora_pack.trainer.evaluate import Candidate, Prompt, evaluate

    patcher, clip, vae = tiny_sd15
    calls = []
    with pytest.raises(TLoraError, match=r"r_min 9 does not fit late \(rank 8\)"):
        evaluate(patcher, clip, vae, towers[0], torch.rand(1, 32, 32, 3),
                 [Candidate("early", _tlora(patcher), 2, 1.0), Candidate("late", _tlora(patcher), 9, 1.0)],
                 [Prompt(PROMPTS[0], TS_TEXTS[0])], _settings(), progress=lambda *a: calls.append(a),
                 ts_clip=towers[2])
    assert calls == []
