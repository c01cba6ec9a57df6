"""protext: learn CLIP text prompts from LLM class descriptions alone (ProText)."""

from .backbone import Backbone, load_backbone
from .classifier import ProTextClassifier
from .descriptions import load_descriptions
from .errors import ProtextError
from .model import PromptConfig, ProText
from .train import TrainConfig, make_config, train

__all__ = ["Backbone", "load_backbone", "load_descriptions", "ProtextError", "PromptConfig", "ProText", "ProTextClassifier",
           "TrainConfig", "make_config", "train"]
__version__ = "0.1.0"
