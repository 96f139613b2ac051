"""Recipe kinds ``cells_embed`` and ``cells_profile``: which bio service runs each schema.

Registered through the ``dinoscope.recipes`` entry points (``bio.kinds:cells_embed_kind``...), so core never imports
bio and the schema module (``bio.config``) imports no service.
"""

from __future__ import annotations

from pathlib import Path

from bio.config import CellsEmbedRecipe, CellsProfileRecipe
from bio.embed import embed_plate
from bio.evaluate import evaluate_profiles
from bio.profiling import build_profiles
from core.launch.kinds import RecipeKind


def run_embed(recipe: CellsEmbedRecipe, run_dir: Path) -> int:
    """Run a ``cells_embed`` recipe into ``run_dir`` (every rank of a torchrun launch calls this)."""
    d, m, c, o = recipe.data, recipe.model, recipe.crops, recipe.output
    embed_plate(
        d.sources,
        run_dir,
        weights=m.weights,
        channels=d.channels or None,
        weights_channels=m.weights_channels or None,
        centroids=d.centroids,
        nuclei_table=d.nuclei_table or None,
        label_channel=d.label_channel or None,
        detect_channel=d.detect_channel,
        crop_size=c.size,
        edge=c.edge,
        batch_size=m.batch_size,
        normalisation=m.normalisation,
        n_last_blocks=m.n_last_blocks,
        avgpool=m.avgpool,
        input_size=m.input_size or None,
        dtype=o.dtype,
        chunk_rows=o.chunk_rows,
        head=o.head or None,
        illumination=d.illumination or None,
        device=m.device,
        precision=m.precision,
        resume=o.resume,
    )
    return 0


def run_profile(recipe: CellsProfileRecipe, run_dir: Path) -> int:
    """Run a ``cells_profile`` recipe: profiles into ``run_dir/profiles.parquet``, metrics into ``run_dir/eval``."""
    r = recipe
    controls = dict(control_column=r.control_column, control_value=r.control_value)
    profiles = Path(run_dir) / "profiles.parquet"
    build_profiles(
        r.run,
        r.platemap,
        profiles,
        aggregate=r.aggregate,
        normalise=r.normalise,
        normalise_by=r.normalise_by,
        level=r.level,
        treatment_column=r.treatment_column,
        drop_edge_cells=r.drop_edge_cells,
        **controls,
    )
    if r.evaluate:
        evaluate_profiles(
            profiles,
            Path(run_dir) / "eval",
            treatment_column=r.treatment_column,
            batch_column=r.batch_column,
            annotation_column=r.annotation_column,
            null_size=r.null_size,
            knn_k=r.knn_k,
            seed=r.seed,
            **controls,
        )
    return 0


def cells_embed_kind() -> RecipeKind:
    return RecipeKind(CellsEmbedRecipe, run_embed, "per-cell embeddings of OME-Zarr plates / LoadData manifests")


def cells_profile_kind() -> RecipeKind:
    return RecipeKind(
        CellsProfileRecipe,
        run_profile,
        "well profiles, normalisation and evaluation of an embedding run",
        distributed=False,
    )
