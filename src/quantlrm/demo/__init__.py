"""The offline demo and its reusable parts: synthetic reasoning tasks (`tasks`), a small
causal-LM trainer (`train`), base -> SFT pair building (`pair`), the end-to-end run (`run`)
and its report (`report`). The GPU zoo reuses `tasks`, `train` and `pair`."""
