"""One lock around building and loading torch models in this process.

transformers' `from_pretrained` (and accelerate's empty-weights helpers) build models with
`nn.Module.register_parameter` patched process-wide; a module built in another thread meanwhile gets meta
tensors, and two overlapping patches can leave the patch in place for good. The dashboard loads captioners in
request threads and evaluates in job threads, so every model construction in the library holds this lock.
"""

from __future__ import annotations

import threading

MODEL_CONSTRUCTION = threading.RLock()
