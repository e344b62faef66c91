"""The dissect layer: dissection, the ROI query, the concept store, reports, and the Session every surface opens (docs/ARCHITECTURE.md, "Layers")."""
