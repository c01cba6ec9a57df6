import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import CUPL, SHARED  # noqa: E402


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the tests read the shared data beside the project")
    return SHARED


@pytest.fixture(scope="session")
def tiny():
    from protext.tiny import tiny_clip

    return tiny_clip(seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    from protext.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tinyclip"), seed=0)


@pytest.fixture(scope="session")
def eurosat(shared):
    from protext.descriptions import load_descriptions

    return load_descriptions(CUPL / "eurosat_prompts_full.json")


@pytest.fixture(scope="session")
def prompts_dir(tiny_folder, tmp_path_factory) -> Path:
    """Prompts with random (not initial) values on the tiny CLIP folder, saved once per session."""
    import torch

    from protext.backbone import load_backbone
    from protext.model import ProText

    pt = ProText.create(load_backbone(str(tiny_folder), device="cpu"), depth=2, seed=2)
    with torch.no_grad():
        pt.prompts.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    return pt.save_pretrained(tmp_path_factory.mktemp("prompts"))
