"""Write small DICOM files from real images, for the tests."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def _dataset(path, modality: str) -> FileDataset:
    """An uncompressed secondary-capture dataset of ``modality``, without its image yet."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


def write_dicom(
    path,
    gray: np.ndarray,
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    view: str | None = None,
    modality: str = "DX",
    **tags,
) -> None:
    """Save a uint8 grayscale picture as DICOM with the given bit depth and photometry.

    MONOCHROME1 files store the inverted picture, so that a correct reader shows the same
    image as the MONOCHROME2 file. 16-bit files spread the values over 12 bits, as X-ray
    detectors do, and store (value - intercept) / slope. ``view``: the View Position;
    ``modality`` and ``tags`` (BodyPartExamined="KNEE", PatientAge="045Y", ...): more tags.
    """
    values = gray.astype(np.float64) if bits == 8 else gray.astype(np.float64) * (4095 / 255)
    top = 255 if bits == 8 else 4095
    if photometric == "MONOCHROME1":
        values = top - values
    stored = np.round((values - intercept) / slope).astype(np.uint8 if bits == 8 else np.uint16)

    ds = _dataset(path, modality)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = 8 if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if view is not None:
        ds.ViewPosition = view
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_rgb_dicom(path, rgb: np.ndarray) -> None:
    """Save an 8-bit ``(H, W, 3)`` picture as an RGB secondary capture (a scanned film, a
    screenshot), uncompressed."""
    ds = _dataset(path, "OT")
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def transcode(source, path, syntax: str) -> None:
    """Re-encode a DICOM file's pixel data with GDCM in transfer syntax ``syntax`` (a name of
    gdcm.TransferSyntax, e.g. JPEGLosslessProcess14_1), as a PACS would store it."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    if not reader.Read():
        raise OSError(f"GDCM cannot read {source}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise ValueError(f"GDCM cannot encode {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise OSError(f"GDCM cannot write {path}")
