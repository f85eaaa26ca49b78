"""Write small DICOM files from real images, for the tests."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(
    path,
    gray: np.ndarray,
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
) -> None:
    """Save a uint8 grayscale picture as DICOM with the given bit depth and photometry.

    MONOCHROME1 files store the inverted picture, so that a correct reader shows the same
    image as the MONOCHROME2 file. 16-bit files spread the values over 12 bits, as X-ray
    detectors do, and store (value - intercept) / slope.
    """
    values = gray.astype(np.float64) if bits == 8 else gray.astype(np.float64) * (4095 / 255)
    top = 255 if bits == 8 else 4095
    if photometric == "MONOCHROME1":
        values = top - values
    stored = np.round((values - intercept) / slope).astype(np.uint8 if bits == 8 else np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
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
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
