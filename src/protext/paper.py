"""The paper's numbers (CLIP ViT-B/16, top-1 %), for side-by-side tables. None: not reported."""

TEXT_ONLY_IMAGENET = {"clip": 66.72, "clip80": 68.32, "dclip": 68.03, "waffle": 68.34, "cupl": 69.62, "protext": 70.22,
                      "awt": 71.32}  # AWT: its own paper (NeurIPS 2024), with its own descriptions and 50 views

BASE2NOVEL_MEAN = {  # (base, novel, HM), average over 11 datasets
    "clip": (69.34, 74.22, 71.70),
    "cupl": (72.56, 74.22, 73.38),
    "protext": (72.95, 76.98, 74.91),
}

CROSS_DATASET_PROTEXT = {
    "imagenet": 69.80, "caltech101": 94.81, "oxford_pets": 91.01, "stanford_cars": 66.00, "oxford_flowers": 72.35,
    "food101": 86.66, "fgvc_aircraft": 24.72, "sun397": 67.34, "dtd": 47.93, "eurosat": 51.86, "ucf101": 69.60,
}
CROSS_DATASET_MEAN = {"clip": 65.15, "cupl": 65.15, "protext": 67.23}

DOMAIN_GENERALIZATION = {  # V2, Sketch, A, R
    "clip": {"imagenetv2": 60.83, "imagenet_sketch": 46.15, "imagenet_a": 47.77, "imagenet_r": 73.96},
    "cupl": {"imagenetv2": 63.27, "imagenet_sketch": 49.02, "imagenet_a": 50.72, "imagenet_r": 77.05},
    "protext": {"imagenetv2": 63.54, "imagenet_sketch": 49.45, "imagenet_a": 51.47, "imagenet_r": 77.35},
}
DOMAIN_GENERALIZATION_MEAN = {"clip": 57.18, "cupl": 60.01, "protext": 60.45}
