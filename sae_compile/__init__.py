"""Steer Hugging Face language models with SAE features inside ``torch.compile``."""

from .edits import AddVector, Clamp, Reconstruct, Steering
from .features import FeatureRecord, Features, features_from_json, features_to_json
from .runtime.state import Paths
from .sae import SAE
from .steered import SteeredModel, steer

__all__ = [
    "SAE", "AddVector", "Clamp", "FeatureRecord", "Features", "Paths", "Reconstruct", "Steering", "SteeredModel",
    "features_from_json", "features_to_json", "steer",
]
