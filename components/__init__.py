"""KFP components: each one a thin typed wrapper around one function of `medtune.steps`.

They import medtune inside the function body because KFP ships only the function's source to the
container; the image (or, locally, the current virtualenv) provides the library.
"""

from components.audit import audit
from components.evaluate import evaluate
from components.gate import gate
from components.open_run import open_run
from components.preprocess import preprocess
from components.push import push
from components.register import register
from components.train import train
from components.validate_data import validate_data

__all__ = ["audit", "evaluate", "gate", "open_run", "preprocess", "push", "register", "train", "validate_data"]
