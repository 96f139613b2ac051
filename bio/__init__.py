"""dinoscope bio: DINOv2 embeddings for cell-painting screens.

The entry points for notebooks are exported here (each loads its module on first use, so ``import bio`` is
instant)::

    from bio import read_image, embed_plate, build_profiles, evaluate_profiles

    image = read_image("plate.ome.zarr/A/1/0", channels=["DNA", "RNA"])                   # channels by name
    embed_plate(["plate.ome.zarr"], "runs/embed", weights="backbone.safetensors")         # per-cell embeddings
    build_profiles("runs/embed", "platemap.csv", "profiles.parquet")                       # normalised to controls
    metrics = evaluate_profiles("profiles.parquet", "eval/")                               # mAP, kNN, report.html

Modules:

* :mod:`bio.io` - OME-TIFF, OME-Zarr images and HCS plates (NGFF 0.4/0.5) and CellProfiler LoadData manifests as
  lazy, channel-named :class:`bio.io_base.Image` objects; OME-TIFF and OME-Zarr plate writers.
* :mod:`bio.fields`, :mod:`bio.fields_files` - the fields of a run (plates, manifests, OME-TIFF files, folders and
  image lists; plate/well/site from file names) and their nuclei.
* :mod:`bio.preprocess` - per-plate illumination correction and per-channel normalisation.
* :mod:`bio.cells` - nucleus centroids (CellProfiler tables, label images, built-in detection) and single-cell crops.
* :mod:`bio.synthetic` - seeded synthetic Cell Painting plates with known treatment effects, for tests and demos.
* :mod:`bio.backbone` - channel-matched backbones (fixed channels by name, or bag of channels for any subset).
* :mod:`bio.embed`, :mod:`bio.embed_reader`, :mod:`bio.embed_fields`, :mod:`bio.embed_store`,
  :mod:`bio.embed_merge`, :mod:`bio.embed_anndata` - resumable, rank-parallel per-cell embedding to zarr + parquet
  (and AnnData), read by forked reader processes.
* :mod:`bio.qc` - per-cell quality control: focus, saturation, debris and edge flags.
* :mod:`bio.profiles`, :mod:`bio.profiles_aggregate`, :mod:`bio.profiles_normalise`, :mod:`bio.profiling` -
  streaming well profiles and normalisation against controls (pycytominer).
* :mod:`bio.evaluate`, :mod:`bio.evaluate_map`, :mod:`bio.evaluate_knn`, :mod:`bio.plots` - copairs mAP and the
  hit list, kNN, batch separation; plots and an HTML report.
* :mod:`bio.heads` - phenotype classifiers on embeddings.
* :mod:`bio.pretrain_data` - single-cell crops as a ``data.kind: cells`` pretraining dataset.
* :mod:`bio.config`, :mod:`bio.services`, :mod:`bio.cli` - recipes, their services, ``dinoscope cells``.
"""

from __future__ import annotations

from core.lazy import lazy_exports

_EXPORTS = {
    "read_image": "bio.io",
    "embed_plate": "bio.embed",
    "open_run": "bio.profiles",
    "build_profiles": "bio.profiling",
    "evaluate_profiles": "bio.evaluate",
    "fit_head": "bio.heads",
    "make_plate": "bio.synthetic",
    "CellsEmbedRecipe": "bio.config",
    "CellsProfileRecipe": "bio.config",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("bio", _EXPORTS)


def __dir__() -> list[str]:
    """The exported names (for tab completion in notebooks)."""
    return __all__
