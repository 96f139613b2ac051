"""geodino: canopy-height mapping from GeoTIFFs with DINOv2 backbones.

The entry points for notebooks are exported here (each loads its module on first use, so ``import geodino`` is
instant)::

    from geodino import evaluate_rasters, inspect_raster, predict_files, zonal_stats

    [chm] = predict_files("runs/canopy_fit/model.safetensors", ["scene.tif"], "scene_chm.tif")  # a COG, metres
    metrics = evaluate_rasters(chm, "lidar_chm.tif", "eval/")                                    # MAE, R2, block R2
    plots = zonal_stats(chm, "plots.gpkg")                                                       # mean, p95, cover
    report = inspect_raster("tile.tif", model_path="model.safetensors")                           # will it fit?

Modules:

* :mod:`geodino.raster` - windowed reading with GDAL's dataset mask (:class:`RasterSource`).
* :mod:`geodino.values`, :mod:`geodino.inputs` - the dtype and value range a model was trained on, the rules that
  convert other inputs (``--input-range`` / ``--input-scale``), and the checks of every input against them.
* :mod:`geodino.inspection` - ``canopy inspect``: a raster's bands, range, mask, CRS and GSD against a model.
* :mod:`geodino.normalise` - scene-level per-band normalisation (``BandNormaliser``).
* :mod:`geodino.align` - lidar CHM / label rasters warped onto an image grid.
* :mod:`geodino.synthetic` - deterministic synthetic forests (RGB + CHM) for tests and demos.
* :mod:`geodino.chips` - (image, target, valid) training chips with spatial-block train/val splits.
* :mod:`geodino.fit` - a canopy-height head on a frozen backbone (:func:`fit_canopy`).
* :mod:`geodino.model` - canopy models: save, load (:func:`load_canopy_model`, also HRCH checkpoints).
* :mod:`geodino.hrch`, :mod:`geodino.hrch_checkpoints` - HighResCanopyHeight and its public checkpoints.
* :mod:`geodino.predict`, :mod:`geodino.prediction` - seamless tiled prediction into COGs.
* :mod:`geodino.mosaic`, :mod:`geodino.mosaic_predict` - folders of touching tiles predicted as one mosaic.
* :mod:`geodino.evaluate`, :mod:`geodino.metrics` - MAE, RMSE, R2, block R2, bias, height-binned errors.
* :mod:`geodino.zonal`, :mod:`geodino.field_plots` - per-plot statistics (exactextract) for polygons, points with
  a radius or CSV coordinates.
* :mod:`geodino.pretrain_data` - random GeoTIFF windows for self-supervised pretraining.
* :mod:`geodino.config`, :mod:`geodino.services`, :mod:`geodino.cli` - recipes, their services, ``dinoscope canopy``.
"""

from __future__ import annotations

from core.lazy import lazy_exports

_EXPORTS = {
    "RasterSource": "geodino.raster",
    "load_canopy_model": "geodino.model",
    "predict_files": "geodino.prediction",
    "predict_raster": "geodino.predict",
    "evaluate_rasters": "geodino.evaluate",
    "zonal_stats": "geodino.zonal",
    "zonal_to_file": "geodino.zonal",
    "read_plots": "geodino.field_plots",
    "inspect_raster": "geodino.inspection",
    "predict_many": "geodino.mosaic_predict",
    "fit_canopy": "geodino.fit",
    "make_forest": "geodino.synthetic",
    "CanopyFitRecipe": "geodino.config",
    "CanopyPredictRecipe": "geodino.config",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("geodino", _EXPORTS)


def __dir__() -> list[str]:
    """The exported names (for tab completion in notebooks)."""
    return __all__
