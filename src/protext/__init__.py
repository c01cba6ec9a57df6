"""protext: learn CLIP text prompts from LLM class descriptions alone (ProText).

The names below load on first use, so that `import protext` (and `protext --help`) stays
light, and inference code never loads the training side (`protext.training`) unless asked.
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

_EXPORTS = {
    "Backbone": "backbone", "load_backbone": "backbone",
    "load_descriptions": "descriptions",
    "ProtextError": "errors",
    "Context": "context",
    "PromptShape": "model", "PromptConfig": "model", "ProText": "model",
    "ProTextClassifier": "classifier", "ClassifierOptions": "classifier", "build_classifier": "classifier",
    "HeadInputs": "heads",
    "TransductiveSettings": "transductive", "refine": "transductive",
    "open_inputs": "inputs",
    "TrainConfig": "training.train", "make_config": "training.train", "train": "training.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'protext' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
