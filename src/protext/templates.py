"""Prompt templates as data: CLIP's 80 ImageNet templates and the per-dataset ones.

`{}` is the class name. Dataset keys are protext's dataset names (see datasets.py).
"""

from .errors import ProtextError


def check_template(template: str) -> None:
    """A template holds exactly one '{}' (the class name) and no other braces."""
    try:
        ok = template.count("{}") == 1 and template.format("x") == template.replace("{}", "x")
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ProtextError(f"template {template!r} must hold exactly one '{{}}' (where the class name goes) "
                           f"and no other braces")


# The 80 templates of CLIP's ImageNet prompt ensemble ("CLIP-80").
IMAGENET_80 = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
]

# The 7 of those 80 that CLIP's authors kept as a smaller ensemble (their ImageNet prompt notebook).
IMAGENET_7 = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
]

# The single template of the CLIP baseline, per dataset.
CLIP_TEMPLATES = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}

# ProText's inference templates (cross-dataset setting); "a photo of a" is where the
# learned context goes.
PROTEXT_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "a photo of a {}, a type of a texture.",
    "eurosat": "a photo of a centered satellite photo of {}.",
    "food101": "a photo of a {}, a type of food.",
}


# AWT's per-dataset templates (its class-name prompt is "<template>." and each description prompt
# "<template>. <description>").
AWT_TEMPLATES = {
    "oxford_pets": "a photo of a {} from OxfordPets", "oxford_flowers": "a photo of a {}, a type of flower",
    "fgvc_aircraft": "a photo of a {} from Fine-Grained Visual Classification of Aircraft",
    "dtd": "a photo of a {}, which is a type of texture, or a type of pattern", "eurosat": "satellite photo of the {}",
    "food101": "a photo of a {} from Food101", "ucf101": "a photo of a person doing {}",
    "imagenet_sketch": "a sketch photo of a {}", "imagenet_r": "a rendition photo of a {}",
    "cub": "a photo of the {}", "caltech256": "a photo of the {}", "birdsnap": "a photo of the {}",
    "cifar10": "a photo of the {}", "cifar100": "a photo of the {}",
}


def ensemble_templates(first: str) -> list[str]:
    """`first`, then CLIP's 7 ensemble templates without it: the list both the inference ensemble
    (`templates` "ensemble") and ensemble training (`train_templates` "ensemble") go through."""
    return [first, *(t for t in IMAGENET_7 if t != first)]


def awt_template(dataset: str | None) -> str:
    return AWT_TEMPLATES.get(dataset or "", "a photo of a {}")


def clip_template(dataset: str | None) -> str:
    return CLIP_TEMPLATES.get(_family(dataset), "a photo of a {}.")


def protext_template(dataset: str | None, cross_dataset: bool) -> str:
    """ProText's inference template, as its code picks it: the dataset's only for prompts
    learned on another dataset (cross-dataset), otherwise "a photo of a {}."."""
    return PROTEXT_TEMPLATES.get(_family(dataset), "a photo of a {}.") if cross_dataset else "a photo of a {}."


def _family(dataset: str | None) -> str:
    """ImageNet variants use ImageNet's templates."""
    return "imagenet" if dataset and dataset.startswith("imagenet") else (dataset or "")
