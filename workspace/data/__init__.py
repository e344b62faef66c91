"""The data layer: DICOM reading, import, the synthetic cohort, patch sets, per-image domain features (docs/ARCHITECTURE.md, "Layers")."""
