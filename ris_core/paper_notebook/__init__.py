"""Open the paper notebook's own `captioner.pt` and caption with it through the same interface as our runs.

The notebook (a `VisionGPT2Model`) trains a timm ViT-B/16 encoder and a nanoGPT-style GPT-2 decoder whose
block N cross-attends to the output of ViT block N, and saves a bare `state_dict` with `torch.save`.
`NotebookCaptioner` rebuilds that model in plain torch with the same parameter names, so the file loads
as it is. `CHECKPOINT_LAYOUT` below is THE expected layout; a file named differently is refused with the
missing and unexpected keys listed.

Safety: `torch.load(..., weights_only=True)` only; anything that is not a plain dict of tensors (a whole
pickled model, a file whose unpickling would run code) is refused with `CheckpointError`, never executed.

Decoding (`DECODING_MODES`): the notebook generates from BOS (50256), which its training never fed to the
model, so the first word generated is spurious.
- "notebook": sampling at temperature 1 from BOS, as the notebook did; keeps the spurious first word.
- "greedy_drop_first": greedy (deterministic) from BOS, the first generated word dropped. The default.

    run = "results/runs/paper-notebook"   # written by `python -m training.import_paper_checkpoint`
    captioner = load_any_captioner(run)   # ris_core.captioner: NotebookCaptionerAdapter here, Captioner for ours
    captioner.caption([image])

Modules: `layout` (the expected keys and the model's shape), `model` (the torch modules), `checkpoint` (reading,
checking, converting), `adapter` (the captioner interface).
"""

from ris_core.paper_notebook.adapter import NotebookCaptionerAdapter
from ris_core.paper_notebook.checkpoint import (
    check_layout,
    infer_config,
    is_notebook_run,
    load_notebook_checkpoint,
    load_notebook_dir,
    read_state_dict,
    save_notebook_dir,
)
from ris_core.paper_notebook.layout import (
    BOS_TOKEN_ID,
    CHECKPOINT_LAYOUT,
    CONFIG_FORMAT,
    DECODING_MODES,
    DEFAULT_MODE,
    IGNORED_BUFFERS,
    NOTEBOOK_DIR,
    OPTIONAL_LAYOUT,
    NotebookCaptionerConfig,
    expected_shapes,
)
from ris_core.paper_notebook.model import NotebookCaptioner, drop_first_word

__all__ = [
    "BOS_TOKEN_ID", "CHECKPOINT_LAYOUT", "CONFIG_FORMAT", "DECODING_MODES", "DEFAULT_MODE", "IGNORED_BUFFERS",
    "NOTEBOOK_DIR", "OPTIONAL_LAYOUT", "NotebookCaptioner", "NotebookCaptionerAdapter", "NotebookCaptionerConfig",
    "check_layout", "drop_first_word", "expected_shapes", "infer_config", "is_notebook_run",
    "load_notebook_checkpoint", "load_notebook_dir", "read_state_dict", "save_notebook_dir",
]
