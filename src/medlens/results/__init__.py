"""Results out: DICOM SR (TID 1500) and FHIR DiagnosticReport from a task envelope."""
