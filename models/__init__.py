"""Models: architectures, checkpoints, layer taps, training, evaluation and whole-mammogram reads.

Heavy work lives in the submodules (``models.vgg``, ``models.checkpoint``, ``models.features``,
``models.train``, ``models.evaluate``, ``models.inference``, ``models.ablation``, ``models.device``).
"""

import os as _os

# PyTorch backs CPU tensors of 2 MB and more with transparent huge pages when this is set (read at its first
# allocation; Linux with THP in "madvise" mode, the common default). The layer maps of a batch are hundreds
# of MB: without it every batch faults them in 4 KB pages, and a fresh process (a CLI command, a Ray worker)
# runs a dissection about 1.35x slower (bench/RESULTS.md, "Ray"). A value set by the user wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
