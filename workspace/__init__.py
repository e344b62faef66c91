"""mammo-dissect core: the workspace, its catalog, DICOM reading, patches, dissection, concepts, reports."""

__version__ = "0.1.0"
