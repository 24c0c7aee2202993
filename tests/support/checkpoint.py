"""The tiny SD1.5-format checkpoint for loader-level tests: the generator lives in tools/tiny_checkpoint.py
(shared with `make demo`); this module is the tests' name for it."""
from tools.tiny_checkpoint import (CKPT_NAME, MODEL_DIR, SEED, VERSION, _is_current,  # noqa: F401
                                   build_state_dict, model_dir, register_model_dir, tiny_checkpoint_path)
