"""Recipe kinds ``cells_embed`` and ``cells_profile``: which bio service runs each schema.

Registered through the ``dinoscope.recipes`` entry points (``bio.kinds:cells_embed_kind``...), so core never imports
bio and the schema module (``bio.config``) imports no service.
"""

from __future__ import annotations

from bio.config import CellsEmbedRecipe, CellsProfileRecipe
from bio.services import embed_into, profile_and_evaluate
from core.launch.kinds import RecipeKind


def cells_embed_kind() -> RecipeKind:
    """Entry point ``dinoscope.recipes: cells_embed``."""
    return RecipeKind(CellsEmbedRecipe, embed_into, "per-cell embeddings of OME-Zarr plates / LoadData manifests")


def cells_profile_kind() -> RecipeKind:
    """Entry point ``dinoscope.recipes: cells_profile``."""
    return RecipeKind(
        CellsProfileRecipe,
        profile_and_evaluate,
        "well profiles, normalisation and evaluation of an embedding run",
        distributed=False,
    )
