"""geodino: canopy-height mapping from GeoTIFFs with DINOv2 backbones.

Modules (import them directly; this package imports nothing heavy):

* :mod:`geodino.raster` - windowed, nodata-aware reading (``RasterSource``).
* :mod:`geodino.normalise` - scene-level per-band normalisation (``BandNormaliser``).
* :mod:`geodino.align` - lidar CHM / label rasters warped onto an image grid.
* :mod:`geodino.synthetic` - deterministic synthetic forests (RGB + CHM) for tests and demos.
* :mod:`geodino.chips` - (image, target, valid) training chips with spatial-block train/val splits.
* :mod:`geodino.pretrain_data` - random GeoTIFF windows for self-supervised pretraining.
"""
