from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from medtune.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(config: str, run_id: str, train_split: Input[Dataset], validation_split: Input[Dataset],
          adapter: Output[Model], history: Output[Artifact], metrics: Output[Metrics]):
    """Fine-tune a LoRA/QLoRA adapter with TRL's SFTTrainer (loss on the answer only)."""
    import tempfile

    from medtune import steps

    result = steps.train(config, run_id, train_split.path, validation_split.path, adapter.path, history.path,
                         work_dir=tempfile.mkdtemp(prefix="medtune-train-"))
    for key, value in result.items():
        metrics.log_metric(key, value)
