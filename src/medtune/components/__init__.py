"""KFP components: each one a thin typed wrapper around one function of `medtune.steps`.

They import medtune inside the function body because KFP ships only the function's source to the
container; the image (or, locally, the current virtualenv) provides the library.
"""

from medtune.components.audit import audit
from medtune.components.evaluate import evaluate
from medtune.components.gate import gate
from medtune.components.open_run import open_run
from medtune.components.preprocess import preprocess
from medtune.components.push import push
from medtune.components.register import register
from medtune.components.train import train
from medtune.components.validate_data import validate_data

__all__ = ["audit", "evaluate", "gate", "open_run", "preprocess", "push", "register", "train", "validate_data"]
