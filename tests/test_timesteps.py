"""sigma -> the paper's t for every model-sampling class of ComfyUI, against each class's own formula.

The expected values come from the classes themselves (their sigma tables and timestep functions) or
from the paper's convention (flow models: t = 1000·sigma), never from the pack's conversion code.
"""
import types

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfy")


def _sampling(class_name: str, prediction: str = "EPS", **settings):
    """A model-sampling object built as ComfyUI builds one: a class made from a sampling class and a
    prediction type, configured by a model config's sampling_settings."""
    import comfy.model_sampling as ms

    cls = type("ModelSampling", (getattr(ms, class_name), getattr(ms, prediction)), {})
    return cls(types.SimpleNamespace(sampling_settings=settings))


def _t(sampling, sigmas):
    from tlora_pack.trainer.timesteps import timesteps_from_sigmas
    return timesteps_from_sigmas(sampling, torch.as_tensor(sigmas, dtype=torch.float32)).tolist()


def test_discrete_models_use_their_training_timestep():
    sd = _sampling("ModelSamplingDiscrete")
    assert _t(sd, sd.sigmas[[0, 250, 999]]) == [0.0, 250.0, 999.0]


@pytest.mark.parametrize("prediction", ["CONST"])
@pytest.mark.parametrize("settings", [{"multiplier": 1.0, "shift": 3.0}, {"multiplier": 1000, "shift": 3.0},
                                      {"multiplier": 1.0, "shift": 1.0}])
def test_flow_models_use_1000_sigma_whatever_their_multiplier(prediction, settings):
    """Z-Image, Lumina 2, Qwen-Image, FLUX.1-schnell, AuraFlow set multiplier 1; SD3 1000."""
    flow = _sampling("ModelSamplingDiscreteFlow", prediction, **settings)
    assert _t(flow, [1.0, 0.5, 0.25, 0.0]) == [1000.0, 500.0, 250.0, 0.0]


def test_flux_sampling_uses_1000_sigma():
    flux = _sampling("ModelSamplingFlux", "CONST", shift=1.15)
    assert _t(flux, [1.0, 0.73, 0.0]) == pytest.approx([1000.0, 730.0, 0.0])


@pytest.mark.parametrize("class_name", ["ModelSamplingContinuousEDM", "ModelSamplingContinuousV",
                                        "ModelSamplingDiscreteEDM"])
def test_edm_and_continuous_models_use_the_sd_schedule_t_at_the_same_sigma(class_name):
    """Playground 2.5, SD-XL EDM/V variants: the t whose SD1.5 training sigma (ComfyUI's own table)
    equals this sigma; past the table's ends, 0 and 999."""
    sd = _sampling("ModelSamplingDiscrete")
    edm = _sampling(class_name, "EDM" if "EDM" in class_name else "V_PREDICTION", sigma_min=0.002, sigma_max=120.0)
    assert _t(edm, sd.sigmas[[0, 100, 500, 999]]) == [0.0, 100.0, 500.0, 999.0]
    assert _t(edm, [120.0, 0.002]) == [999.0, 0.0]


def test_cosmos_rectified_flow_uses_its_flow_time():
    cosmos = _sampling("ModelSamplingCosmosRFlow", "COSMOS_RFLOW", sigma_min=0.002, sigma_max=80.0)
    assert _t(cosmos, [1.0, 3.0, 0.0]) == pytest.approx([500.0, 750.0, 0.0])


def test_stable_cascade_uses_its_own_unit_time():
    cascade = _sampling("StableCascadeSampling", "EPS", shift=2.0)
    sigmas = cascade.sigmas[[10, 500, 990]]
    assert _t(cascade, sigmas) == pytest.approx((1000 * cascade.timestep(sigmas)).tolist(), abs=1e-3)


def test_lcm_uses_its_original_timesteps_not_the_index_into_its_50_sigmas(tiny_sd15):
    """ModelSamplingDiscrete(lcm) keeps 50 of the 1000 sigmas: the noisiest is t = 999, not 49."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    (lcm,) = ModelSamplingDiscrete().patch(tiny_sd15[0], "lcm", False)
    sampling = lcm.get_model_object("model_sampling")
    assert len(sampling.sigmas) == 50
    assert _t(sampling, sampling.sigmas[[49, 25, 0]]) == [999.0, 519.0, 19.0]


def test_unknown_sampling_classes_fall_back_to_the_sd_schedule_with_a_warning(caplog):
    from tlora_pack.trainer.timesteps import timesteps_from_sigmas

    class ModelSamplingSomethingNew(torch.nn.Module):
        pass

    sd = _sampling("ModelSamplingDiscrete")
    t = timesteps_from_sigmas(ModelSamplingSomethingNew(), sd.sigmas[[0, 999]])
    assert t.tolist() == [0.0, 999.0]
    assert "ModelSamplingSomethingNew" in caplog.text


def test_the_readme_table_lists_every_rule():
    from pathlib import Path

    from tlora_pack.trainer.timesteps import SIGMA_TO_T
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for rule in SIGMA_TO_T:
        assert f"`{rule.sampling_class}`" in readme and rule.rule in readme, rule
