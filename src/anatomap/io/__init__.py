"""Reading and writing scans: NIfTI, NRRD, MetaImage and DICOM series."""

from anatomap.io.readers import SUPPORTED_SUFFIXES, read_volume
from anatomap.io.writers import write_dicom_series, write_volume

__all__ = ["SUPPORTED_SUFFIXES", "read_volume", "write_dicom_series", "write_volume"]
