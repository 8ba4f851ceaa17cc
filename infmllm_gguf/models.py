"""Deprecated name of `infmllm_gguf.model_files` (finding and fetching model files; the loaded
model is `runtime.Model`): it works, with a DeprecationWarning, until the next release."""
import sys
import warnings

from .model_files import *  # noqa: F401,F403
from .model_files import main

warnings.warn("infmllm_gguf.models is now infmllm_gguf.model_files", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    main(sys.argv[1:])
