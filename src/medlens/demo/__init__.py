"""Demo material: a synthetic CT phantom (no patient data) and the writers that turn it into DICOM."""
