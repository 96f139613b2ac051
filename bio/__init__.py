"""dinoscope bio: DINOv2 embeddings for cell-painting screens.

Modules (imported explicitly; this package imports nothing heavy):

* :mod:`bio.io` - read OME-TIFF, OME-Zarr images and HCS plates (NGFF 0.4/0.5) and CellProfiler LoadData manifests
  as lazy, channel-named :class:`bio.io.Image` objects; write OME-TIFF and OME-Zarr plates.
* :mod:`bio.preprocess` - per-plate illumination correction and per-channel normalisation.
* :mod:`bio.cells` - nucleus centroids (CellProfiler tables, label images, built-in detection) and single-cell crops.
* :mod:`bio.synthetic` - seeded synthetic Cell Painting plates with known treatment effects, for tests and demos.
* :mod:`bio.backbone` - channel-matched backbones (fixed channels by name, or bag of channels for any subset).
* :mod:`bio.embed` - resumable, rank-parallel per-cell embedding to zarr + parquet (``dinoscope cells embed``).
* :mod:`bio.profiles` - streaming well profiles, normalisation against controls (pycytominer).
* :mod:`bio.evaluate`, :mod:`bio.plots` - copairs mAP, kNN, batch separation; plots and an HTML report.
* :mod:`bio.heads` - phenotype classifiers on embeddings (``dinoscope cells fit-head``).
* :mod:`bio.pretrain_data` - single-cell crops as a ``data.kind: cells`` pretraining dataset.
"""
