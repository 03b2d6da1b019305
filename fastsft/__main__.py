import os
import sys

# `python -m fastsft` (and torchrun -m fastsft) put the working directory first on sys.path. In a fastsft
# checkout that makes its kernels/ directory (installed as fastsft.kernels) importable as a top-level `kernels`,
# which shadows Hugging Face's `kernels` package that transformers (5.25+) imports: drop that entry. fastsft
# itself is already imported by now.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.getcwd() \
        and os.path.isfile(os.path.join(os.getcwd(), "kernels", "__init__.py")):
    del sys.path[0]

from fastsft.cli import main  # noqa: E402

sys.exit(main())
