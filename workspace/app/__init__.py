"""The app layer: the mammo CLI and the demo, which start the surfaces (docs/ARCHITECTURE.md, "Layers")."""
