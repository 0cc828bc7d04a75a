"""Steer Hugging Face language models with SAE features inside ``torch.compile``."""

from .edits import AddVector, Clamp, Reconstruct, Steering
from .sae import SAE
from .steered import SteeredModel, steer

__all__ = ["SAE", "AddVector", "Clamp", "Reconstruct", "Steering", "SteeredModel", "steer"]
