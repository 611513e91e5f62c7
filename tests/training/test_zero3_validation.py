"""Validation images under ZeRO-3 are refused before any step (the DiT is partitioned across ranks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from diffsynth_templates.training.backbones import UnsupportedFeatureError
from diffsynth_templates.training.distributed import prepare_distributed


def _accelerator(zero_stage: int):
    plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config={})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), distributed_type="DEEPSPEED")


def test_zero3_with_validation_images_is_refused_naming_what_works():
    with pytest.raises(UnsupportedFeatureError, match=r"ZeRO-3.*accelerate_deepspeed_zero2\.yaml"):
        prepare_distributed(_accelerator(3), nn.Linear(2, 2), nn.Linear(2, 2), 4, 1.0, validation=True)


@pytest.mark.parametrize("stage, validation", [(3, False), (2, True)])
def test_zero3_without_validation_and_zero2_with_it_are_prepared(stage, validation):
    accelerator = _accelerator(stage)
    prepare_distributed(accelerator, nn.Linear(2, 2), nn.Linear(2, 2), 4, 1.0, validation=validation)
    assert accelerator.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 1.0,
    }
