"""The base layer: the workspace folder, catalog and migrations, errors, progress, service processes, modalities (docs/ARCHITECTURE.md, "Layers")."""
