"""DICOM in and DICOM RT out: the geometry between NIfTI (RAS) and DICOM (LPS) image series, writing an
image series from a NIfTI volume, converting series to a cohort folder with dcm2niix, and writing the CTVs
as one RTSTRUCT on a planning series' frame of reference."""
