"""Export a backbone as safetensors + JSON sidecar (the portable ``dinoscope`` weights format)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from core.io import atomic_path, write_json
from core.weights.meta import WeightMeta, sidecar_path


def save_backbone(model: nn.Module | dict, meta: WeightMeta, path: str | os.PathLike) -> Path:
    """Write ``path`` (.safetensors) and its sidecar ``path.with_suffix('.json')``, each atomically.

    The sidecar is also embedded in the safetensors header, so the weights stay usable if the JSON gets lost.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    meta.validate(path)
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dinoscope_meta": json.dumps(meta.to_dict())})
    write_json(sidecar_path(path), meta.to_dict())
    return path
