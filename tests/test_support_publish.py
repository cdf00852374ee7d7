"""Helper for the kill-during-publish test: a publish that stalls while writing its weights."""

import time

import safetensors.torch

from model import registry
from model.networks import Detector, Refiner
from tests.model.test_registry import _manifest_fields
from tests.conftest import tiny_model_config


def publish_slowly(weights_dir: str) -> None:
    original = safetensors.torch.save_file

    def stalled(*args, **kwargs):
        original(*args, **kwargs)
        time.sleep(60)

    registry.save_file = stalled
    config = tiny_model_config()
    registry.publish(weights_dir, Refiner(config), Detector(config), _manifest_fields(config))
