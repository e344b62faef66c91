"""Models: architectures, checkpoints, layer taps, training, evaluation and whole-mammogram reads.

Heavy work lives in the submodules (``models.vgg``, ``models.checkpoint``, ``models.features``,
``models.train``, ``models.evaluate``, ``models.inference``, ``models.device``).
"""
